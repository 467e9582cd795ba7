"""`jmoshi infer`: J-Moshi answering audio files, one model load for many files, on PyTorch or MLX.

- pipeline.py: the command (inputs, model, one :class:`Session` over every file, results); options.py: how;
- batched.py: `--batch N`, inputs N at a time through the batched engine (engine/torch_batched.py);
- inputs.py: which files, the user's audio, output names; outputs.py: the files written per input;
- generation.py: the PyTorch model and its streaming loop; mlx_engine.py: the same loop on jmoshi's MLX model;
  each backend loads its own (`Backend.load_for_infer`).

The face below is loaded on first use: `analyze` reads `inputs.py` (the output names) and must not load
the pipeline and the model code with it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .options import InferOptions
    from .pipeline import FileResult, InferRequest, Session, run, summarize

__all__ = ["FileResult", "InferOptions", "InferRequest", "Session", "run", "summarize"]


def __getattr__(name: str) -> Any:
    if name == "InferOptions":
        from .options import InferOptions

        return InferOptions
    if name in __all__:
        from . import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
