"""J-Moshi loaded once, and the loop that makes it answer a recording frame by frame.

torch and moshi are imported inside the functions: importing this module costs nothing.

Upstream code used. :func:`read_config` re-implements the config.json part of moshi's
``CheckpointInfo.from_hf_repo`` (moshi/models/loaders.py; the keys of a moshi-type config are read
the same way in 0.2.2 and 0.2.13), and :func:`load_model` builds a
``CheckpointInfo`` directly, because ``from_hf_repo`` downloads by repo name while jmoshi loads the
local files it has verified (``artifacts.ensure_local``). The loop relies on attributes that moshi
does not document as API: ``LMModel.context`` and ``condition_provider``, ``LMGen.max_delay``, and
the streaming methods ``streaming_forever`` / ``reset_streaming`` of Mimi and LMGen. Its first-frame
handling is that of ``moshi.run_inference.InferenceState.run`` (a test checks both give the same
tokens and samples).

Alignment. Moshi models two streams on one timeline of 80 ms frames; position 0 holds the
initial tokens and position ``p >= 1`` holds the user's and J-Moshi's frame ``p - 1``. As in
``moshi.run_inference``, the first frame's codes are fed twice: the first ``LMGen.step`` only
fills position 0 (its input is replaced by the initial tokens), so the user's frame 0 really lands
at position 1 and no input is lost (``moshi.server`` instead resets Mimi's encoder after the first
frame and lets that frame fall on position 0: it drops the first 80 ms of the user). ``LMGen``
returns position ``p`` once its delayed codebooks are generated, ``max_delay`` steps later
(returns None before); steps with silence are added after the input so that all ``frames``
positions come out (none for J-Moshi, whose ``max_delay`` is 1). Output frame ``t`` is therefore
what J-Moshi says while the user's frame ``t`` plays, exactly as the two streams line up in the
model. It is causal: the frame's text and semantic tokens were sampled from the user's audio up to
frame ``t - 1``, its delayed acoustic tokens also saw frame ``t``, as in a live session where that
frame is produced once the user's frame ``t`` has arrived; so a live client (``moshi.server``)
hears it at least one frame (80 ms) later than here, plus compute and network time. Nothing is
padded in front: output frame 0 is sampled from the initial tokens (and, for its acoustic
tokens, the user's frame 0).

Long inputs. The LM attends to ``context`` frames (3000 = 240 s for J-Moshi); past it moshi's
ring KV cache slides and the model goes on with a window it was not built for (quality unknown,
never promised upstream). So an input longer than ``context`` frames is processed as consecutive
segments of at most ``context`` frames (:func:`segment_bounds`), J-Moshi's state reset at each
boundary (it forgets what was said before), and the outputs are concatenated.

dtype. The LM runs in bfloat16 (``moshi``'s default) on both CUDA and CPU, or in float16 with
``half``; Mimi stays in float32 as upstream. On CPU float32 is not offered: J-Moshi's 7.7 B
parameters take 31 GB in float32 against 15.4 GB in bfloat16, and bfloat16 runs fine on CPU
(on 2 cores with a tiny LM: LM step ~12 ms bf16, ~9 ms fp32, ~38 ms fp16; Mimi ~160 ms a frame
dominates either way). CPU inference of the 7 B model is far slower than real time.

Sampling. ``temp`` / ``temp_text`` / ``top_k`` / ``top_k_text`` not overridden take the model's
``lm_gen_config`` (config.json) and else ``LMGen``'s defaults (0.8 / 0.7 / 250 / 25), as
upstream. With a seed, torch's generator is seeded at the start of each input (the state of the
caller's generator is restored afterwards), so an input's output depends only on the input, the
model, the options and the seed: same input and seed give the same samples on the same machine and
torch build. Without a seed every run samples afresh (upstream seeds a constant).

Loading is quiet: what moshi and its imports print to stdout, log or warn while the model loads
(bitsandbytes' "compiled without GPU support" on CPU-only builds) is kept off the console, and put in
the error when the model files cannot be loaded; with ``quiet=False`` it goes where it would anyway.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, TypedDict

import numpy as np

from ..audio_io import FRAME_SIZE, SAMPLE_RATE
from ..cache.artifacts import ModelFiles
from ..errors import CacheError, PreflightError, UsageError
from ..model.lm_config import read as read_config_file
from ..sampling import DEFAULTS

# LMGen's defaults (the same in moshi 0.2.2 and 0.2.13), used when neither the options nor config.json
# say otherwise.
_CAPTURED_IN_ERRORS = 1000  # characters of the captured loading output that an error carries

OnStep = Callable[[], None]


@dataclass(frozen=True)
class ModelConfig:
    """config.json as moshi's CheckpointInfo.from_hf_repo reads it (all None / empty without one)."""

    lm_config: dict | None = None
    raw: dict | None = None
    model_type: str = "moshi"
    lm_gen_config: dict | None = None


