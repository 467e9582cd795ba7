"""`jmoshi analyze` on dialogues where each voice leaks into the other's channel: scripted dialogues with known
events (tests/builders.py), spoken by two voice sources, each leaked from not at all to -15 dB, from 0 to
250 ms late, with and without a room's reverberation. The counts must be the script's and every IPU edge
within 0.1 s of where it was placed.

The voices: the two speakers of the shared recording (../shared/audio, skipped without it), and two
synthetic formant voices (tests/builders.py: formant_speech), which need nothing."""

from __future__ import annotations

import functools
import json
import re

import numpy as np
import pytest

from conftest import SHARED_AUDIO, run_cli
from jmoshi_cli.analysis import Params
from jmoshi_cli.analysis.events import JMOSHI, USER, Events
from jmoshi_cli.analysis.pipeline import find_in_audio
from jmoshi_cli.analysis.vad import WINDOW_S
from jmoshi_cli.audio_io import write_wav

from builders import (
    DIALOGUE_RATE,
    REVERB_S,
    SCRIPT_COUNTS,
    events_of_each,
    formant_voices,
    scripted_dialogue,
    shared_voices,
    with_leak,
)

DAILY = SHARED_AUDIO / "daily-5-0276.wav"
EDGE_S = 0.1
LEAKS_DB = (-40, -35, -30, -25, -20, -15)
DELAYS_S = (0.0, 0.04, 0.12, 0.25)
MATRIX = [(None, 0.0, 0.0)] + [(db, delay, reverb) for db in LEAKS_DB for delay in DELAYS_S
                               for reverb in (0.0, REVERB_S)]
# The issue's table: none, two headsets (-40 to -20 dB), an echo 250 ms late, one 120 ms late; and a room.
formant = functools.cache(formant_voices)  # the synthetic voices, made once for the module
ISSUE_ROWS = [(None, 0.0, 0.0), (-40, 0.0, 0.0), (-30, 0.0, 0.0), (-20, 0.0, 0.0), (-35, 0.25, 0.0),
              (-25, 0.12, 0.0), (-15, 0.04, REVERB_S)]


@pytest.fixture(scope="module", params=["shared", "formant"])
def voices(request):
    if request.param == "shared":
        if not DAILY.exists():
            pytest.skip(f"{DAILY} is not here (the shared test audio)")
        return request.param, shared_voices(DAILY)
    return request.param, formant()


def analysed(clean: np.ndarray, cases: list[tuple[float | None, float, float]]) -> list[Events]:
    """Each case's dialogue analysed as analyze_file does it, the VAD run once for all of them."""
    return events_of_each([with_leak(clean, *case) for case in cases])


def misses(events: Events, lines: list[tuple[int, float, float]]) -> list[str]:
    """How the events differ from the script: counts, and IPU edges more than EDGE_S from their place."""
    found = {"ipus": (len(events.ipus[USER]), len(events.ipus[JMOSHI])), "gaps": len(events.gaps),
             "pauses": tuple(sum(p.speaker == who for p in events.pauses) for who in (USER, JMOSHI)),
             "overlaps": len(events.overlaps)}
    out = [f"{key} {found[key]} != {want}" for key, want in SCRIPT_COUNTS.items() if found[key] != want]
    for channel, who in ((0, USER), (1, JMOSHI)):
        placed = sorted((start, end) for c, start, end in lines if c == channel)
        if len(placed) == len(events.ipus[who]):
            out += [f"{who} IPU at {start:.2f}-{end:.2f} s found at {span.start * WINDOW_S:.2f}-"
                    f"{span.end * WINDOW_S:.2f}" for span, (start, end) in zip(events.ipus[who], placed, strict=True)
                    if max(abs(span.start * WINDOW_S - start), abs(span.end * WINDOW_S - end)) > EDGE_S]
    return out


def check(clean, lines, cases) -> None:
    wrong = {case: miss for case, events in zip(cases, analysed(clean, cases), strict=True)
             if (miss := misses(events, lines))}
    assert not wrong, "\n".join(f"leak {db} dB, {delay * 1000:.0f} ms, reverb {reverb} s: {'; '.join(miss)}"
                                for (db, delay, reverb), miss in wrong.items())


