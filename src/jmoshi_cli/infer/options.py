"""How `jmoshi infer` runs the model over each file (its own module: the backends' loaders read it too)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from .. import audio_io
from ..errors import UsageError
from ..sampling import Sampling


@dataclass(frozen=True)
class InferOptions:
    """How to run the model over each file; the sampling as asked (None values: the LM config's, else LMGen's)."""

    device: str = "cuda"
    half: bool = False
    channel: str = "left"
    sampling: Sampling = field(default_factory=Sampling)
    quantize: str = "auto"  # --quantize as given: auto, bf16 or int8 (precision.py)
    batch: int | None = 1  # inputs at once on one loaded model (infer/batched.py); None: as many as fit

    def __post_init__(self) -> None:
        if self.channel not in audio_io.CHANNELS:
            raise UsageError(f"unknown channel {self.channel!r}", hint=f"use one of: {', '.join(audio_io.CHANNELS)}")
        if not (self.device in ("auto", "cpu", "cuda") or re.fullmatch(r"cuda:\d+", self.device)):
            raise UsageError(f"unknown device {self.device!r}", hint="use cuda, cuda:N or cpu")
