"""moshi_mlx's LM built as exactly the PyTorch model, and a generator for conversations of any length.

Two things in moshi_mlx 0.3.0 make its LM differ from PyTorch moshi's once a conversation outlasts the
attention context (3000 frames, 4 minutes, for J-Moshi):

- Its attention keeps ``context + 1`` past keys where PyTorch keeps ``context`` (the current one
  included): the MLX config gets ``context - 1``.
- Its rotating KV cache holds ``max_seq_len`` (4096) keys and, once it wraps, the attention slices
  the last ``context`` slots of the buffer, which are then not the last ``context`` keys in time.
  With ``max_seq_len == context`` the buffer holds exactly the keys PyTorch attends to and nothing is
  ever sliced (attention is the same whatever the order of the keys: no mask for one query, and
  RoPE is applied before caching).

moshi_mlx's ``LmGen`` keeps every generated token (``max_steps`` is allocated up front, and a step
past it raises): :class:`Generator` is the same step on a ring of the last ``max_delay + 2`` positions,
so a conversation has no length limit.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import CacheError, UsageError

NORM = "rms_norm_f32"  # moshi's 7B (J-Moshi): moshi_mlx's RMSNorm is the same (float32 statistics, eps 1e-8)
GATING = "silu"
HIDDEN_SCALE = 4.125  # moshi_mlx assumes it for the main transformer's feed-forward


@dataclass(frozen=True)
class Quantization:
    bits: int
    group_size: int


def read_lm_kwargs(path: Path) -> dict[str, Any]:
    """The moshi LM kwargs (config.json) that the converter wrote beside the MLX weights."""
    from ..model import lm_config

    return lm_config.read(path, corrupt_hint="convert the model again")


def check_kwargs(lm_kwargs: dict[str, Any]) -> None:
    """Refuse an LM that moshi_mlx would build differently from PyTorch moshi (it reads only some keys)."""
    expected = {"norm": NORM, "gating": GATING, "depformer_gating": GATING, "positional_embedding": "rope",
                "depformer_multi_linear": True, "depformer_weights_per_step": True}
    for key, value in expected.items():
        if lm_kwargs.get(key, value) != value:
            raise UsageError(f"this LM has {key}={lm_kwargs[key]!r}; the MLX backend runs {key}={value!r} only "
                             "(Moshi-7B-shaped models such as J-Moshi)", "use --backend torch for this model")
    if lm_kwargs.get("hidden_scale", HIDDEN_SCALE) != HIDDEN_SCALE:
        raise UsageError(f"this LM has hidden_scale={lm_kwargs['hidden_scale']}; moshi_mlx builds {HIDDEN_SCALE} only",
                         "use --backend torch for this model")


def mlx_config(lm_kwargs: dict[str, Any]):
    """moshi_mlx's LmConfig for moshi LM kwargs, corrected to be exactly the PyTorch model (module docstring)."""
    from moshi_mlx import models

    check_kwargs(lm_kwargs)
    config = models.LmConfig.from_config_dict(dict(lm_kwargs))
    for transformer, context in ((config.transformer, lm_kwargs["context"]),
                                 (config.depformer.transformer, config.depformer.transformer.context)):
        transformer.context = context - 1
        transformer.max_seq_len = context
    return config


def build_lm(lm_kwargs: dict[str, Any], quantization: Quantization | None):
    """The LM's modules, bf16 (weights not loaded: MLX allocates nothing until a value is used)."""
    import mlx.core as mx
    import mlx.nn as nn
    from moshi_mlx import models

    model = models.Lm(mlx_config(lm_kwargs))
    model.set_dtype(mx.bfloat16)
    if quantization is not None:
        check_quantizable(model, quantization)
        nn.quantize(model, group_size=quantization.group_size, bits=quantization.bits)
    return model


def check_quantizable(model, quantization: Quantization) -> None:
    """UsageError naming the first layer whose input size does not divide by the group size."""
    for name, module in model.named_modules():
        if hasattr(module, "to_quantized") and module.weight.shape[-1] % quantization.group_size:
            raise UsageError(
                f"cannot quantize this model to {quantization.bits} bits: layer {name} has input size "
                f"{module.weight.shape[-1]}, which does not divide by the group size {quantization.group_size}",
                "serve it in bf16 (--quantize bf16)")


