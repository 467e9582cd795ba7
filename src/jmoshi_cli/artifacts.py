"""Where a variant's files are in the Hugging Face cache, what is missing, and whether it is intact."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ModelFiles:
    """Local paths of everything the moshi loaders need for one model."""

    moshi_weight: Path
    mimi_weight: Path
    tokenizer: Path
    # config.json when the repo has one; None means moshi's built-in 7B config (J-Moshi's case).
    config: Path | None = None
