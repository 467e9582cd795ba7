"""From paths to figures: each file read, its speech found, its events and figures computed; the set,
the set to compare with, and the CSV and plots asked for."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from ..errors import JMoshiError
from .events import Events, Params, find_events
from .inputs import Problem, collect, read_dialogue
from .outcome import FileResult, Outcome, SessionFigures, SetResult
from .stats import figures

if TYPE_CHECKING:
    import numpy as np


def analyze_file(path: Path, params: Params) -> FileResult:
    """One stereo file's events and figures; AudioReadError or DialogueError if it cannot be read."""
    audio = read_dialogue(path)
    events = find_in_audio(audio.pcm, audio.sample_rate, params)
    return FileResult(Path(path), events, figures(events, audio.duration_s))


def find_in_audio(pcm: np.ndarray, sample_rate: int, params: Params) -> Events:
    """The events of one stereo dialogue, (2, samples) at any rate."""
    from . import vad
    from .leak import Levels

    windows = vad.windows_of(vad.to_vad_rate(pcm, sample_rate))
    return find_events(vad.speech_probs(windows), Levels.of(windows), params)


def analyze(paths: list[Path], params: Params, on_file: Callable[[Path], None] | None = None) -> SetResult:
    """Every file the paths stand for; a file that fails is recorded and the others go on."""
    files, problems = collect(paths)
    result = SetResult(problems=problems)
    for path in files:
        if on_file is not None:
            on_file(path)
        try:
            result.files.append(analyze_file(path, params))
        except Exception as exc:  # noqa: BLE001 - one file's failure must not lose the others' figures
            result.problems.append(_problem(path, exc))
    return result


def _problem(path: Path, exc: Exception) -> Problem:
    """One file's failure as one line naming the file: the package's errors as they say, a lack of memory
    as such, anything else as an internal error with its type and message, to be reported."""
    if isinstance(exc, JMoshiError):
        message = exc.message if str(path) in exc.message else f"{path}: {exc.message}"
        return Problem(path, message, exc.exit_code)
    if isinstance(exc, MemoryError):
        return Problem(path, f"{path}: not enough memory to analyse it", JMoshiError.exit_code)
    first_line = next(iter(str(exc).splitlines()), "")
    return Problem(path, f"{path}: internal error: {type(exc).__name__}: {first_line} (please report it)",
                   JMoshiError.exit_code)


@dataclass(frozen=True)
class Request:
    """What `jmoshi analyze` was asked: the set, an optional set to compare with, and where to write."""

    paths: list[Path]
    params: Params = field(default_factory=Params)
    against: list[Path] = field(default_factory=list)
    csv: Path | None = None
    plot: Path | None = None


def run(request: Request, on_file: Callable[[Path], None] | None = None) -> Outcome:
    """Analyse the set (and the --against set), then write the CSV and the plots if asked."""
    outcome = Outcome(analyze(request.paths, request.params, on_file))
    if request.against:
        outcome.second = analyze(request.against, request.params, on_file)
    if request.csv is not None:
        from .export import write_csv

        outcome.csv = write_csv(request.csv, outcome.first)
    if request.plot is not None and outcome.first.files:
        from .plot import plot_all

        outcome.plots = plot_all(request.plot, outcome.first.files)
    return outcome


def session_figures(sessions: list, params: Params, on_file: Callable[[Path], None] | None = None
                    ) -> list[SessionFigures]:
    from ..recording.format import DIALOGUE

    out = []
    for session in sessions:
        path = session.path / DIALOGUE
        if on_file is not None:
            on_file(path)
        try:
            out.append(SessionFigures(session, analyze_file(path, params).figures))
        except Exception as exc:  # noqa: BLE001 - one session's failure must not lose the others' figures
            out.append(SessionFigures(session, None, _problem(path, exc).message))
    return out