@pytest.mark.slow  # the VAD over seven whole dialogues per voice; the inner loop keeps the leak tests below
def test_the_issues_leaks_give_the_scripts_events(voices):
    check(*scripted_dialogue(voices[1]), ISSUE_ROWS)


@pytest.mark.slow
def test_every_leak_level_delay_and_room_gives_the_scripts_events(voices):
    check(*scripted_dialogue(voices[1]), MATRIX)


def test_without_the_rule_the_leak_is_speech(voices):
    clean, lines = scripted_dialogue(voices[1])
    events = find_in_audio(with_leak(clean, -25, 0.12, 0.0), DIALOGUE_RATE, Params(leak_db=0))
    assert misses(events, lines)
    assert sum(o.windows for o in events.overlaps) * WINDOW_S > 10  # each turn heard on both channels
    assert events.leak == {USER: None, JMOSHI: None}


PATHS = [(-30, 0.0, 0.0), (-25, 0.12, 0.0), (-20, 0.25, 0.0), (-20, 0.04, REVERB_S)]


def test_the_leak_path_is_measured(voices):
    clean, _ = scripted_dialogue(voices[1])
    none, *leaky = analysed(clean, [(None, 0.0, 0.0), *PATHS])
    for who in (USER, JMOSHI):
        assert not none.leak[who].heard and none.leak[who].delay_s is None
        assert none.leak[who].level_db < -30  # an upper bound: the noise under the other's speech
    for (leak_db, delay_s, reverb_s), events in zip(PATHS, leaky, strict=True):
        for who in (USER, JMOSHI):
            path = events.leak[who]
            assert path.heard and path.measured_s > 5
            assert path.delay_s == pytest.approx(delay_s, abs=0.016)  # two 8 ms steps
            # The room spreads part of the voice over its tail, which the level at the delay leaves out.
            assert path.level_db == pytest.approx(leak_db, abs=2 if reverb_s == 0 else 4)


def test_an_echo_into_the_users_microphone_only():
    # As `serve --record` writes it: J-Moshi's channel is what the model said (silence between its turns, and
    # nothing of the user), the user's microphone hears J-Moshi from the speakers 120 ms late in a room.
    clean, lines = scripted_dialogue(formant())
    pcm = with_leak(clean, -25, 0.12, REVERB_S, directions=(0,))
    pcm[1] = clean[1]
    events = find_in_audio(pcm, DIALOGUE_RATE, Params())
    assert not misses(events, lines)
    assert events.leak[USER].heard and events.leak[USER].delay_s == pytest.approx(0.12, abs=0.016)
    assert not events.leak[JMOSHI].heard


def test_cli_reports_the_leak_it_assumed(tmp_path):
    import os

    clean, _ = scripted_dialogue(formant())
    path = tmp_path / "echo.wav"
    write_wav(path, with_leak(clean, -25, 0.12, 0.0, directions=(0,)), DIALOGUE_RATE)
    env = {**os.environ, "NO_COLOR": "1", "JMOSHI_HOME": str(tmp_path / "home"), "COLUMNS": "200"}
    done = run_cli("analyze", str(path), "--json", "--csv", str(tmp_path / "out.csv"), env=env)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    user, jmoshi = out["files"][0]["leak"][USER], out["files"][0]["leak"][JMOSHI]
    assert user["heard"] and abs(user["delay_ms"] - 120) <= 16 and abs(user["level_db"] + 25) <= 2
    assert not jmoshi["heard"] and jmoshi["delay_ms"] is None
    assert out["params"]["leak_db"] == 10 and out["params"]["leak_lag_ms"] == 300
    assert out["files"][0]["speakers"][USER]["ipu"]["count"] == 6
    assert re.search(r"J-Moshi's voice in the user channel: -2\d\.\d dB, 1\d\d ms late", done.stderr), done.stderr
    assert "leak paths measured" in done.stderr
    header = (tmp_path / "out.csv").read_text().splitlines()[0].split(",")
    assert {"leak_user_level_db", "leak_user_delay_ms", "leak_jmoshi_heard"} <= set(header)

    off = json.loads(run_cli("analyze", str(path), "--json", "--leak-db", "0", env=env).stdout)
    assert off["files"][0]["leak"][USER] == {"heard": None, "level_db": None, "delay_ms": None, "measured_s": None}
