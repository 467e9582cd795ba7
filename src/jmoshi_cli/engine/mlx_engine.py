"""The MLX backend's engine: one slot over mlx/server.py's model (moshi_mlx's LM, rustymimi's Mimi).

moshi_mlx's generator holds one conversation, so this engine has one slot. Opening it starts a fresh
:class:`~jmoshi_cli.mlx.session.Session` (``Engine.start``: the LM's caches reset, a new Mimi, MLX's
random generator seeded again when there is a seed); a frame fed is stepped at the next tick through
``Session.frame``; closing frees the slot (its state stays until the next open replaces it). Like every
engine it is used from the server's one model thread, where every MLX and Mimi call runs.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import TYPE_CHECKING, Any

import numpy as np

from ..audio_io import FRAME_SIZE
from .base import NOTHING_YET, Facts, Said, SlotsFull

if TYPE_CHECKING:  # pragma: no cover
    from ..mlx.session import Engine as Model
    from ..mlx.session import Session

SLOT = 0
RUNTIME = ("mlx", "moshi_mlx", "rustymimi", "sphn", "aiohttp", "jmoshi")


class MlxEngine:
    """One conversation at a time on a loaded MLX model (`device`: MLX's, cpu or gpu)."""

    slots = 1

    def __init__(self, model: Model, device: str):
        self.model = model
        self.facts = facts(model, device)
        self.session: Session | None = None
        self.pending: np.ndarray | None = None

    def open(self) -> int:
        """The slot with a fresh state; SlotsFull while a conversation holds it."""
        if self.session is not None:
            raise SlotsFull("the MLX engine's one slot is in a conversation")
        self.session = self.model.start()
        return SLOT

    def feed(self, slot: int, pcm: np.ndarray) -> None:
        """The slot's next 80 ms of the user's audio (1920 float32 samples at 24 kHz)."""
        if slot != SLOT or self.session is None:
            raise ValueError(f"slot {slot} is not open")
        if self.pending is not None:
            raise ValueError(f"slot {slot} already has a frame waiting for the next step")
        frame = np.asarray(pcm, dtype=np.float32).reshape(-1)
        if frame.shape[0] != FRAME_SIZE:
            raise ValueError(f"a frame is {FRAME_SIZE} samples, not {frame.shape[0]}")
        self.pending = frame

    def step(self) -> dict[int, Said]:
        """The frame waiting, through the model: J-Moshi's voice and text once it has any."""
        if self.session is None or self.pending is None:
            return {}
        pcm, self.pending = self.pending, None
        out, text_id = self.session.frame(pcm)
        if out is None:
            return {SLOT: NOTHING_YET}
        return {SLOT: Said(out, int(text_id), None)}

    def close(self, slot: int) -> None:
        """The slot is free again."""
        if slot == SLOT:
            self.session, self.pending = None, None


def facts(model: Model, device: str) -> Facts:
    """What the server and the recorder are told of the model (meta.json's device, dtype, sampling...)."""
    from ..mlx.session import describe
    from ..runtime import versions

    delays = model.lm.cfg.audio_delays
    quantization: Any = model.quantization
    dtype = "bfloat16" if quantization is None else f"bfloat16, {describe(quantization)} weights"
    return Facts(model.tokenizer, max(delays) if delays else 0, asdict(model.settings.sampling), device, dtype,
                 versions(RUNTIME))
