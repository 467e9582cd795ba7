"""`analyze --plot DIR`: one timeline PNG per file, made to be read in print (grey scale, hatching).

Two lanes of IPUs (the user above, J-Moshi below), gaps as a hatched band between the lanes and
overlaps as a dark band across them, time in seconds. A long dialogue is folded into rows of up to
60 s (at most 10 rows: beyond 10 minutes the rows get longer).
"""

from __future__ import annotations

import math
from pathlib import Path

from ..errors import UsageError
from .events import JMOSHI, USER, Span
from .outcome import FileResult
from .vad import WINDOW_S

ROW_S = 60.0
MAX_ROWS = 10
LANES = {USER: 1.0, JMOSHI: 0.0}
LABELS = {USER: "user", JMOSHI: "J-Moshi"}
COLOURS = {USER: "#4d4d4d", JMOSHI: "#0072b2"}  # dark grey and a blue that stays dark in grey scale


def plot_all(folder: Path, files: list[FileResult]) -> list[Path]:
    """One PNG per file in ``folder`` (created if needed); returns their paths."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"--plot {folder}: cannot create the folder: {exc.strerror or exc}") from exc
    used: set[str] = set()
    return [plot_file(file, folder / f"{_unique(_name(file.path), used)}.png") for file in files]


def _name(path: Path) -> str:
    if path.name == "dialogue.wav":
        return path.parent.name or "dialogue"
    return path.name.removesuffix(".dialogue.wav") if path.name.endswith(".dialogue.wav") else path.stem


def _unique(name: str, used: set[str]) -> str:
    candidate, n = name, 1
    while candidate in used:
        n += 1
        candidate = f"{name}-{n}"
    used.add(candidate)
    return candidate


def plot_file(file: FileResult, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    duration = file.figures.duration_s
    rows = max(1, min(MAX_ROWS, math.ceil(duration / ROW_S)))
    row_s = max(duration / rows, 1.0)
    fig, axes = plt.subplots(rows, 1, figsize=(10, 0.4 + 1.3 * rows), squeeze=False)
    for row, ax in enumerate(axes[:, 0]):
        _draw_row(ax, file, row * row_s, min((row + 1) * row_s, duration), row_s)
    axes[-1, 0].set_xlabel("time (s)")
    axes[0, 0].legend(handles=_legend(), loc="lower left", bbox_to_anchor=(0, 1.02), ncol=4, frameon=False,
                      fontsize=8)
    fig.suptitle(_name(file.path), fontsize=9, x=0.01, ha="left")
    fig.tight_layout()
    try:
        fig.savefig(out, dpi=150)
    except OSError as exc:
        raise UsageError(f"--plot: cannot write {out}: {exc.strerror or exc}") from exc
    finally:
        plt.close(fig)
    return out


def _seconds(spans: list[Span]) -> list[tuple[float, float]]:
    return [(s.start * WINDOW_S, s.windows * WINDOW_S) for s in spans]


def _draw_row(ax, file: FileResult, start: float, end: float, row_s: float) -> None:
    events = file.events
    for who, lane in LANES.items():
        ax.broken_barh(_seconds(events.ipus[who]), (lane - 0.35, 0.7), facecolors=COLOURS[who])
    ax.broken_barh(_seconds(events.gaps), (0.35, 0.3), facecolors="white", edgecolors="black", hatch="///",
                   linewidth=0.5)
    ax.broken_barh(_seconds(events.overlaps), (-0.45, 1.9), facecolors="none", edgecolors="#d55e00", hatch="xxx",
                   linewidth=0.8)
    ax.set_xlim(start, start + row_s)
    ax.set_ylim(-0.6, 1.6)
    ax.set_yticks([LANES[USER], LANES[JMOSHI]], [LABELS[USER], LABELS[JMOSHI]])
    ax.grid(axis="x", color="0.85", linewidth=0.5)
    ax.set_axisbelow(True)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)


def _legend():
    from matplotlib.patches import Patch

    return [Patch(facecolor=COLOURS[USER], label="user IPU"), Patch(facecolor=COLOURS[JMOSHI], label="J-Moshi IPU"),
            Patch(facecolor="white", edgecolor="black", hatch="///", label="gap"),
            Patch(facecolor="none", edgecolor="#d55e00", hatch="xxx", label="overlap")]
