"""einops' torch backend without torch.compile's registration, where nothing is compiled.

On torch < 2.8, the first `einops.rearrange` of a torch tensor (moshi's attention, at the first step) imports
`einops._torch_specific`, which imports torch._dynamo to mark einops' functions as safe inside a compiled
graph: about 6 s of CPU on torch 2.6 (the documented runtime), checked with einops 0.8. Where torch.compile is
off (``NO_TORCH_COMPILE``, jmoshi's policy on the CPU, read by moshi the same way) nothing is compiled, and
:func:`skip_compile_registration` imports that module while torch._dynamo cannot be imported; einops then
skips the registration, as it does itself on torch 2.8+. Nothing else about einops changes.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import sys
import warnings
from importlib.abc import MetaPathFinder

from ..runtime import NO_COMPILE_ENV

DYNAMO = "torch._dynamo"


class _Refused(MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        if fullname == DYNAMO or fullname.startswith(DYNAMO + "."):
            raise ImportError(f"{fullname} is not needed: nothing is compiled")
        return None


def skip_compile_registration() -> bool:
    """Import einops' torch backend without torch._dynamo where compiling is off; True if it was."""
    if not os.environ.get(NO_COMPILE_ENV) or DYNAMO in sys.modules or "einops._torch_specific" in sys.modules:
        return False
    refused = _Refused()
    sys.meta_path.insert(0, refused)
    try:
        with warnings.catch_warnings(), contextlib.suppress(ImportError):  # no einops: moshi says so
            warnings.simplefilter("ignore", ImportWarning)  # einops' note that torch._dynamo is missing
            importlib.import_module("einops._torch_specific")
    finally:
        sys.meta_path.remove(refused)
    return DYNAMO not in sys.modules and "einops._torch_specific" in sys.modules
