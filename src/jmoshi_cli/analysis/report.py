"""`jmoshi analyze` and `recordings --stats` for people: Rich tables on the console (stderr)."""

from __future__ import annotations

from rich.table import Table

from ..console import console
from .events import JMOSHI, SPEAKERS, USER, Params
from .leak import LeakPath
from .outcome import FileResult, SetResult
from .stats import HEADLINE, Figures, Tally, headline

NAMES = {USER: "user", JMOSHI: "J-Moshi"}


def show_params(params: Params) -> None:
    p = params.as_json()
    console.print(f"[dim]{p['vad']}, {p['window_s'] * 1000:.0f} ms windows, speech from {p['threshold']} to "
                  f"{p['stop_threshold']}; IPUs split by silences >= {p['min_silence_ms']:g} ms, shorter than "
                  f"{p['min_ipu_ms']:g} ms dropped; leakage margin {p['leak_db']:g} dB "
                  f"({'off' if params.leak_db <= 0 else _leak_search(params)}); user = channel "
                  f"{p['channels'][USER]}, J-Moshi = channel {p['channels'][JMOSHI]}[/]", soft_wrap=True)


def _leak_search(params: Params) -> str:
    return f"each file's leak paths measured, delays up to {params.leak_lag_ms:g} ms"


def show_set(result: SetResult, title: str = "") -> None:
    for file in result.files:
        _show_figures(file.figures, str(file.path))
        _show_leak(file)
    total = result.total
    if total is not None and len(result.files) > 1:
        _show_figures(total, f"{title or 'all'}: {len(result.files)} files")
    show_problems(result)


def show_problems(result: SetResult) -> None:
    for problem in result.problems:
        console.print(f"[bold red]error:[/] {problem.message}", soft_wrap=True)


def _show_figures(f: Figures, title: str) -> None:
    console.print(_table(f, title))
    console.print(_summary(f), soft_wrap=True)


def _show_leak(file: FileResult) -> None:
    """The leak paths the analysis assumed for this file, when it measured any."""
    paths = file.events.leak
    if any(paths.get(who) for who in SPEAKERS):
        other = {USER: NAMES[JMOSHI], JMOSHI: NAMES[USER]}
        into = "; ".join(f"{other[who]}'s voice in the {NAMES[who]} channel: {_path(paths.get(who))}"
                         for who in SPEAKERS)
        console.print(f"leak paths: {into}", soft_wrap=True)


def _path(path: LeakPath | None) -> str:
    if path is None:
        return "not measured (too little speech of one side alone)"
    if not path.heard or path.delay_s is None:
        return f"not heard (under the noise, below {path.level_db:.0f} dB)"
    return f"{path.level_db:.1f} dB, {path.delay_s * 1000:.0f} ms late"


def _table(f: Figures, title: str) -> Table:
    table = Table(title=f"{title} ({f.duration_s:.1f} s)", title_justify="left")
    for column in ("event", "count", "seconds", "per min", "s / min"):
        table.add_column(column, justify="left" if column == "event" else "right")
    rows = [(f"IPU {NAMES[w]}", f.speakers[w].ipu) for w in SPEAKERS]
    rows += [(f"pause {NAMES[w]}", f.speakers[w].pause) for w in SPEAKERS]
    rows += [("gap", f.gap), ("overlap", f.overlap)]
    for name, tally in rows:
        table.add_row(name, *_cells(tally))
    return table


def _cells(t: Tally) -> tuple[str, ...]:
    return str(t.count), f"{t.total_s:.2f}", f"{t.count_per_min:.2f}", f"{t.s_per_min:.2f}"


def _summary(f: Figures) -> str:
    turns = ", ".join(f"{NAMES[w]} {f.speakers[w].turns}" for w in SPEAKERS)
    inside = ", ".join(f"{NAMES[w]} {f.speakers[w].inside_other}" for w in SPEAKERS)
    q = f.offsets.quartiles()
    offsets = f"median {q[1]:+.3f} s, quartiles {q[0]:+.3f} / {q[2]:+.3f} s" if q else "none"
    share = f"{f.jmoshi_share:.1%}" if f.jmoshi_share is not None else "-"
    return (f"turns: {turns}; IPUs inside the other's turn: {inside}\n"
            f"floor-transfer offsets ({len(f.offsets.values)}): {offsets}\nJ-Moshi's share of speaking time: {share}")


def _value(key: str, value: float | None) -> str:
    if value is None:
        return "-"
    if key == "jmoshi_share":
        return f"{value:.1%}"
    return f"{value:+.3f}" if key.endswith("_s") else f"{value:.2f}"


def _difference(key: str, a: float | None, b: float | None) -> str:
    if a is None or b is None:
        return "-"
    if key == "jmoshi_share":
        return f"{(a - b) * 100:+.1f} pt"
    return f"{a - b:+.3f}" if key.endswith("_s") else f"{a - b:+.2f}"


def show_comparison(first: SetResult, second: SetResult) -> None:
    """Both sets' headline figures side by side, and the first minus the second."""
    a = headline(first.total) if first.total else {}
    b = headline(second.total) if second.total else {}
    table = Table(title="set vs --against", title_justify="left")
    for column in ("figure", f"set ({len(first.files)} files)", f"against ({len(second.files)} files)",
                   "difference"):
        table.add_column(column, justify="left" if column == "figure" else "right")
    for key, label, _ in HEADLINE:
        table.add_row(label, _value(key, a.get(key)), _value(key, b.get(key)),
                      _difference(key, a.get(key), b.get(key)))
    console.print(table)


def show_session_stats(stats: list) -> None:
    """`recordings --stats`: the headline figures of each session (a list of SessionFigures)."""
    table = Table(title="turn-taking per session", title_justify="left")
    keys = ("ipu_per_min", "gap_per_min", "overlap_per_min", "fto_median_s", "jmoshi_share")
    for column in ("folder", "IPU/min", "gap/min", "overlap/min", "offset median (s)", "J-Moshi share"):
        table.add_column(column, justify="left" if column == "folder" else "right", overflow="fold")
    for item in stats:
        if item.figures is None:
            table.add_row(item.session.path.name, f"[red]{item.problem}[/]", "", "", "", "")
            continue
        values = headline(item.figures)
        table.add_row(item.session.path.name, *(_value(k, values[k]) for k in keys))
    console.print(table)
