"""Turn-taking events from two channels' VAD scores, as dGSLM defines them (Nguyen et al., TACL 2023).

Everything here counts in VAD windows (32 ms, :data:`~jmoshi_cli.analysis.vad.WINDOW_S`) and turns
into seconds only at the end, so that "ends where the other starts" is an exact comparison.

1. Speech per window: Silero's hysteresis. A channel starts speaking at a score >= ``threshold`` and
   stops at a score < ``threshold - 0.15`` (the package's own ``get_speech_timestamps`` rule).
2. Leakage: one voice heard, quieter and perhaps late, on the other's microphone. Each channel's speech
   is checked against the leak of the other's voice that the audio explains, the leak path (level and
   delay) being measured per file: :mod:`.leak`. Speech the leak explains within ``leak_db`` is not
   that channel's; real speech over the other's, louder than the leak would be, still is.
3. IPUs: each channel's speech with silences shorter than ``min_silence_ms`` (200) filled; IPUs shorter
   than ``min_ipu_ms`` are dropped (a click, a breath).
4. Over the two channels: an overlap is time when both speak; a silence (neither speaks) between the
   first and the last IPU is a pause of a speaker when that speaker's IPUs bound it on both sides,
   else a gap.
5. Floor: IPUs in order of start. An IPU of the other speaker that ends before the floor holder's
   latest IPU does is inside the holder's turn (a backchannel, or an interruption that did not take
   the floor); any other takes the floor, and its floor-transfer offset is its start minus the end of
   the holder's latest IPU (negative: it started in overlap). A turn is a speaker's hold of the floor.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from .leak import LeakPath, Levels, own_speech
from .vad import VAD_RATE, WINDOW_S, vad_version

USER, JMOSHI = "user", "jmoshi"
SPEAKERS = (USER, JMOSHI)
HYSTERESIS = 0.15  # Silero's gap between its start and stop thresholds


@dataclass(frozen=True)
class Params:
    """The knobs of the analysis, printed with each report and stored in its JSON."""

    threshold: float = 0.5
    min_silence_ms: float = 200.0
    min_ipu_ms: float = 100.0
    leak_db: float = 10.0  # how far above the predicted leak speech must be; 0 turns the leakage rule off
    leak_lag_ms: float = 300.0  # the longest leak delay looked for (an echo through a loudspeaker)
    jmoshi_channel: int = 1

    def as_json(self) -> dict:
        return {"vad": vad_version(), "vad_rate_hz": VAD_RATE, "window_s": WINDOW_S, "threshold": self.threshold,
                "stop_threshold": round(self.threshold - HYSTERESIS, 3), "min_silence_ms": self.min_silence_ms,
                "min_ipu_ms": self.min_ipu_ms, "leak_db": self.leak_db, "leak_lag_ms": self.leak_lag_ms,
                "channels": {USER: 1 - self.jmoshi_channel, JMOSHI: self.jmoshi_channel}}


@dataclass(frozen=True)
class Span:
    """Windows [start, end) of one event."""

    start: int
    end: int
    speaker: str = ""  # who speaks (IPU), who paused (pause), who took the floor (gap)

    @property
    def windows(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class Transfer:
    """The floor passing to ``speaker``: ``offset`` windows after the previous holder stopped (< 0: before)."""

    offset: int
    speaker: str


@dataclass
class Events:
    """One dialogue's events, in windows."""

    windows: int
    ipus: dict[str, list[Span]]
    pauses: list[Span] = field(default_factory=list)
    gaps: list[Span] = field(default_factory=list)
    overlaps: list[Span] = field(default_factory=list)
    transfers: list[Transfer] = field(default_factory=list)
    turns: dict[str, int] = field(default_factory=dict)
    inside: dict[str, int] = field(default_factory=dict)  # IPUs inside the other's turn, per speaker
    leak: dict[str, LeakPath | None] = field(default_factory=dict)  # the other voice's path into each channel


def speech(probs: np.ndarray, threshold: float) -> np.ndarray:
    """Silero's hysteresis over one channel's scores: bool per window."""
    state = np.where(probs >= threshold, 1.0, np.where(probs < threshold - HYSTERESIS, 0.0, np.nan))
    # Between the two thresholds a window keeps the state of the last window outside them.
    known = np.where(~np.isnan(state), np.arange(len(state)), -1)
    last = np.maximum.accumulate(known)
    return np.where(last >= 0, state[np.maximum(last, 0)], 0.0).astype(bool)


