"""Sampling J-Moshi: one value for what `--temp`, `--temp-text`, `--top-k`, `--top-k-text` and `--seed`
ask, checked once here, used by `serve` (both servers, every conversation) and `infer`; and the seed,
set the same way wherever a conversation or a file starts."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from .errors import UsageError

# moshi's LMGen defaults (moshi/models/lm.py), the last word after the flags and the LM config's lm_gen_config.
DEFAULTS: dict[str, Any] = {"temp": 0.8, "temp_text": 0.7, "top_k": 250, "top_k_text": 25}
UPSTREAM_SEED = 42424242  # what moshi.server seeds once at start (jmoshi's servers without --seed do the same)
SEED_LIMIT = 2**32  # moshi.server also seeds numpy, whose seeds stop there


@dataclass(frozen=True)
class Sampling:
    """The sampling asked for; a value left None comes from the model's config, else :data:`DEFAULTS`."""

    temp: float | None = None
    temp_text: float | None = None
    top_k: int | None = None
    top_k_text: int | None = None
    seed: int | None = None

    def __post_init__(self) -> None:
        for name in ("temp", "temp_text"):
            _check_number(name, getattr(self, name), integer=False)
        for name in ("top_k", "top_k_text", "seed"):
            _check_number(name, getattr(self, name), integer=True)
        if self.seed is not None and self.seed >= SEED_LIMIT:
            raise UsageError(f"--seed {self.seed} is too large", f"use a seed below {SEED_LIMIT}")

    def overrides(self) -> dict[str, Any]:
        """The values given (seed aside), which win over the LM config's."""
        return {key: getattr(self, key) for key in DEFAULTS if getattr(self, key) is not None}


def _check_number(name: str, value: float | None, integer: bool) -> None:
    if value is None:
        return
    if integer and (int(value) != value or value < 0):
        raise UsageError(f"{name} must be an integer >= 0, not {value}")
    if not integer and not (value >= 0 and math.isfinite(value)):
        raise UsageError(f"{name} must be a number >= 0, not {value}", hint="0 means greedy decoding")


def seed_all(seed: int) -> None:
    """Seed like moshi.server's own seed_all: torch (and CUDA), random, numpy."""
    import random

    import numpy as np
    import torch

    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)
    random.seed(seed)
    np.random.seed(seed)