def load_lm(lm_kwargs: dict[str, Any], weight: Path, quantization: Quantization | None):
    """The LM with the converted weights in it (strict: every tensor, nothing more)."""
    model = build_lm(lm_kwargs, quantization)
    try:
        model.load_weights(str(weight), strict=True)
    except (OSError, ValueError, RuntimeError) as exc:
        raise CacheError(f"cannot load the MLX weights {weight}: {exc}", "convert the model again") from exc
    return model


def reset(model) -> None:
    """Forget every past frame (a new conversation)."""
    model.transformer_cache = model.transformer.make_rot_cache()
    for cache in model.depformer_cache:
        cache.reset()


@dataclass(frozen=True)
class Sampling:
    temp: float = 0.8  # moshi's LMGen defaults, what moshi.server samples with
    temp_text: float = 0.7
    top_k: int = 250
    top_k_text: int = 25


class Generator:
    """moshi_mlx's LmGen step, on a ring buffer: one call per 80 ms frame, for as long as it is called.

    Position ``p`` of the model's timeline is stored in column ``p % size``. A step at position ``s``
    reads the text of ``s - 1`` and audio of ``s - 1 - delay``, writes ``s`` and ``s - delay``, and
    the audio it returns is that of ``s - max_delay``: ``max_delay + 2`` columns are enough.
    """

    def __init__(self, model, sampling: Sampling):
        import mlx.core as mx
        from moshi_mlx.utils import Sampler

        cfg = model.cfg
        self.model = model
        self.text_sampler = Sampler(temp=sampling.temp_text, top_k=sampling.top_k_text)
        self.audio_sampler = Sampler(temp=sampling.temp, top_k=sampling.top_k)
        self.delays = list(cfg.audio_delays)
        self.max_delay = max(self.delays)
        self.main = cfg.depformer.num_slices
        self.size = self.max_delay + 2
        self.tokens = mx.full((1, 1 + cfg.audio_codebooks, self.size), -2, dtype=mx.int32)
        self.step_idx = 0

    def _col(self, position: int) -> int:
        return position % self.size

    def step(self, other_audio_tokens) -> int:
        """One frame: the user's codes (other_audio_tokens, (1, n)) in, J-Moshi's text token id out."""
        import mlx.core as mx

        cfg, s = self.model.cfg, self.step_idx
        if s == 0:
            text = mx.full((1, 1), cfg.text_out_vocab_size, dtype=mx.int32)
        else:
            text = self.tokens[:, 0, self._col(s - 1)][:, None]
        self.tokens[:, 1 + self.main:, self._col(s)] = other_audio_tokens
        audio = []
        for cb, delay in enumerate(self.delays):
            at = s - 1 - delay
            audio.append(self.tokens[:, cb + 1, self._col(at)][None] if at >= 0
                         else mx.array([[cfg.audio_padding_token]]))
        text, tokens, _ = self.model._sample(text, audio, self.text_sampler, self.audio_sampler)
        self.tokens[:, 0, self._col(s)] = text.squeeze(-1)
        for cb, delay in enumerate(self.delays[: self.main]):
            if s - delay >= 0:
                self.tokens[:, cb + 1, self._col(s - delay)] = tokens[:, cb, 0]
        self.step_idx += 1
        # Each assignment above is a lazy update of the previous array: evaluated now, or the graph (and the
        # memory it holds) would grow with every frame of the conversation.
        mx.eval(self.tokens)
        return int(text[0].item())

    def last_text_token(self) -> int | None:
        """The text token of the frame that just became complete (moshi's LMGen returns text with its audio)."""
        at = self.step_idx - 1 - self.max_delay
        return int(self.tokens[0, 0, self._col(at)].item()) if at >= 0 else None

    def last_audio_tokens(self):
        """J-Moshi's audio codes of the frame that just became complete ((1, 8) int32), or None yet."""
        at = self.step_idx - 1 - self.max_delay
        if at < 0:
            return None
        tokens = self.tokens[:, 1: 1 + self.main, self._col(at)]
        if (tokens == self.model.cfg.audio_padding_token).any().item():
            return None
        return tokens
