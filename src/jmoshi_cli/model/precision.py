"""How the LM's weights are held: decided once per run, then carried as this one value.

`--quantize` is parsed into it, the backend and the device check turn AUTO into a concrete value,
and that value reaches the model preparation (which files), the child (through its contract) and
each recording's meta.json. Nobody works it out again from the loaded model.
"""

from __future__ import annotations

from enum import Enum

from ..errors import UsageError


class Precision(str, Enum):
    AUTO = "auto"  # the backend picks: the largest that fits the device
    BF16 = "bf16"
    INT8 = "int8"  # torch: moshi's QLinear (bitsandbytes); MLX: 8-bit, groups of 64
    INT4 = "int4"  # MLX only: 4-bit, groups of 32

    @property
    def label(self) -> str:
        return {"int8": "8-bit", "int4": "4-bit"}.get(self.value, self.value)


def parse(text: str | None, allowed: tuple[Precision, ...] = tuple(Precision)) -> Precision:
    """--quantize as a Precision the backend offers; one line naming the choices otherwise."""
    choices = ", ".join(p.value for p in allowed)
    try:
        chosen = Precision((text or "auto").lower())
    except ValueError:
        raise UsageError(f"--quantize {text!r} is not one of {choices}",
                         "int8 halves the GPU memory J-Moshi needs (~11 GB instead of ~19 GB)") from None
    if chosen not in allowed:
        raise UsageError(f"--quantize {chosen.value} is not offered by this backend (it offers {choices})",
                         "int4 is for the MLX backend (Apple Silicon); on torch use int8")
    return chosen
