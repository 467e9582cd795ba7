"""`jmoshi infer`: J-Moshi answering audio files, one model load for many files, on PyTorch or MLX.

- pipeline.py: the command (inputs, model, one :class:`Session` over every file, results);
- inputs.py: which files, the user's audio, output names; outputs.py: the files written per input;
- generation.py: the PyTorch model and its streaming loop; mlx_engine.py: the same loop on jmoshi's MLX model.
"""

from __future__ import annotations

from .pipeline import FileResult, InferOptions, InferRequest, Session, run, summarize

__all__ = ["FileResult", "InferOptions", "InferRequest", "Session", "run", "summarize"]
