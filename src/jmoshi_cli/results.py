"""What each command returns: one value per command, rendered once, for people or as `--json`.

A result knows its exit code, its JSON (the shape `--json` prints, pinned by tests/test_results.py)
and the paths it puts on stdout without `--json`. `render.show` draws it for people, on stderr.
Commands build one and hand it to `cli.finish`; nothing else decides what is printed where.

Every `--json` document is one object that starts with `"jmoshi_result_version"` (pipx's
`pipx_spec_version` is the model): a script checks it before reading on. A change that drops, renames
or retypes a field raises it; a new field does not.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

RESULT_VERSION = 1

if TYPE_CHECKING:  # the types only: a command imports what it needs when it runs
    from .analysis import Outcome, Params, SessionFigures
    from .cache.artifacts import Entry, Plan
    from .doctor import Check
    from .infer import FileResult
    from .model.derived import Rechecked
    from .recording.store import Session
    from .variants import Catalogue, Variant


@dataclass
class DoctorResult:
    checks: list[Check]
    variant: Variant

    @property
    def exit_code(self) -> int:
        from .doctor import FAIL

        return 1 if any(c.status is FAIL for c in self.checks) else 0

    def to_json(self) -> dict:
        from .doctor import as_json

        return as_json(self.checks, self.variant)

    def paths(self) -> list[Path]:
        return []


@dataclass
class VariantsResult:
    catalogue: Catalogue
    exit_code: int = 0

    def to_json(self) -> dict:
        return {"variants": [asdict(v) | {"default": v.name == self.catalogue.default}
                             for v in self.catalogue.variants.values()]}

    def paths(self) -> list[Path]:
        return []


@dataclass
class DownloadResult:
    plans: list[Plan]  # one per variant
    dry_run: bool = False
    exit_code: int = 0

    def to_json(self) -> dict:
        return {"variants": [{"variant": p.variant.name, "repo": p.variant.repo, "missing_bytes": p.missing_bytes,
                 "files": [{"role": e.artifact.role, "repo": e.artifact.repo, "file": e.artifact.filename,
                            "commit": e.artifact.commit, "size": e.artifact.size, "sha256": e.artifact.sha256,
                            "status": e.status.value, "path": str(e.path) if e.path else None} for e in p.entries]}
                for p in self.plans]}

    def paths(self) -> list[Path]:
        if self.dry_run:
            return []
        return [e.path for p in self.plans for e in p.entries if e.path is not None]


@dataclass
class VerifyResult:
    report: list[tuple[Plan, list[Entry]]]  # each variant's plan and its entries as verified
    # variant name -> the files jmoshi made from its LM and Mimi (int8, MLX), as re-hashed
    derived: dict[str, list[Rechecked]] = field(default_factory=dict)

    @property
    def exit_code(self) -> int:
        hub = any(not e.status.usable for _, entries in self.report for e in entries)
        return 1 if hub or any(not made.intact for rows in self.derived.values() for made in rows) else 0

    def to_json(self) -> dict:
        return {"variants": [{"variant": p.variant.name, "files": [
            {"file": e.artifact.filename, "repo": e.artifact.repo, "status": e.status.value, "detail": e.detail,
             "path": str(e.path) if e.path else None} for e in entries]
            + [_derived_row(made) for made in self.derived.get(p.variant.name, [])]} for p, entries in self.report]}

    def paths(self) -> list[Path]:
        return []


def _derived_row(made: Rechecked) -> dict:
    """A file jmoshi made, as a hub file's row (the repo of the file it was made from) with two more fields."""
    source = made.made_from
    return {"file": made.path.name, "repo": source.repo if source else "", "status": made.status.value,
            "detail": made.detail, "path": str(made.path), "kind": made.kind,
            "made_from": source.filename if source else None}


@dataclass
class RecordingsResult:
    folder: Path
    sessions: list[Session]
    figures: list[SessionFigures] | None = None  # with --stats
    exit_code: int = 0

    def to_json(self) -> dict:
        rows = [s.summary() for s in self.sessions]
        for row, item in zip(rows, self.figures or [], strict=False):
            row["stats"] = item.figures.as_json() if item.figures else {"error": item.problem}
        return {"sessions": rows}

    def paths(self) -> list[Path]:
        return []


@dataclass
class SelftestResult:
    server: str = "moshi.server"
    ready_s: float = 0.0
    handshake_s: float = 0.0
    audio_samples: int = 0
    text_pieces: list[str] = field(default_factory=list)
    frame_ms: list[float] = field(default_factory=list)
    sent_frames: int = 0
    exit_code: int = 0  # a failed selftest raises SelftestError (exit 1) with the server's last lines

    @property
    def mean_frame_ms(self) -> float:
        return sum(self.frame_ms) / len(self.frame_ms) if self.frame_ms else 0.0

    def to_json(self) -> dict:
        from .audio_io import SAMPLE_RATE

        return {"ok": True, "server": self.server, "ready_s": round(self.ready_s, 2),
                "handshake_s": round(self.handshake_s, 3), "audio_samples": self.audio_samples,
                "audio_s": round(self.audio_samples / SAMPLE_RATE, 2), "text_pieces": len(self.text_pieces),
                "frames_sent": self.sent_frames, "ms_per_frame": round(self.mean_frame_ms, 1)}

    def paths(self) -> list[Path]:
        return []


@dataclass
class InferResult:
    files: list[FileResult]

    @property
    def exit_code(self) -> int:
        return 0 if all(r.ok for r in self.files) else 1

    @property
    def totals(self) -> dict[str, Any]:
        from .infer import summarize

        return summarize(self.files)

    def to_json(self) -> dict:
        return {"files": [{"source": str(r.source), "ok": r.ok, "error": r.error, "audio_s": r.audio_s,
                 "compute_s": r.compute_s, "rtf": r.rtf, "note": r.note, "channel": r.channel, "frames": r.frames,
                 "segments": r.segments, "text": r.text, "outputs": {k: str(v) for k, v in r.outputs.items()}}
                for r in self.files]}

    def paths(self) -> list[Path]:
        return [path for r in self.files for path in r.outputs.values()]


@dataclass
class AnalyzeResult:
    outcome: Outcome
    params: Params

    @property
    def exit_code(self) -> int:
        return self.outcome.exit_code

    def to_json(self) -> dict:
        from .analysis.export import analyze_json

        return analyze_json(self.outcome, self.params)

    def paths(self) -> list[Path]:
        return [p for p in [self.outcome.csv, *self.outcome.plots] if p is not None]


# What `cli.finish` prints: a command returning anything else is a type error, and so is a view in
# render.py that reads a field its result no longer has.
Result = Union[DoctorResult, VariantsResult, DownloadResult, VerifyResult, RecordingsResult, SelftestResult,
               InferResult, AnalyzeResult]