def read_config(path: Path | None) -> ModelConfig:
    """Parse config.json like ``CheckpointInfo.from_hf_repo``; CacheError when it cannot be read."""
    if path is None:
        return ModelConfig()
    raw = read_config_file(path, corrupt_hint="the file may be corrupt: download the model again")
    lm_config = dict(raw)
    for key in ("moshi_name", "mimi_name", "tokenizer_name"):  # file names: the local files are given
        lm_config.pop(key, None)
    model_type = lm_config.pop("model_type", "moshi")
    lm_gen_config = dict(lm_config.pop("lm_gen_config", {}) or {})
    return ModelConfig(lm_config, raw, model_type, lm_gen_config)


def resolve_sampling(overrides: dict[str, Any], lm_gen_config: dict) -> dict[str, Any]:
    """Sampling parameters for LMGen: ``overrides``, else config.json's lm_gen_config, else LMGen defaults."""
    return {**DEFAULTS, **lm_gen_config, **overrides}


def segment_bounds(frames: int, max_frames: int | None) -> list[tuple[int, int]]:
    """(start, end) frames of the segments an input of ``frames`` is processed in (see Long inputs)."""
    seg_len = frames if max_frames is None else min(frames, max_frames)
    return [(s, min(s + seg_len, frames)) for s in range(0, frames, seg_len)]


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def _write_warning(stream: io.StringIO, message, category, filename, lineno, file=None, line=None) -> None:
    stream.write(warnings.formatwarning(message, category, filename, lineno, line))


@contextlib.contextmanager
def captured_output(quiet: bool = True) -> Iterator[io.StringIO]:
    """Keep what is printed to stdout, warned and logged inside the block in the stream it yields.

    With ``quiet`` False nothing is kept (the stream stays empty). Writes to sys.stderr itself are
    left alone: the console's live display (the loading spinner) draws there and looks sys.stderr up
    at each refresh, so redirecting it would swallow the spinner. Warnings and the logging module's
    last-resort handler do not reach sys.stderr here: both are taken over for the block.
    """
    stream = io.StringIO()
    if not quiet:
        yield stream
        return
    handler = logging.StreamHandler(stream)
    root = logging.getLogger()
    root.addHandler(handler)  # with a handler on the root logger, the last-resort (stderr) one is not used
    try:
        with contextlib.redirect_stdout(stream), warnings.catch_warnings():
            warnings.showwarning = lambda *args, **kwargs: _write_warning(stream, *args, **kwargs)
            yield stream
    finally:
        root.removeHandler(handler)


def loading_failed(exc: Exception, captured: io.StringIO) -> CacheError:
    msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    said = captured.getvalue().strip()
    detail = f"\noutput while loading:\n{said[-_CAPTURED_IN_ERRORS:]}" if said else ""
    return CacheError(f"cannot load the model: {msg[:300]}{detail}",
                      hint="the model files may be incomplete or corrupt: download them again")


def _check_files(files: ModelFiles) -> None:
    for label, path in (("LM weights", files.moshi_weight), ("Mimi weights", files.mimi_weight),
                        ("tokenizer", files.tokenizer)):
        if not Path(path).is_file():
            raise CacheError(f"{label} not found: {path}", hint="download the model again")


def _check_device(device: str):
    import torch

    if device.startswith("cuda") and not torch.cuda.is_available():
        raise PreflightError("CUDA is not available to torch", hint="run on a GPU machine or use --device cpu")
    return torch.device(device)


