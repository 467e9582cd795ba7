"""moshi's int8 layers and bitsandbytes: imported only for int8 weights, and without torch.compile's start-up.

- moshi 0.2.2's `quantize.linear` and `quantize.multi_linear` (the LM's linear layers, at every step)
  import bitsandbytes before looking at the weights, so a bfloat16 model imports it too, at its first
  step. bitsandbytes 0.45 imports torch._dynamo when imported (`torch.utils._triton.has_triton`): about
  6 s of CPU in every server child and `jmoshi infer` (bitsandbytes 0.45.5, torch 2.6). Under
  :func:`plain_layers_skip_bitsandbytes` a layer without int8 weights goes straight to torch, as moshi
  0.2.5+ does; an int8 one still goes through moshi's own function.
- bitsandbytes 0.46+ wraps its optimizers' updates in torch.compile when imported, which imports
  torch._dynamo and torch._inductor: about 2.5 s of CPU (0.49.2, torch 2.9.1) for functions that train,
  which jmoshi never calls. :func:`import_bitsandbytes` imports it while torch.compile hands each function
  back as it is, which is also what bitsandbytes does itself when compiling fails.

Checked on moshi 0.2.2 and 0.2.13, bitsandbytes 0.45.5 and 0.49.2 (tests/test_moshi_int8.py).
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import sys
from types import ModuleType
from typing import Any, Callable


def prepare(int8: bool) -> None:
    """Before moshi loads an LM: plain layers skip bitsandbytes, and for int8 weights it is imported first, without
    torch.compile (moshi's QLinear would import it while the LM loads). Its absence is moshi's error to raise."""
    plain_layers_skip_bitsandbytes()
    if int8:
        with contextlib.suppress(ImportError):
            import_bitsandbytes()


def import_bitsandbytes() -> ModuleType:
    """bitsandbytes, imported without setting up torch.compile for its optimizers. Raises ImportError."""
    if "bitsandbytes" in sys.modules:
        return sys.modules["bitsandbytes"]
    import torch

    compile_ = torch.compile
    torch.compile = _uncompiled  # type: ignore[assignment]
    try:
        return importlib.import_module("bitsandbytes")
    finally:
        torch.compile = compile_


def _uncompiled(model: Callable[..., Any] | None = None, **_options: Any) -> Any:
    return model if model is not None else (lambda function: function)


def plain_layers_skip_bitsandbytes() -> bool:
    """Where moshi imports bitsandbytes for every layer (0.2.2), only int8 layers do; True if it did."""
    from moshi.utils import quantize as module

    quantize: Any = module  # 0.2.2's functions, which later versions do not have
    if not hasattr(quantize, "multi_linear") or hasattr(quantize.linear, "__wrapped__"):
        return False
    quantize.linear = _plain_linear(quantize, quantize.linear)
    quantize.multi_linear = _plain_multi_linear(quantize, quantize.multi_linear)
    return True


def _plain_linear(quantize: Any, linear: Callable[..., Any]) -> Callable[..., Any]:
    from torch.nn import functional

    @functools.wraps(linear)
    def patched(module, x, name="weight"):
        if quantize.is_quantized(module, name):
            return linear(module, x, name)
        return functional.linear(x, getattr(module, name))

    return patched


def _plain_multi_linear(quantize: Any, multi_linear: Callable[..., Any]) -> Callable[..., Any]:
    import torch
    from torch.nn import functional

    @functools.wraps(multi_linear)
    def patched(num_steps, schedule, module, x, offset, name="weight"):
        if quantize.is_quantized(module, name):
            return multi_linear(num_steps, schedule, module, x, offset, name)
        # moshi 0.2.2's own loop for weights that are not int8: one linear per time step, shared by schedule.
        weight = getattr(module, name)
        count = num_steps if schedule is None else max(schedule) + 1
        weight = weight.view(count, -1, weight.shape[1])
        steps = [t + offset if schedule is None else schedule[t + offset] for t in range(x.shape[1])]
        return torch.stack([functional.linear(x[:, t], weight[index]) for t, index in enumerate(steps)], 1)

    return patched
