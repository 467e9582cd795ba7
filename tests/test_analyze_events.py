"""The event definitions on VAD scores built by hand: every count and duration is known exactly."""

from __future__ import annotations

import numpy as np
import pytest

from jmoshi_cli.analysis.events import JMOSHI, USER, Params, find_events, speech
from jmoshi_cli.analysis.stats import figures
from jmoshi_cli.analysis.vad import WINDOW_S

W = WINDOW_S  # 32 ms
QUIET, LOUD = -70.0, -20.0


def scores(total: int, user: list[tuple[int, int]], jmoshi: list[tuple[int, int]]):
    """Scores (channel 0 user, 1 J-Moshi) of 0.9 inside the given [start, end) windows, 0.05 elsewhere."""
    probs = np.full((2, total), 0.05, dtype=np.float32)
    levels = np.full((2, total), QUIET, dtype=np.float32)
    for channel, spans in enumerate((user, jmoshi)):
        for start, end in spans:
            probs[channel, start:end] = 0.9
            levels[channel, start:end] = LOUD
    return probs, levels


def test_a_dialogue_with_every_event():
    # J-Moshi speaks [10, 60), pauses 10 windows (320 ms), speaks [70, 100); the user answers after a
    # 15-window gap at [115, 200); J-Moshi backchannels inside it at [150, 160); J-Moshi takes the
    # floor 20 windows before the user stops, at [180, 260); the user comes back after a 25-window gap.
    probs, levels = scores(400, user=[(115, 200), (285, 300)], jmoshi=[(10, 60), (70, 100), (150, 160), (180, 260)])
    events = find_events(probs, levels, Params())
    assert [(s.start, s.end) for s in events.ipus[JMOSHI]] == [(10, 60), (70, 100), (150, 160), (180, 260)]
    assert [(s.start, s.end) for s in events.ipus[USER]] == [(115, 200), (285, 300)]
    assert [(p.start, p.end, p.speaker) for p in events.pauses] == [(60, 70, JMOSHI)]
    assert [(g.start, g.end, g.speaker) for g in events.gaps] == [(100, 115, USER), (260, 285, USER)]
    assert [(o.start, o.end) for o in events.overlaps] == [(150, 160), (180, 200)]
    assert [(t.offset, t.speaker) for t in events.transfers] == [(15, USER), (-20, JMOSHI), (25, USER)]
    assert events.turns == {USER: 2, JMOSHI: 2}
    assert events.inside == {USER: 0, JMOSHI: 1}

    f = figures(events, duration_s=400 * W)
    assert f.speakers[JMOSHI].ipu.count == 4
    assert f.speakers[JMOSHI].ipu.total_s == pytest.approx((50 + 30 + 10 + 80) * W)
    assert f.speakers[JMOSHI].pause.total_s == pytest.approx(10 * W)
    assert f.speakers[USER].pause.count == 0
    assert f.gap.count == 2 and f.gap.total_s == pytest.approx(40 * W)
    assert f.overlap.count == 2 and f.overlap.total_s == pytest.approx(30 * W)
    assert f.overlap.count_per_min == pytest.approx(2 / (400 * W / 60))
    assert f.jmoshi_share == pytest.approx(170 / (170 + 100))
    q1, median, q3 = f.offsets.quartiles()
    assert median == pytest.approx(15 * W)
    json = f.as_json()
    assert set(json["speakers"][USER]) >= {"ipu", "pause"}
    assert set(json["gap"]) == {"count", "total_s", "count_per_min", "s_per_min"}


def test_silences_shorter_than_the_minimum_do_not_split_an_ipu():
    # 6 windows = 192 ms < 200 ms: one IPU; 7 windows = 224 ms: two IPUs and a pause.
    probs, levels = scores(200, user=[(10, 40), (46, 80), (87, 120)], jmoshi=[])
    events = find_events(probs, levels, Params(min_silence_ms=200))
    assert [(s.start, s.end) for s in events.ipus[USER]] == [(10, 80), (87, 120)]
    assert [(p.start, p.end) for p in events.pauses] == [(80, 87)]
    assert not events.gaps and not events.transfers


def test_blips_shorter_than_the_minimum_ipu_are_dropped():
    probs, levels = scores(200, user=[(10, 12), (50, 80)], jmoshi=[])
    assert [(s.start, s.end) for s in find_events(probs, levels, Params()).ipus[USER]] == [(50, 80)]


def test_jmoshi_on_the_left_when_told():
    probs, levels = scores(200, user=[(10, 40)], jmoshi=[(60, 90)])
    events = find_events(probs, levels, Params(jmoshi_channel=0))
    assert [(s.start, s.end) for s in events.ipus[JMOSHI]] == [(10, 40)]


def test_hysteresis_keeps_speech_between_the_two_thresholds():
    probs = np.array([0.1, 0.6, 0.4, 0.36, 0.34, 0.4, 0.6, 0.2], dtype=np.float32)
    assert speech(probs, 0.5).tolist() == [False, True, True, True, False, False, True, False]


def test_leakage_is_dropped_and_real_overlap_kept():
    # J-Moshi's voice leaks into the user's channel 25 dB down, one window late, and the user's VAD holds
    # on for 6 windows after the leak stops; the user also really speaks over J-Moshi at [70, 90) at the
    # same level.
    probs, levels = scores(200, user=[(70, 90)], jmoshi=[(20, 100)])
    probs[0, 21:107] = np.maximum(probs[0, 21:107], 0.8)
    levels[0, 21:101] = np.maximum(levels[0, 21:101], LOUD - 25)
    levels[0, 70:90] = LOUD
    kept = find_events(probs, levels, Params())
    # The user's own speech and the 5 windows (160 ms) the VAD takes to let go of a voice; neither the leak
    # nor the VAD's hold after it (the tail that used to pass for a short IPU of the user).
    assert [(s.start, s.end) for s in kept.ipus[USER]] == [(70, 95)]
    assert kept.inside == {USER: 1, JMOSHI: 0}
    path = kept.leak[USER]
    assert path.heard and path.level_db == pytest.approx(-25) and path.delay_s == pytest.approx(W)
    raw = find_events(probs, levels, Params(leak_db=0))
    assert [(s.start, s.end) for s in raw.ipus[USER]] == [(21, 107)]
    assert raw.leak == {USER: None, JMOSHI: None}


def test_an_echo_a_quarter_second_late_is_not_the_users():
    # J-Moshi's voice comes back into the user's microphone 8 windows (256 ms) late, 30 dB down; the user
    # answers after J-Moshi's echo has died away.
    probs, levels = scores(300, user=[(150, 200)], jmoshi=[(20, 100)])
    probs[0, 28:113] = 0.8
    levels[0, 28:108] = LOUD - 30
    events = find_events(probs, levels, Params())
    assert [(s.start, s.end) for s in events.ipus[USER]] == [(150, 200)]
    assert [(g.start, g.end) for g in events.gaps] == [(100, 150)]
    path = events.leak[USER]
    assert path.heard and path.level_db == pytest.approx(-30) and path.delay_s == pytest.approx(8 * W)
    assert not events.leak[JMOSHI].heard  # nothing of the user's voice in J-Moshi's channel


def test_help_imports_nothing_heavy():
    import subprocess
    import sys

    code = ("import sys\nfrom jmoshi_cli.cli import run\nrun(['analyze', '--help'])\n"
            "print(sorted(m for m in ('torch', 'numpy', 'matplotlib', 'silero_vad') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.stdout.strip().endswith("[]"), done.stdout + done.stderr
    assert "--against" in done.stdout and "--leak-db" in done.stdout
