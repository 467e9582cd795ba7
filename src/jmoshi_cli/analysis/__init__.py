"""Turn-taking statistics of two-speaker dialogues (`jmoshi analyze`, `jmoshi recordings --stats`).

:func:`analyze` turns paths into :class:`SetResult`: per-file :class:`FileResult` (events in VAD
windows and their :class:`~.stats.Figures`), the set's total, and the paths that gave nothing
(:class:`~.inputs.Problem`). How speech is found: :mod:`.vad`; the other voice's leak told apart:
:mod:`.leak`; the event definitions: :mod:`.events`.
"""

from __future__ import annotations

from .events import Params
from .inputs import Problem
from .outcome import FileResult, Outcome, SessionFigures, SetResult
from .pipeline import Request, analyze, analyze_file, run, session_figures

__all__ = ["FileResult", "Outcome", "Params", "Problem", "Request", "SessionFigures", "SetResult", "analyze",
           "analyze_file", "run", "session_figures"]
