"""`jmoshi analyze` on audio: speech cut from the shared recording and placed at chosen times, the
shared recording itself, and the files it must refuse. Needs ../shared/audio (skipped without it)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import SHARED_AUDIO, run_cli
from jmoshi_cli.analysis import Params, analyze_file
from jmoshi_cli.analysis.events import JMOSHI, USER
from jmoshi_cli.audio_io import read_audio, resample, write_wav

DAILY = SHARED_AUDIO / "daily-5-0276.wav"
pytestmark = pytest.mark.skipif(not DAILY.exists(), reason=f"{DAILY} is not here (the shared test audio)")
EDGE_S = 0.1  # three VAD windows: how far a found boundary may be from where the speech was placed

# Utterances of daily-5-0276.wav (channel, start s, end s), cut where the VAD finds their edges.
ASK, ANSWER, LONG, SHORT, REPLY = (1, 1.5, 3.07), (0, 3.58, 4.77), (1, 4.77, 9.06), (0, 19.3, 20.26), (0, 9.06, 12.38)


def _env(tmp_path) -> dict:
    import os

    return {**os.environ, "NO_COLOR": "1", "JMOSHI_HOME": str(tmp_path / "home"), "COLUMNS": "200"}


@pytest.fixture(scope="module")
def daily():
    audio = read_audio(DAILY)
    return audio.pcm, audio.sample_rate


def dialogue(daily, placed: list[tuple[tuple[int, float, float], int, float]], total_s: float, rate: int = 24000,
             leak_db: float | None = None) -> np.ndarray:
    """Stereo (user, J-Moshi) of ``total_s`` with each (utterance, channel, at s) placed; optionally each
    voice also leaking into the other channel ``leak_db`` down and 40 ms late."""
    pcm, source_rate = daily
    out = np.zeros((2, int(total_s * source_rate)), dtype=np.float32)
    for (channel, start, end), into, at in placed:
        piece = pcm[channel, int(start * source_rate):int(end * source_rate)]
        begin = int(at * source_rate)
        out[into, begin:begin + len(piece)] += piece
    if leak_db is not None:
        delay, gain = int(0.04 * source_rate), 10 ** (-leak_db / 20)
        leaked = np.zeros_like(out)
        leaked[:, delay:] = out[::-1, :-delay] * gain
        out = out + leaked
    return np.stack([resample(c, source_rate, rate) for c in out]) if rate != source_rate else out


# J-Moshi asks twice (a 0.5 s pause), the user answers after a 0.6 s gap, J-Moshi goes on after a 0.4 s
# gap, the user says a short "そうですね" inside J-Moshi's long turn, then takes the floor 0.5 s before
# J-Moshi stops.
SCENE = [(ASK, 1, 1.0), (ASK, 1, 3.07), (ANSWER, 0, 5.24), (LONG, 1, 6.83), (SHORT, 0, 9.0), (REPLY, 0, 10.62)]


def check_scene(events, edge_s: float = EDGE_S) -> None:
    secs = [(round(s.start * 0.032, 2), round(s.end * 0.032, 2)) for s in events.ipus[JMOSHI]]
    assert len(events.ipus[JMOSHI]) == 3, secs
    assert len(events.ipus[USER]) == 3
    expected_j = [(1.0, 2.57), (3.07, 4.64), (6.83, 11.12)]
    expected_u = [(5.24, 6.43), (9.0, 9.96), (10.62, 13.94)]
    for who, expected in ((JMOSHI, expected_j), (USER, expected_u)):
        for span, (start, end) in zip(events.ipus[who], expected, strict=True):
            assert span.start * 0.032 == pytest.approx(start, abs=edge_s)
            assert span.end * 0.032 == pytest.approx(end, abs=edge_s)
    assert [p.speaker for p in events.pauses] == [JMOSHI]
    assert events.pauses[0].windows * 0.032 == pytest.approx(0.5, abs=2 * edge_s)
    assert [g.speaker for g in events.gaps] == [USER, JMOSHI]
    assert [g.windows * 0.032 for g in events.gaps] == pytest.approx([0.6, 0.4], abs=2 * edge_s)
    assert [o.windows * 0.032 for o in events.overlaps] == pytest.approx([0.96, 0.5], abs=2 * edge_s)
    assert [t.speaker for t in events.transfers] == [USER, JMOSHI, USER]
    assert [t.offset * 0.032 for t in events.transfers] == pytest.approx([0.6, 0.4, -0.5], abs=2 * edge_s)
    assert events.turns == {USER: 2, JMOSHI: 2} and events.inside == {USER: 1, JMOSHI: 0}


@pytest.mark.parametrize("rate", [24000, 16000, 44100])
def test_placed_speech_gives_the_events_placed(daily, tmp_path, rate):
    path = tmp_path / f"scene-{rate}.wav"
    write_wav(path, dialogue(daily, SCENE, 15.0, rate), rate)
    result = analyze_file(path, Params())
    check_scene(result.events)
    assert result.figures.duration_s == pytest.approx(15.0, abs=1e-3)


def test_leakage_between_microphones_is_not_speech(daily, tmp_path):
    path = tmp_path / "leaky.wav"
    write_wav(path, dialogue(daily, SCENE, 15.0, leak_db=20), 24000)
    events = analyze_file(path, Params()).events
    check_scene(events)
    assert [(round(events.leak[who].level_db), events.leak[who].delay_s) for who in (USER, JMOSHI)] == [
        (-20, 0.04), (-20, 0.04)]
    unfiltered = analyze_file(path, Params(leak_db=0)).events
    assert unfiltered.overlaps and sum(o.windows for o in unfiltered.overlaps) * 0.032 > 5  # the leak everywhere


def test_the_shared_dialogue_has_its_nine_turns():
    # Its script: 9 turns, the speaker on the right first (5 turns), the left answering (4).
    figures = analyze_file(DAILY, Params()).figures
    assert figures.speakers[JMOSHI].turns == 5 and figures.speakers[USER].turns == 4
    assert figures.speakers[JMOSHI].ipu.count == 5 and figures.speakers[USER].ipu.count == 5
    assert 0.45 < figures.jmoshi_share < 0.6
    q1, median, q3 = figures.offsets.quartiles()
    assert len(figures.offsets.values) == 8 and 0 < median < 0.5 and q1 < median < q3
    assert figures.overlap.count <= 2 and figures.gap.count >= 4


def test_jmoshi_on_the_left(tmp_path):
    figures = analyze_file(DAILY, Params(jmoshi_channel=0)).figures
    assert figures.speakers[JMOSHI].turns == 4 and figures.speakers[USER].turns == 5


@pytest.mark.slow  # the real VAD over a real dialogue, end to end through the CLI, with its plot
def test_cli_json_csv_plot_and_bad_inputs(tmp_path):
    good = tmp_path / "talk.wav"
    good.write_bytes(DAILY.read_bytes())
    mono, empty, corrupt, nothing = tmp_path / "mono.wav", tmp_path / "empty.wav", tmp_path / "bad.wav", tmp_path / "e"
    write_wav(mono, np.zeros(24000, dtype=np.float32), 24000)
    three = tmp_path / "three.wav"
    write_wav(three, np.zeros((3, 24000), dtype=np.float32), 24000)
    empty.write_bytes(b"")
    corrupt.write_bytes(b"RIFF\x10\x00\x00\x00WAVEfmt garbage" + bytes(100))
    nothing.mkdir()
    (nothing / "notes.txt").write_text("no audio here")
    args = [str(good), str(mono), str(three), str(empty), str(corrupt), str(nothing), str(tmp_path / "missing.wav")]
    done = run_cli("analyze", *args, "--json", "--csv", str(tmp_path / "out.csv"), "--plot", str(tmp_path / "plots"),
                  env=_env(tmp_path))
    assert done.returncode == 2, done.stderr  # a missing path and an empty folder are bad usage
    out = json.loads(done.stdout)
    assert [f["path"] for f in out["files"]] == [str(good)]
    file = out["files"][0]
    ev = {"count", "total_s", "count_per_min", "s_per_min"}
    for who in (USER, JMOSHI):
        assert set(file["speakers"][who]["ipu"]) == ev and set(file["speakers"][who]["pause"]) == ev
    assert set(file["gap"]) == ev and set(file["overlap"]) == ev and file["duration_s"] == pytest.approx(23.52)
    assert out["total"]["speakers"][JMOSHI]["turns"] == 5
    assert out["params"]["min_silence_ms"] == 200 and out["params"]["threshold"] == 0.5
    problems = {p["path"]: (p["exit_code"], p["error"]) for p in out["problems"]}
    assert {k: v[0] for k, v in problems.items()} == {str(mono): 1, str(three): 1, str(empty): 1, str(corrupt): 1,
                                                      str(nothing): 2, str(tmp_path / "missing.wav"): 2}
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 6, done.stderr
    assert "1 channel" in problems[str(mono)][1] and "3 channel" in problems[str(three)][1]
    assert "empty" in problems[str(empty)][1]
    rows = (tmp_path / "out.csv").read_text().splitlines()
    assert len(rows) == 2 and rows[0].startswith("path,duration_s,") and "speakers_jmoshi_turns" in rows[0]
    png = tmp_path / "plots" / "talk.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    only_failures = run_cli("analyze", str(mono), str(good), env=_env(tmp_path))
    assert only_failures.returncode == 1 and "IPU J-Moshi" in only_failures.stderr
    assert only_failures.stdout == ""


@pytest.mark.slow  # two sets of dialogues through the real VAD, end to end through the CLI
def test_cli_against_and_sessions(tmp_path, daily):
    from jmoshi_cli.recording.format import write_json

    root = tmp_path / "rec"
    for name in ("20261201T100000Z-aaaaaa", "20261201T110000Z-bbbbbb"):
        (root / name).mkdir(parents=True)
        (root / name / "dialogue.wav").write_bytes(DAILY.read_bytes())
        write_json(root / name / "meta.json", {"format": 1, "variant": "ext", "ended": "hang-up",
                                                            "duration_s": 23.52})
    infer_out = tmp_path / "out"
    infer_out.mkdir()
    write_wav(infer_out / "scene.dialogue.wav", dialogue(daily, SCENE, 15.0), 24000)
    write_wav(infer_out / "scene.jmoshi.wav", np.zeros(100, dtype=np.float32), 24000)  # ignored: mono output
    done = run_cli("analyze", str(root), "--against", str(infer_out), "--json", env=_env(tmp_path))
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert len(out["files"]) == 2 and [f["path"] for f in out["against"]["files"]] == [
        str(infer_out / "scene.dialogue.wav")]
    turns = out["comparison"]["turns_per_min"]
    assert turns["difference"] == pytest.approx(turns["set"] - turns["against"])
    assert "set vs --against" in done.stderr

    listed = run_cli("recordings", str(root), "--stats", "--json", env=_env(tmp_path))
    assert listed.returncode == 0, listed.stderr
    sessions = json.loads(listed.stdout)["sessions"]
    assert [s["stats"]["speakers"][JMOSHI]["turns"] for s in sessions] == [5, 5]
    shown = run_cli("recordings", str(root), "--stats", env=_env(tmp_path))
    assert shown.returncode == 0 and "turn-taking per session" in shown.stderr and "aaaaaa" in shown.stderr


@pytest.mark.slow
def test_batched_vad_agrees_with_one_uninterrupted_run(daily):
    from jmoshi_cli.analysis import vad

    pcm, rate = daily
    rng = np.random.default_rng(3)
    parts = []
    for n in range(8):  # 200 s: seven segment boundaries per channel
        parts += [pcm if n % 2 else pcm[::-1], np.zeros((2, int(rng.uniform(0, 1) * rate)), dtype=np.float32)]
    windows = vad.windows_of(vad.to_vad_rate(np.concatenate(parts, axis=1), rate))
    batched = vad.speech_probs(windows)
    single = vad.speech_probs(windows, segment=windows.shape[1])
    changed = (batched >= 0.5) != (single >= 0.5)
    assert changed.mean() < 0.01
    assert np.abs(batched - single).mean() < 0.01

