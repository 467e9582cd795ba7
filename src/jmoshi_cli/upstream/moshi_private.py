"""Private names of moshi that jmoshi reads (checked on moshi 0.2.2 and 0.2.13: the same values).

moshi builds J-Moshi from `loaders._lm_kwargs` when a repo has no config.json, which is J-Moshi's
case; jmoshi needs the same numbers to check fine-tunes, write configs and make int8 and MLX
weights. The test model is built from the Mimi kwargs so that it has upstream's architecture.
"""

from __future__ import annotations

import json
from typing import Any

CHECKED = ("0.2.2", "0.2.13")


def builtin_lm_kwargs() -> dict[str, Any]:
    """moshi's built-in Moshi-7B LM kwargs, deep-copied and JSON-clean (tuples become lists)."""
    from moshi.models import loaders

    return json.loads(json.dumps(loaders._lm_kwargs))


def mimi_kwargs() -> dict[str, dict[str, Any]]:
    """The kwargs moshi's get_mimi builds Mimi with: SEANet, its transformers, its quantizer."""
    from moshi.models import loaders

    return {"seanet": dict(loaders._seanet_kwargs), "transformer": dict(loaders._transformer_kwargs),
            "quantizer": dict(loaders._quantizer_kwargs)}