def ipus(active: np.ndarray, min_silence: int, min_ipu: int, speaker: str) -> list[Span]:
    """Runs of speech with short silences filled, short runs dropped."""
    edges = np.flatnonzero(np.diff(np.concatenate([[0], active.astype(np.int8), [0]])))
    runs = edges.reshape(-1, 2).tolist()
    merged: list[list[int]] = []
    for run in runs:
        if merged and run[0] - merged[-1][1] < min_silence:
            merged[-1][1] = run[1]
        else:
            merged.append(run)
    return [Span(a, b, speaker) for a, b in merged if b - a >= min_ipu]


def find_events(probs: np.ndarray, levels: np.ndarray | Levels, params: Params) -> Events:
    """Every event of one dialogue from its (2, windows) scores and its levels, channels in file order:
    :class:`~.leak.Levels` measured on the audio, or window levels alone (2, windows) in dB."""
    if not isinstance(levels, Levels):
        levels = Levels(np.asarray(levels, dtype=np.float32))
    active = np.stack([speech(p, params.threshold) for p in probs])
    paths: list[LeakPath | None] = [None, None]
    if params.leak_db > 0:
        active, paths = own_speech(active, levels, params.leak_db, params.leak_lag_ms / 1000)
    order = {USER: 1 - params.jmoshi_channel, JMOSHI: params.jmoshi_channel}
    found = {who: ipus(active[order[who]], _at_least(params.min_silence_ms), _at_least(params.min_ipu_ms), who)
             for who in SPEAKERS}
    events = Events(windows=probs.shape[1], ipus=found, leak={who: paths[order[who]] for who in SPEAKERS})
    events.overlaps = _overlaps(found[USER], found[JMOSHI])
    events.pauses, events.gaps = _silences(found)
    events.transfers, events.turns, events.inside = _floor(found)
    return events


def _at_least(ms: float) -> int:
    """The fewest whole windows that last ``ms`` or more (200 ms: 7 windows, 224 ms)."""
    return max(0, math.ceil(ms / 1000 / WINDOW_S - 1e-9))


def _overlaps(a: list[Span], b: list[Span]) -> list[Span]:
    out, i, j = [], 0, 0
    while i < len(a) and j < len(b):
        start, end = max(a[i].start, b[j].start), min(a[i].end, b[j].end)
        if start < end:
            out.append(Span(start, end))
        if a[i].end < b[j].end:
            i += 1
        else:
            j += 1
    return out


def _silences(found: dict[str, list[Span]]) -> tuple[list[Span], list[Span]]:
    """Silences between the first and last IPU, split into pauses and gaps."""
    ends: dict[int, set[str]] = {}
    starts: dict[int, set[str]] = {}
    for who, spans in found.items():
        for span in spans:
            ends.setdefault(span.end, set()).add(who)
            starts.setdefault(span.start, set()).add(who)
    pauses, gaps = [], []
    for start, end in _holes(found):
        before, after = ends.get(start, set()), starts.get(end, set())
        if len(before) == 1 and before == after:
            pauses.append(Span(start, end, next(iter(before))))
        else:
            gaps.append(Span(start, end, next(iter(after)) if len(after) == 1 else ""))
    return pauses, gaps


def _holes(found: dict[str, list[Span]]) -> list[tuple[int, int]]:
    spans = sorted((s.start, s.end) for spans in found.values() for s in spans)
    holes, reach = [], None
    for start, end in spans:
        if reach is not None and start > reach:
            holes.append((reach, start))
        reach = end if reach is None else max(reach, end)
    return holes


def _floor(found: dict[str, list[Span]]) -> tuple[list[Transfer], dict[str, int], dict[str, int]]:
    transfers: list[Transfer] = []
    turns = dict.fromkeys(SPEAKERS, 0)
    inside = dict.fromkeys(SPEAKERS, 0)
    holder, holder_end = None, 0
    for span in sorted((s for spans in found.values() for s in spans), key=lambda s: (s.start, s.end)):
        if span.speaker == holder:
            holder_end = max(holder_end, span.end)
        elif holder is not None and span.end <= holder_end:
            inside[span.speaker] += 1
        else:
            if holder is not None:
                transfers.append(Transfer(span.start - holder_end, span.speaker))
            holder, holder_end = span.speaker, span.end
            turns[span.speaker] += 1
    return transfers, turns, inside
