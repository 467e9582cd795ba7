"""Building moshi's modules without filling at random the weights that are loaded next.

moshi's loaders build a module, then load its weights from the file. torch still runs each layer's random
initialisation first (`reset_parameters`, moshi's `_init_weights`), and throws the result away:

- The LM: moshi 0.2.4+ builds it on the meta device, where there is nothing to fill, but torch's meta
  `normal_` is Python wrapped in `_disable_dynamo`, whose first call imports torch._dynamo: about 1.2 s of
  CPU at every load (checked on torch 2.9.1), for a value nobody reads.
- Mimi: built on its device with real tensors, every weight drawn at random, then each one overwritten by a
  strict `load_state_dict` (a weight missing from the file is an error): about 0.4 s of CPU on the CPU.

Inside `no_random_init`, torch.nn.init's functions leave a tensor as it is: on the meta device always, and
everywhere when the caller loads every weight strictly next. The numbers that come out are the file's,
bit for bit (tests/test_torch_init.py). moshi 0.2.2 builds its LM on the device and loads it strictly too,
but a LoRA built there without weights would keep its initial values: the LM gets the meta-only form.
Loading runs on one thread, before anything else uses torch.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any, Callable, Iterator

# Every public in-place initialiser of torch.nn.init (torch 2.2 to 2.9).
INITIALISERS = ("uniform_", "normal_", "trunc_normal_", "constant_", "ones_", "zeros_", "eye_", "dirac_",
                "xavier_uniform_", "xavier_normal_", "kaiming_uniform_", "kaiming_normal_", "orthogonal_",
                "sparse_")


@contextlib.contextmanager
def no_random_init(*, everywhere: bool = False) -> Iterator[None]:
    """torch.nn.init leaves tensors on the meta device as they are, and every tensor when `everywhere`."""
    from torch.nn import init

    saved = {name: getattr(init, name) for name in INITIALISERS if hasattr(init, name)}
    for name, initialiser in saved.items():
        setattr(init, name, _skipping(initialiser, everywhere))
    try:
        yield
    finally:
        for name, initialiser in saved.items():
            setattr(init, name, initialiser)


def _skipping(initialiser: Callable[..., Any], everywhere: bool) -> Callable[..., Any]:
    @functools.wraps(initialiser)
    def skipped(tensor, *args, **kwargs):
        if everywhere or tensor.is_meta:
            return tensor
        return initialiser(tensor, *args, **kwargs)

    return skipped
