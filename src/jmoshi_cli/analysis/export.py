"""The results as data: the JSON that `analyze --json` prints, and `--csv`'s one row per file."""

from __future__ import annotations

import csv
import io
from pathlib import Path

from ..errors import UsageError
from ..fsutil import atomic_write_text
from .events import SPEAKERS, Events, Params
from .leak import LeakPath
from .outcome import SetResult
from .stats import HEADLINE, Figures, headline


def set_json(result: SetResult, params: Params) -> dict:
    """``{"files": [...], "total": {...}, "params": {...}, "problems": [...]}``; total is null without files."""
    total = result.total
    files = [{"path": str(f.path), **f.figures.as_json(),
              "floor_transfer_offsets_s": [round(v, 3) for v in f.figures.offsets.values],
              "leak": leak_json(f.events)} for f in result.files]
    return {"files": files, "total": total.as_json() if total else None, "params": params.as_json(),
            "problems": [{"path": str(p.path), "error": p.message, "exit_code": p.exit_code}
                         for p in result.problems]}


def leak_json(events: Events) -> dict:
    """The other voice's measured path into each speaker's channel, every key present (null when it was not
    measured: the rule off, or too little one-sided speech)."""
    empty = dict.fromkeys(LeakPath(0.0, None, False, 0.0).as_json())
    return {who: path.as_json() if (path := events.leak.get(who)) else empty for who in SPEAKERS}


def comparison_json(first: SetResult, second: SetResult) -> dict:
    """Each headline figure for both sets and their difference (first minus second)."""
    a, b = _headline_or_none(first.total), _headline_or_none(second.total)
    return {key: {"set": a[key], "against": b[key], "difference": _difference(a[key], b[key])}
            for key, _, _ in HEADLINE}


def _headline_or_none(total: Figures | None) -> dict:
    return headline(total) if total else dict.fromkeys(k for k, _, _ in HEADLINE)


def _difference(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


def _flatten(data: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, name + "_"))
        elif not isinstance(value, list):
            out[name] = value
    return out


def csv_text(result: SetResult) -> str:
    """One row per analysed file: every figure of its JSON, nested names joined by ``_``."""
    rows = [_flatten({"path": str(f.path), **f.figures.as_json(), "leak": leak_json(f.events)}) for f in result.files]
    out = io.StringIO()
    if rows:
        writer = csv.DictWriter(out, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    return out.getvalue()


def write_csv(path: Path, result: SetResult) -> Path:
    try:
        atomic_write_text(Path(path), csv_text(result))
    except OSError as exc:
        raise UsageError(f"--csv {path}: cannot write: {exc.strerror or exc}") from exc
    return Path(path)


def analyze_json(outcome, params: Params) -> dict:
    """`analyze --json`: the set, and with --against the other set and the comparison."""
    out = set_json(outcome.first, params)
    if outcome.second is not None:
        out["against"] = set_json(outcome.second, params)
        out["comparison"] = comparison_json(outcome.first, outcome.second)
    out["outputs"] = {"csv": str(outcome.csv) if outcome.csv else None, "plots": [str(p) for p in outcome.plots]}
    return out
