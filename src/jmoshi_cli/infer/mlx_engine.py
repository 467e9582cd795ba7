"""`jmoshi infer` on the MLX backend: the same files and results as on PyTorch, from moshi_mlx and rustymimi.

The per-file work (reading, segments, transcript, writing, results) is :class:`jmoshi_cli.infer.pipeline.Session`'s;
this module gives it a model whose ``generate`` runs on :class:`~jmoshi_cli.mlx.session.Engine`.

Alignment, as in :mod:`~jmoshi_cli.infer.generation`: output frame ``t`` is position ``t + 1`` of the model's
timeline. PyTorch's ``LMGen`` reads the user's codes at the step they are given (its first step's input
replaced by the initial tokens, hence the first frame fed twice there); :class:`~jmoshi_cli.mlx.model.Generator`
reads them one step later, so here frame ``k`` is given at step ``k``, once, and the ``max_delay`` steps
after the input get silence. Output frame ``t`` (its text and audio together) comes out of step
``t + max_delay``. Mimi is a fresh rustymimi at each segment and, unlike in the server, is not
reset after the first frame (the encoder runs over the input as PyTorch's does).

Sampling as :func:`~jmoshi_cli.infer.generation.resolve_sampling` (options, then the LM config's
``lm_gen_config``, then LMGen's defaults). With a seed, MLX's generator is seeded at each input's start;
without one it is seeded once at load, as the server does.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any

import numpy as np

from ..audio_io import FRAME_SIZE
from ..errors import CacheError
from .generation import OnStep, captured_output, read_config, resolve_sampling

if TYPE_CHECKING:  # pragma: no cover
    from ..cache.artifacts import ModelFiles
    from ..mlx.session import Engine
    from .options import InferOptions


@dataclass
class MlxModel:
    """The loaded Engine, the sampling it runs with and the LM's context, as :class:`infer.Session` uses them."""

    engine: Engine
    tokenizer: Any  # sentencepiece's, the engine's
    sampling: dict[str, Any]
    max_frames: int | None
    batch: int = 1  # moshi_mlx's generator holds one conversation: inputs go one at a time

    def generate(self, pcm: np.ndarray, segments: list[tuple[int, int]], seed: int | None,
                 on_step: OnStep | None = None) -> tuple[np.ndarray, list[int]]:
        """As :meth:`generation.Model.generate`: J-Moshi's pcm of the same length, one text id per frame."""
        import mlx.core as mx

        if seed is not None:
            mx.random.seed(seed)
        out = np.zeros_like(pcm)
        text_ids: list[int] = []
        for a, b in segments:
            seg_pcm, seg_ids = self._conversation(pcm[a * FRAME_SIZE:b * FRAME_SIZE], on_step)
            out[a * FRAME_SIZE:b * FRAME_SIZE] = seg_pcm
            text_ids.extend(seg_ids)
        return out, text_ids

    def _conversation(self, pcm: np.ndarray, on_step: OnStep | None) -> tuple[np.ndarray, list[int]]:
        """One conversation from a fresh state (module docstring): (pcm, one text id per frame)."""
        frames = pcm.shape[0] // FRAME_SIZE
        session = self.engine.start(reset_encoder=False)  # the encoder runs over the input unbroken
        silence = np.zeros(FRAME_SIZE, dtype=np.float32)
        out_pcm: list[np.ndarray] = []
        text_ids: list[int] = []
        for step in range(frames + session.generator.max_delay):
            frame = pcm[step * FRAME_SIZE:(step + 1) * FRAME_SIZE] if step < frames else silence
            audio, text_id = session.frame(frame)  # both of the frame completed now, or (None, None)
            if audio is not None:
                out_pcm.append(audio)
                text_ids.append(int(text_id))
                if on_step is not None:
                    on_step()
        if len(out_pcm) != frames or any(a.shape[0] != FRAME_SIZE for a in out_pcm):
            raise RuntimeError(f"expected {frames} output frames of {FRAME_SIZE} samples, got {len(out_pcm)}")
        return np.concatenate(out_pcm), text_ids


def sampling_for(files: ModelFiles, options: InferOptions) -> dict[str, Any]:
    """The sampling values the generator takes: options, then the LM config's lm_gen_config, then defaults."""
    from ..mlx.model import Sampling

    resolved = resolve_sampling(options.sampling.overrides(), read_config(files.config).lm_gen_config or {})
    known = {f.name for f in fields(Sampling)}
    return {key: value for key, value in resolved.items() if key in known}


def load(files: ModelFiles, options: InferOptions, device: str, quiet: bool = True) -> MlxModel:
    """The MLX files (LM config, weights, Mimi, tokenizer) loaded once; ``device`` is MLX's: gpu or cpu.

    What the engine prints while it loads is kept off stdout (see :func:`generation.captured_output`).
    """
    import mlx.core as mx

    from ..mlx.model import Sampling, read_lm_kwargs
    from ..mlx.session import Engine, Settings

    if files.config is None:
        raise CacheError("the MLX weights came without their LM config", "convert the model again")
    if device == "cpu":
        mx.set_default_device(mx.cpu)
    sampling = sampling_for(files, options)
    args = argparse.Namespace(lm_config=files.config, moshi_weight=files.moshi_weight,
                              mimi_weight=files.mimi_weight, tokenizer=files.tokenizer)
    with captured_output(quiet):
        engine = Engine(args, Settings(None, Sampling(**sampling)))
    context = read_lm_kwargs(files.config).get("context")
    return MlxModel(engine, engine.tokenizer, sampling, int(context) if context else None)