@dataclass
class Model:
    """Mimi, the LM and its generator, the tokenizer, and what the loop needs to know about them."""

    mimi: Any
    lm: Any
    lm_gen: Any
    tokenizer: Any
    device: Any  # torch.device
    sampling: dict[str, Any]
    max_delay: int
    max_frames: int | None  # the LM's context: longest segment it attends to in full (None: no limit)
    engine: Any = None  # with a batch of more than one: the batched engine (infer/batched.py) instead of lm_gen

    @property
    def batch(self) -> int:
        """How many inputs it runs at once."""
        return 1 if self.engine is None else int(self.engine.slots)

    def generate(self, pcm: np.ndarray, segments: list[tuple[int, int]], seed: int | None,
                 on_step: OnStep | None = None) -> tuple[np.ndarray, list[int]]:
        """J-Moshi's answer to ``pcm`` (whole frames at 24 kHz), segment by segment: (its pcm of the same
        length, one text id per frame). ``on_step`` is called after each output frame. PreflightError
        when the GPU runs out of memory."""
        import torch

        out = np.zeros_like(pcm)
        text_ids: list[int] = []
        try:
            with torch.no_grad(), self._seeded(seed):
                for a, b in segments:
                    seg_pcm, seg_ids = self._conversation(pcm[a * FRAME_SIZE:b * FRAME_SIZE], on_step)
                    out[a * FRAME_SIZE:b * FRAME_SIZE] = seg_pcm
                    text_ids.extend(seg_ids)
        except torch.cuda.OutOfMemoryError as exc:
            raise PreflightError("out of GPU memory", hint="close other GPU programs or use shorter inputs") from exc
        return out, text_ids

    @contextlib.contextmanager
    def _seeded(self, seed: int | None) -> Iterator[None]:
        if seed is None:
            yield
            return
        import torch

        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            torch.manual_seed(seed)
            yield

    def _conversation(self, pcm: np.ndarray, on_step: OnStep | None) -> tuple[np.ndarray, list[int]]:
        """One conversation from a fresh state (see Alignment): returns (pcm, one text id per frame)."""
        import torch

        frames = pcm.shape[0] // FRAME_SIZE
        self.mimi.reset_streaming()
        self.lm_gen.reset_streaming()
        out_pcm: list[torch.Tensor] = []
        text_ids: list[int] = []
        for codes in self._step_inputs(torch.from_numpy(pcm).to(self.device)[None, None], frames):
            tokens = self.lm_gen.step(codes)
            if tokens is None:
                continue
            out_pcm.append(self.mimi.decode(tokens[:, 1:])[0, 0].float().cpu())
            text_ids.append(int(tokens[0, 0, 0].item()))
            if on_step is not None:
                on_step()
        if len(out_pcm) != frames:  # a model whose delays break the accounting of _step_inputs
            raise RuntimeError(f"expected {frames} output frames, got {len(out_pcm)}")
        return torch.cat(out_pcm).numpy(), text_ids

    def _step_inputs(self, x, frames: int) -> Iterator[Any]:
        """Mimi codes for each LM step, encoded as they are needed (Mimi streams too).

        Step 0 only fills position 0 with the initial tokens, so frame 0 is fed to steps 0 and 1 (encoded
        once); step k >= 1 gets frame k - 1, then silence past the end until output frame
        ``frames - 1`` is out (``max_delay - 1`` steps of silence).
        """
        import torch

        first = self.mimi.encode(x[..., :FRAME_SIZE])
        yield first
        for index in range(frames + self.max_delay - 1):
            if index == 0:
                yield first
            elif index < frames:
                yield self.mimi.encode(x[..., index * FRAME_SIZE:(index + 1) * FRAME_SIZE])
            else:
                yield self.mimi.encode(torch.zeros(1, 1, FRAME_SIZE, device=self.device))


class _Adapter(TypedDict, total=False):
    lora_weights: Path  # a field since moshi 0.2.4: passed only when there is an adapter


def load_modules(files: ModelFiles, config: ModelConfig, device, dtype, captured: io.StringIO):
    """(mimi, tokenizer, lm) through moshi's own loaders; errors become PreflightError / CacheError."""
    import torch
    from moshi.models import loaders

    from ..upstream import torch_cpu, torch_init

    # By keyword: 0.2.4+ inserted fields (mimi_config, lora_weights, ...) between these.
    adapter: _Adapter = {"lora_weights": Path(files.lora)} if files.lora is not None else {}
    info = loaders.CheckpointInfo(moshi_weights=Path(files.moshi_weight), mimi_weights=Path(files.mimi_weight),
                                  tokenizer=Path(files.tokenizer), lm_config=config.lm_config,
                                  raw_config=config.raw, model_type=config.model_type,
                                  lm_gen_config=config.lm_gen_config or {}, **adapter)
    fuse = {"fuse_lora": True} if adapter else {}  # as moshi.server does; get_moshi alone would not fuse
    try:
        with torch_init.no_random_init(everywhere=True):  # Mimi's file replaces every weight, strictly
            mimi = info.get_mimi(device=device)
        torch_cpu.fast_transposed_convs(mimi)
        with torch_init.no_random_init():
            lm = info.get_moshi(device=device, dtype=dtype, **fuse)
        return mimi, info.get_text_tokenizer(), lm
    except torch.cuda.OutOfMemoryError as exc:
        raise PreflightError("not enough GPU memory to load the model",
                             hint="close other GPU programs or use a smaller variant") from exc
    except Exception as exc:  # noqa: BLE001 - safetensors, torch and sentencepiece raise their own
        raise loading_failed(exc, captured) from exc


