"""What an analysis gives: per file, per set, and per recorded session (data only; read by the
exporters, the plots and the tables)."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import reduce
from operator import add
from pathlib import Path

from .events import Events
from .inputs import Problem
from .stats import Figures


@dataclass(frozen=True)
class FileResult:
    path: Path
    events: Events
    figures: Figures


@dataclass
class SetResult:
    files: list[FileResult] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)

    @property
    def total(self) -> Figures | None:
        return reduce(add, (f.figures for f in self.files)) if self.files else None

    @property
    def exit_code(self) -> int:
        return max((p.exit_code for p in self.problems), default=0)


@dataclass
class Outcome:
    first: SetResult
    second: SetResult | None = None
    csv: Path | None = None
    plots: list[Path] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        return max(self.first.exit_code, self.second.exit_code if self.second else 0)


@dataclass(frozen=True)
class SessionFigures:
    """`recordings --stats`: one recorded session's figures, or why there are none."""

    session: object  # recordings.Session
    figures: Figures | None
    problem: str = ""
