"""Figures from events: counts, seconds and both per minute of dialogue; offsets; speaking shares.

Per minute means per minute of the file (or of all files together, for a set), silence included, as
dGSLM reports them. A speaker's speaking time is the sum of their IPUs; overlapped time counts for
both, so J-Moshi's share is its speaking time over both speakers' speaking time.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .events import JMOSHI, SPEAKERS, Events, Span
from .vad import WINDOW_S


@dataclass(frozen=True)
class Tally:
    """How many of an event, how long in all, over how long a dialogue."""

    count: int
    total_s: float
    duration_s: float

    def __add__(self, other: Tally) -> Tally:
        return Tally(self.count + other.count, self.total_s + other.total_s, self.duration_s + other.duration_s)

    @property
    def count_per_min(self) -> float:
        return self.count / self.duration_s * 60 if self.duration_s else 0.0

    @property
    def s_per_min(self) -> float:
        return self.total_s / self.duration_s * 60 if self.duration_s else 0.0

    def as_json(self) -> dict:
        return {"count": self.count, "total_s": round(self.total_s, 3), "count_per_min": round(self.count_per_min, 3),
                "s_per_min": round(self.s_per_min, 3)}


@dataclass(frozen=True)
class Offsets:
    """Floor-transfer offsets in seconds (negative: the new speaker started in overlap)."""

    values: tuple[float, ...] = ()

    def __add__(self, other: Offsets) -> Offsets:
        return Offsets(self.values + other.values)

    def quartiles(self) -> tuple[float, float, float] | None:
        if not self.values:
            return None
        q1, median, q3 = np.percentile(self.values, [25, 50, 75])
        return float(q1), float(median), float(q3)

    def as_json(self) -> dict:
        q = self.quartiles()
        return {"count": len(self.values), "median_s": _round(q and q[1]), "q1_s": _round(q and q[0]),
                "q3_s": _round(q and q[2]), "mean_s": _round(float(np.mean(self.values)) if self.values else None)}


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


@dataclass(frozen=True)
class Speaker:
    ipu: Tally
    pause: Tally
    turns: int = 0
    inside_other: int = 0  # IPUs inside the other's turn: backchannels, interruptions that did not take the floor
    took_floor: Offsets = field(default_factory=Offsets)  # offsets of the transfers to this speaker

    def __add__(self, other: Speaker) -> Speaker:
        return Speaker(self.ipu + other.ipu, self.pause + other.pause, self.turns + other.turns,
                       self.inside_other + other.inside_other, self.took_floor + other.took_floor)


@dataclass(frozen=True)
class Figures:
    """Everything reported for one dialogue, or for a set of dialogues added together."""

    duration_s: float
    speakers: dict[str, Speaker]
    gap: Tally
    overlap: Tally

    def __add__(self, other: Figures) -> Figures:
        return Figures(self.duration_s + other.duration_s,
                       {who: self.speakers[who] + other.speakers[who] for who in SPEAKERS},
                       self.gap + other.gap, self.overlap + other.overlap)

    @property
    def offsets(self) -> Offsets:
        return Offsets(tuple(sorted(v for s in self.speakers.values() for v in s.took_floor.values)))

    @property
    def jmoshi_share(self) -> float | None:
        speaking = sum(s.ipu.total_s for s in self.speakers.values())
        return self.speakers[JMOSHI].ipu.total_s / speaking if speaking else None

    def as_json(self) -> dict:
        speakers = {who: {"ipu": s.ipu.as_json(), "pause": s.pause.as_json(), "turns": s.turns,
                          "inside_other": s.inside_other, "took_floor": s.took_floor.as_json()}
                    for who, s in self.speakers.items()}
        return {"duration_s": round(self.duration_s, 3), "speakers": speakers, "gap": self.gap.as_json(),
                "overlap": self.overlap.as_json(), "floor_transfer": self.offsets.as_json(),
                "jmoshi_share": _round(self.jmoshi_share)}


def figures(events: Events, duration_s: float) -> Figures:
    def tally(spans: list[Span]) -> Tally:
        return Tally(len(spans), sum(s.windows for s in spans) * WINDOW_S, duration_s)

    speakers = {}
    for who in SPEAKERS:
        offsets = tuple(t.offset * WINDOW_S for t in events.transfers if t.speaker == who)
        speakers[who] = Speaker(tally(events.ipus[who]), tally([p for p in events.pauses if p.speaker == who]),
                                events.turns[who], events.inside[who], Offsets(offsets))
    return Figures(duration_s, speakers, tally(events.gaps), tally(events.overlaps))


# The figures a comparison, a CSV row and `recordings --stats` show: key, label, how to get it.
HEADLINE = (
    ("ipu_per_min", "IPU / min", lambda f: sum(s.ipu.count_per_min for s in f.speakers.values())),
    ("pause_per_min", "pause / min", lambda f: sum(s.pause.count_per_min for s in f.speakers.values())),
    ("gap_per_min", "gap / min", lambda f: f.gap.count_per_min),
    ("overlap_per_min", "overlap / min", lambda f: f.overlap.count_per_min),
    ("pause_s_per_min", "pause s / min", lambda f: sum(s.pause.s_per_min for s in f.speakers.values())),
    ("gap_s_per_min", "gap s / min", lambda f: f.gap.s_per_min),
    ("overlap_s_per_min", "overlap s / min", lambda f: f.overlap.s_per_min),
    ("turns_per_min", "turns / min", lambda f: sum(s.turns for s in f.speakers.values()) / f.duration_s * 60
     if f.duration_s else 0.0),
    ("fto_median_s", "offset median (s)", lambda f: _median(f.offsets)),
    ("jmoshi_fto_median_s", "J-Moshi's offset median (s)", lambda f: _median(f.speakers[JMOSHI].took_floor)),
    ("jmoshi_share", "J-Moshi's share", lambda f: f.jmoshi_share),
)


def _median(offsets: Offsets) -> float | None:
    q = offsets.quartiles()
    return q[1] if q else None


def headline(f: Figures) -> dict[str, float | None]:
    return {key: get(f) for key, _, get in HEADLINE}