def _check_loaded(mimi, lm) -> None:
    if lm.condition_provider is not None:
        raise UsageError("this model needs conditioning, which jmoshi infer does not support")
    rate, frame = int(mimi.sample_rate), int(mimi.sample_rate / mimi.frame_rate)
    if (rate, frame) != (SAMPLE_RATE, FRAME_SIZE):
        raise CacheError(f"unexpected Mimi rate {rate} Hz / frame {frame}")


def _generator(lm, sampling: dict[str, Any], config_path: Path | None):
    from moshi.models import LMGen

    try:
        return LMGen(lm, **sampling)
    except TypeError as exc:
        raise CacheError(f"bad lm_gen_config in {config_path}: {exc}", hint="download the model again") from exc


def _batched(mimi, lm, batch: int, tokenizer, sampling: dict[str, Any], config_path: Path | None):
    from ..engine.torch_batched import BatchedEngine

    try:
        return BatchedEngine(mimi, lm, batch, tokenizer=tokenizer, **sampling)
    except TypeError as exc:
        raise CacheError(f"bad lm_gen_config in {config_path}: {exc}", hint="download the model again") from exc


def load_model(files: ModelFiles, device: str = "cuda", half: bool = False,
               overrides: dict[str, Any] | None = None, quiet: bool = True, batch: int = 1) -> Model:
    """Load J-Moshi for :meth:`Model.generate`: LM in bfloat16 (float16 with ``half``), Mimi in float32.

    ``overrides``: sampling values that win over config.json's. ``quiet``: keep what moshi and its
    imports print, log or warn meanwhile (see :func:`captured_output`). Raises PreflightError (no CUDA,
    not enough GPU memory), CacheError (files missing or corrupt) or UsageError (a model type jmoshi
    infer does not run). ``batch`` > 1: inputs run that many at a time (infer/batched.py; moshi 0.2.5+).
    """
    from .. import runtime
    from ..upstream import einops_torch, moshi_int8

    runtime.apply_compile_policy(device)  # before moshi is imported: it reads NO_TORCH_COMPILE then
    einops_torch.skip_compile_registration()
    import torch

    torch_device = _check_device(device)
    _check_files(files)
    config = read_config(files.config)
    if config.model_type != "moshi":
        raise UsageError(f"model type {config.model_type!r} is not supported by jmoshi infer",
                         hint="only moshi-type (dialogue) models are")
    sampling = resolve_sampling(overrides or {}, config.lm_gen_config or {})
    int8 = bool((config.lm_config or {}).get("quantize"))
    with captured_output(quiet) as captured:  # a CPU-only bitsandbytes logs a warning when imported
        moshi_int8.prepare(int8)
        mimi, tokenizer, lm = load_modules(files, config, torch_device,
                                            torch.float16 if half else torch.bfloat16, captured)
    if int8:
        from ..model.quantize import restore_scales

        restore_scales(lm, Path(files.moshi_weight))  # moshi cast them to the LM's dtype (quantize.py)
    _check_loaded(mimi, lm)
    context = int(lm.context) if lm.context else None
    if batch > 1:
        engine = _batched(mimi, lm, batch, tokenizer, sampling, files.config)
        return Model(mimi, lm, None, tokenizer, torch_device, sampling, engine.facts.max_delay, context, engine)
    lm_gen = _generator(lm, sampling, files.config)
    mimi.streaming_forever(1)
    lm_gen.streaming_forever(1)
    return Model(mimi, lm, lm_gen, tokenizer, torch_device, sampling, int(lm_gen.max_delay),
                 int(lm.context) if lm.context else None)
