"""Per-conversation random generators for moshi's sampling (checked on moshi 0.2.13).

moshi samples a whole batch from torch's one generator: `moshi.utils.sampling.multinomial` draws the
exponential noise of every row at once (sample_token, sample_top_k and sample_top_p call it through
the module's globals; LMGen's text step and depformer step call sample_token with logits whose rows
are the batch's slots, B first). With `serve --seed`, each conversation of a batched server must
draw from its own generator, seeded at its start, so that the same input gives the same words and
voice alone or beside others. Here `multinomial` is replaced once by one that, inside
`per_slot(generators)`, draws each slot's rows from that slot's generator (a slot given None, one
not stepped this time, draws from torch's default generator and its rows are discarded by the
exec mask); outside it, moshi's own function runs unchanged.

CUDA graphs replay captured kernels without running this Python: a seeded batched server runs
without them (NO_CUDA_GRAPH=1, set by the conversations child).
"""

from __future__ import annotations

import contextlib
import threading
from typing import Any, Iterator, Sequence

CHECKED = ("0.2.13",)

_local = threading.local()
_installed: dict[str, Any] = {}


def install() -> None:
    """Replace moshi's multinomial (once per process)."""
    if _installed:
        return
    from moshi.utils import sampling

    original = sampling.multinomial
    _installed["original"] = original

    def multinomial(input, num_samples, replacement=False, *, generator=None):
        generators = getattr(_local, "generators", None)
        if generators is None or replacement or num_samples != 1 or generator is not None:
            return original(input, num_samples, replacement, generator=generator)
        return _per_slot_multinomial(input, generators)

    sampling.multinomial = multinomial


@contextlib.contextmanager
def per_slot(generators: Sequence[Any]) -> Iterator[None]:
    """Within this block (on this thread), row group i of every draw comes from generators[i]."""
    _local.generators = list(generators)
    try:
        yield
    finally:
        _local.generators = None


def _per_slot_multinomial(input: Any, generators: list[Any]) -> Any:
    import torch

    rows = input.reshape(-1, input.shape[-1])
    slots = len(generators)
    if rows.shape[0] % slots:
        raise RuntimeError(f"jmoshi: moshi sampled {rows.shape[0]} rows for {slots} conversations; this moshi "
                           f"samples differently from {', '.join(CHECKED)}")
    per = rows.shape[0] // slots
    noise = [torch.empty((per, rows.shape[-1]), dtype=rows.dtype, device=rows.device).exponential_(1, generator=g)
             for g in generators]
    q = rows / torch.cat(noise)
    return q.argmax(dim=-1, keepdim=True).reshape(*input.shape[:-1], 1)
