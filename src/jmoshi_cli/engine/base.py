"""What an engine is: one loaded model that steps conversations held in slots.

The conversation server (conversations/) asks an engine for nothing else: open a slot (its state
reset, the others untouched), feed it the user's next 80 ms, step every slot that has a frame, close
it. An engine is used from one thread only (the server's model thread).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np


@dataclass(frozen=True)
class Said:
    """What one step gave a slot: J-Moshi's 80 ms of voice and its text token, once the model has any."""

    pcm: np.ndarray | None
    text_id: int | None
    codes: np.ndarray | None = None  # the audio codes the voice was decoded from (dep_q,), where known


NOTHING_YET = Said(None, None, None)


class SlotsFull(Exception):
    """Every slot holds a conversation."""


@dataclass(frozen=True)
class Facts:
    """What the server and the recorder need to know of the model behind an engine."""

    tokenizer: Any  # sentencepiece: id_to_piece, is_control, get_piece_size
    max_delay: int  # frames between a user's frame and the voice that answers it
    sampling: dict  # temp, temp_text, top_k, top_k_text as the engine samples
    device: str | None
    dtype: str | None
    runtime: dict  # the packages that run it, for meta.json


class Engine(Protocol):
    slots: int
    facts: Facts

    def open(self) -> int:
        """A free slot with a fresh state; SlotsFull when every slot is taken."""

    def feed(self, slot: int, pcm: np.ndarray) -> None:
        """The slot's next frame of the user's audio (FRAME_SIZE float32 samples at 24 kHz)."""

    def step(self) -> dict[int, Said]:
        """Step every slot that has a frame waiting; what each gave back."""

    def close(self, slot: int) -> None:
        """The slot is free again."""
