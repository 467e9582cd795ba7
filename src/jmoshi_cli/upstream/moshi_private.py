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


def streaming_state_bytes(*modules: Any) -> int:
    """Bytes of every tensor held by the streaming states under `modules` (KV caches, convolution buffers,
    LMGen's token cache...), each storage once; the modules' own parameters and buffers are not counted.
    Reads each StreamingModule's private `_streaming_state` (checked on 0.2.2 and 0.2.13)."""
    import torch
    from moshi.modules.streaming import StreamingModule

    weights = {t.untyped_storage().data_ptr() for m in modules for t in [*m.parameters(), *m.buffers()]}
    storages: dict[int, int] = {}
    seen: set[int] = set()

    def walk(obj: Any, depth: int) -> None:
        if depth > 8 or obj is None or id(obj) in seen:
            return
        seen.add(id(obj))
        if isinstance(obj, torch.Tensor):
            storage = obj.untyped_storage()
            if storage.data_ptr() not in weights:
                storages[storage.data_ptr()] = storage.nbytes()
        elif isinstance(obj, (list, tuple)):
            for item in obj:
                walk(item, depth + 1)
        elif isinstance(obj, dict):
            for item in obj.values():
                walk(item, depth + 1)
        elif isinstance(obj, torch.nn.Module) or callable(obj):
            return  # modules are walked on their own; graphs and callbacks hold no state of their own
        elif hasattr(obj, "__dict__"):
            for item in vars(obj).values():
                walk(item, depth + 1)

    for module in modules:
        for sub in module.modules():
            if isinstance(sub, StreamingModule) and sub._streaming_state is not None:
                walk(sub._streaming_state, 0)
    return sum(storages.values())
