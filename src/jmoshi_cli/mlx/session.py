"""The MLX model as jmoshi's MLX server and `jmoshi infer` run it: `Engine` loads the LM, Mimi and
tokenizer once; `Session` is one conversation from a fresh state, a frame of the user's PCM in, J-Moshi's
PCM and text id out. Used from one thread only (the server's model thread)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..audio_io import FRAME_SIZE
from ..conversations.server import say
from ..sampling import UPSTREAM_SEED

if TYPE_CHECKING:  # pragma: no cover
    from .model import Sampling

WARMUP_FRAMES = 4


@dataclass(frozen=True)
class Settings:
    seed: int | None
    sampling: Sampling


def settings_from(args: argparse.Namespace, contract) -> Settings:
    """Flags first, then what jmoshi put in the contract, then moshi's defaults."""
    from .model import Sampling

    given = dict(contract.sampling or {})
    for key in ("temp", "temp_text", "top_k", "top_k_text"):
        if getattr(args, key) is not None:
            given[key] = getattr(args, key)
    known = {k: v for k, v in given.items() if k in Sampling.__dataclass_fields__}
    return Settings(args.seed if args.seed is not None else contract.seed, Sampling(**known))


# --- the model, used from one worker thread only ---------------------------------------------------------------


class Engine:
    """The LM, Mimi and tokenizer, loaded once; `start` begins a conversation from a fresh state."""

    def __init__(self, args: argparse.Namespace, settings: Settings):
        import rustymimi
        import sentencepiece

        from .model import load_lm, read_lm_kwargs

        self.settings = settings
        say("info", f"loading the text tokenizer {args.tokenizer}")
        self.tokenizer = sentencepiece.SentencePieceProcessor(str(args.tokenizer))  # type: ignore[call-arg]
        lm_kwargs = self.lm_kwargs = read_lm_kwargs(args.lm_config)
        quantization = self.quantization = weights_quantization(args.moshi_weight, lm_kwargs)
        say("info", f"loading moshi ({describe(quantization)}) from {args.moshi_weight}")
        self.lm = load_lm(lm_kwargs, args.moshi_weight, quantization)
        say("info", "moshi loaded")
        say("info", f"loading mimi from {args.mimi_weight}")
        self.mimi_file = str(args.mimi_weight)
        self.mimi = rustymimi.Tokenizer(self.mimi_file, num_codebooks=self.lm.cfg.depformer.num_slices)
        say("info", "mimi loaded")
        if settings.seed is None:
            import mlx.core as mx

            mx.random.seed(UPSTREAM_SEED)

    def warmup(self) -> None:
        import numpy as np

        session = self.start()
        for _ in range(WARMUP_FRAMES + session.generator.max_delay):
            session.frame(np.zeros(FRAME_SIZE, dtype=np.float32))

    def start(self, reset_encoder: bool = True) -> Session:
        """A conversation from a fresh state. reset_encoder: reset Mimi's encoder after the first frame, as
        moshi.server does (a live conversation); `jmoshi infer` runs the encoder over the input unbroken."""
        import rustymimi

        from .model import Generator, reset

        if self.settings.seed is not None:
            import mlx.core as mx

            mx.random.seed(self.settings.seed)
        reset(self.lm)
        # A new Mimi rather than reset(): rustymimi 0.4.1's reset leaves its downsampling convolution's state.
        self.mimi = rustymimi.Tokenizer(self.mimi_file, num_codebooks=self.lm.cfg.depformer.num_slices)
        return Session(self.lm, self.mimi, Generator(self.lm, self.settings.sampling), reset_encoder)


class Session:
    """One conversation: a frame of the user's PCM in, J-Moshi's PCM (or None yet) and text id out."""

    def __init__(self, lm, mimi, generator, reset_encoder: bool = True):
        self.lm, self.mimi, self.generator = lm, mimi, generator
        self.first = reset_encoder  # the first frame is still to come, and the encoder is reset after it

    def frame(self, pcm):
        """(J-Moshi's PCM, its text id) for the frame that became complete with this one; (None, None) yet."""
        import mlx.core as mx
        import numpy as np

        codes = self.mimi.encode_step(pcm[None, None].astype(np.float32))  # (1, codebooks, 1)
        if self.first:
            # As moshi.server: the first frame's codes carry the encoder's left padding; its state is reset
            # so that the next frame gets that padding again (the frame itself still reaches the LM).
            self.mimi.reset()
            self.first = False
        user = mx.array(codes).transpose(0, 2, 1)[0, :, : self.generator.main]
        self.generator.step(user)
        # Text and voice of the same frame together, `max_delay` steps on, as moshi.server sends them.
        audio = self.generator.last_audio_tokens()
        if audio is None:
            return None, None
        out = self.mimi.decode_step(np.array(audio).astype(np.uint32)[:, :, None])
        return np.asarray(out, dtype=np.float32).reshape(-1), self.generator.last_text_token()


def weights_quantization(weight: Path, lm_kwargs: dict):
    """How the weights file is quantized, read from its own shapes (so a file cannot be loaded as another)."""
    from .convert import Reader
    from .model import Quantization

    reader = Reader(weight)
    if "text_linear.scales" not in reader.entries:
        return None
    dim = lm_kwargs["dim"]
    packed, groups = reader.shape("text_linear.weight")[1], reader.shape("text_linear.scales")[1]
    return Quantization(bits=packed * 32 // dim, group_size=dim // groups)


def describe(quantization) -> str:
    return "bf16" if quantization is None else f"{quantization.bits}-bit, groups of {quantization.group_size}"


