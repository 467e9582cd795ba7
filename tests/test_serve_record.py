"""`serve --record`: the real moshi.server (tiny model, CPU), real websockets, real files on disk."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import wave
from pathlib import Path

import numpy as np
import pytest

from conftest import TEST_TOKEN, child_env, jmoshi, run_cli
from jmoshi_cli.audio_io import FRAME_SIZE, SAMPLE_RATE
from jmoshi_cli.recording import Ended, store
from jmoshi_cli.recording import format as recordings
from jmoshi_cli.selftest import free_port, speech_like

from builders import read_wav_pcm16
from helpers import Running, Served, answered, children_of, converse, converse_sync, user_audio, wait_until

FILES = {"dialogue.wav", "user.wav", "jmoshi.wav", "transcript.json", "meta.json"}
SAMPLING = {"temp": 0.6, "temp_text": 0.5, "top_k": 100, "top_k_text": 20}
SAMPLING_FLAGS = ["--temp", "0.6", "--temp-text", "0.5", "--top-k", "100", "--top-k-text", "20"]


def serve_recording(tiny_env, folder: Path, *extra: str, verbose: bool = False) -> tuple[Served, str]:
    port = free_port()
    served = Served(["--variant", "tiny", "--device", "cpu", "--port", str(port), "--record", str(folder), *extra],
                    tiny_env, verbose=verbose)
    served.wait_ready()
    return served, f"ws://127.0.0.1:{port}/api/chat"


def sessions(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir())


def meta(session: Path) -> dict:
    return json.loads((session / "meta.json").read_text())


def ended(folder: Path, count: int) -> bool:
    """Whether `count` sessions exist and none of them is still running."""
    found = sessions(folder)
    return len(found) == count and all(meta(s)["ended"] != "running" for s in found)


def recorded_frames(folder: Path, at_least: int) -> bool:
    """Whether the newest session's user.wav holds at least that many frames on disk (header aside)."""
    found = sessions(folder)
    user = found[-1] / "user.wav" if found else None
    return user is not None and user.exists() and user.stat().st_size >= 44 + 2 * FRAME_SIZE * at_least


class Talking:
    """A browser talking for `seconds` in its own process: the tests stop it (or its server) mid-conversation.
    What it wrote on stderr (why it left, if it left early) is kept for the assertions' messages."""

    def __init__(self, url: str, seconds: float, log: Path):
        script = ("import sys; from jmoshi_cli.serving.chat import chat_sync; from jmoshi_cli.selftest import "
                  "speech_like; chat_sync(sys.argv[1], speech_like(float(sys.argv[2])), tail_s=1.0, token=sys.argv[3])")
        self.log = log
        with log.open("wb") as err:
            self.process = subprocess.Popen([sys.executable, "-c", script, url, str(seconds), TEST_TOKEN], stderr=err)

    def stop(self) -> str:
        """Kill it if it still talks; what it said on stderr."""
        self.process.kill()
        self.process.wait()
        return f"the client's stderr: {self.log.read_text(errors='replace')[-2000:]!r}"


def lag_of_peak(reference: np.ndarray, signal_: np.ndarray, max_lag: int) -> int:
    """The shift of `signal_` against `reference` (in samples, >= 0 when signal_ comes later) at the
    cross-correlation peak, searched over |lag| <= max_lag."""
    n = min(len(reference), len(signal_)) - max_lag
    best, best_lag = -np.inf, 0
    for lag in range(-max_lag, max_lag + 1, 8):
        a = reference[max(-lag, 0): max(-lag, 0) + n]
        b = signal_[max(lag, 0): max(lag, 0) + n]
        score = float(np.dot(a, b))
        if score > best:
            best, best_lag = score, lag
    for lag in range(best_lag - 8, best_lag + 9):  # refine around the coarse peak
        a = reference[max(-lag, 0): max(-lag, 0) + n]
        b = signal_[max(lag, 0): max(lag, 0) + n]
        score = float(np.dot(a, b))
        if score > best:
            best, best_lag = score, lag
    return best_lag


def correlation_at(reference: np.ndarray, signal_: np.ndarray, lag: int) -> float:
    a = reference[max(-lag, 0):]
    b = signal_[max(lag, 0):]
    n = min(len(a), len(b))
    return float(np.corrcoef(a[:n], b[:n])[0, 1])


def assert_consistent_wav(path: Path, channels: int) -> int:
    """A WAV that opens and whose header counts exactly the samples in the file; returns its frames."""
    with wave.open(str(path), "rb") as w:
        assert (w.getnchannels(), w.getsampwidth(), w.getframerate()) == (channels, 2, SAMPLE_RATE)
        frames = w.getnframes()
        assert len(w.readframes(frames)) == frames * 2 * channels
    assert path.stat().st_size == 44 + frames * 2 * channels, path
    return frames


def assert_readable_wav(path: Path, channels: int) -> int:
    """A WAV that opens, whose header claims no more than the file holds (a killed writer's state)."""
    with wave.open(str(path), "rb") as w:
        assert (w.getnchannels(), w.getframerate()) == (channels, SAMPLE_RATE)
        frames = w.getnframes()
        assert len(w.readframes(frames)) == frames * 2 * channels
    assert 44 + frames * 2 * channels <= path.stat().st_size
    return frames


@pytest.mark.usefixtures("tiny_downloaded")
@pytest.mark.slow
def test_each_conversation_is_saved_aligned_with_its_transcript_and_settings(tiny_env, tmp_path):
    folder = tmp_path / "study"
    sent, then = user_audio(4.0), speech_like(2.0)
    served, url = serve_recording(tiny_env, folder, *SAMPLING_FLAGS, "--seed", "7")
    try:
        # Each client hangs up once J-Moshi answered every frame (however slow the CPU): the recording holds
        # the whole conversation and is compared with what the client got.
        first = converse_sync(url, sent, until=answered(sent))
        wait_until(lambda: ended(folder, 1), 60, "the first recording to close")
        second = converse_sync(url, then, until=answered(then))
        wait_until(lambda: ended(folder, 2), 60, "the second recording to close")
        client = Talking(url, 120.0, tmp_path / "client.log")
        try:
            wait_until(lambda: len(sessions(folder)) == 3 and recorded_frames(folder, 10), 120, "a third conversation")
            code, err = served.stop(signal.SIGTERM)
        finally:
            client_said = client.stop()
    finally:
        served.stop()
    assert code == 143, err
    assert f"recording every conversation into {folder}" in err and "Tell participants" in err
    assert "jmoshi: the generator samples with temp 0.6, temp_text 0.5, top_k 100, top_k_text 20; seed 7 at the " \
           "start of each conversation" in err
    assert "warning" not in err and "Traceback" not in err, err
    one, two, three = sessions(folder)
    assert re.fullmatch(r"\d{8}T\d{6}Z-[0-9a-f]{6}", one.name)
    assert err.count("jmoshi recorder: saved") == 3
    for session in (one, two, three):
        assert {p.name for p in session.iterdir()} == FILES
    check_first(one, sent, first)
    check_second(two, first, second)
    check_reseeded(one, two)
    check_stopped(three, client_said)
    check_listing(folder, tiny_env)


def check_first(session: Path, sent: np.ndarray, result) -> None:
    frames = assert_consistent_wav(session / "dialogue.wav", 2)
    assert assert_consistent_wav(session / "user.wav", 1) == frames == assert_consistent_wav(session / "jmoshi.wav", 1)
    dialogue, _ = read_wav_pcm16(session / "dialogue.wav")
    user, _ = read_wav_pcm16(session / "user.wav")
    voice, _ = read_wav_pcm16(session / "jmoshi.wav")
    assert np.array_equal(dialogue[0], user[0]) and np.array_equal(dialogue[1], voice[0])
    user, voice = user[0], voice[0]
    assert frames >= 8 * FRAME_SIZE, frames
    # What the model heard is what was sent, after an Opus round trip, from its first sample.
    lag = lag_of_peak(sent, user, FRAME_SIZE)
    assert abs(lag) < FRAME_SIZE and correlation_at(sent, user, lag) > 0.5, (lag, correlation_at(sent, user, lag))
    # J-Moshi's voice: what the client decoded, which starts with the model's position 1 (position 0 is silent).
    assert not voice[:FRAME_SIZE].any()
    lag = lag_of_peak(voice, result.audio, 2 * FRAME_SIZE)
    assert abs(lag + FRAME_SIZE) < FRAME_SIZE, lag
    assert correlation_at(voice, result.audio, lag) > 0.5, correlation_at(voice, result.audio, lag)
    transcript = json.loads((session / "transcript.json").read_text())
    assert_same_pieces(transcript, result, answered_all=frames // FRAME_SIZE >= len(sent) // FRAME_SIZE - 1)
    assert all(p["time_s"] == round(p["frame"] * 0.08, 3) for p in transcript["pieces"])
    assert transcript["text"] and " " not in transcript["text"].strip()  # Japanese pieces joined without spaces
    info = meta(session)
    assert info["ended"] == "hang-up" and info["error"] is None
    assert info["sampling"] == SAMPLING and info["seed"] == 7
    assert (info["variant"], info["repo"], info["replica"]) == ("tiny", "jmoshi-test/tiny", None)
    assert re.fullmatch(r"[0-9a-f]{40}", info["commit"]) and info["revision"] == "main"
    assert info["runtime"]["moshi"] and info["runtime"]["torch"] and info["runtime"]["sphn"]
    assert (info["device"], info["precision"], info["dtype"]) == ("cpu", "bf16", "bfloat16")
    assert info["frames"] * FRAME_SIZE == frames and info["duration_s"] == round(frames / SAMPLE_RATE, 3)
    assert info["start_utc"] < info["end_utc"] and info["dropped_frames"] == 0


def sent_as(transcript: dict) -> list[str]:
    """The recorded pieces as the server sends them: joined by the transcript's rule, piece by piece."""
    from jmoshi_cli.upstream.moshi_server import BrowserText

    pieces = [p["piece"] for p in transcript["pieces"]]

    class Recorded:
        def id_to_piece(self, index: int) -> str:
            return pieces[index]

    browser = BrowserText(Recorded())
    return [browser.id_to_piece(i) for i in range(len(pieces))]


def assert_same_pieces(transcript: dict, result, answered_all: bool) -> None:
    """The recorded pieces are the text messages the client got, in order. A server slower than real
    time may still be answering when the client stops reading: what it said from then on is
    recorded, and never read by the client."""
    recorded = sent_as(transcript)
    assert recorded[:len(result.text_pieces)] == result.text_pieces
    if answered_all:
        # All but the last frame's piece: moshi.server 0.2.13 sends a frame's voice before its text, so a
        # client that hangs up once it has heard every frame can miss the last frame's text message.
        last = max(p["frame"] for p in transcript["pieces"])
        unread = transcript["pieces"][len(result.text_pieces):]
        assert all(p["frame"] == last for p in unread), (unread, len(result.text_pieces))


def check_second(session: Path, first, second) -> None:
    """The next conversation: its own audio and text only, from the model's frame 0 again."""
    user, _ = read_wav_pcm16(session / "user.wav")
    sent = speech_like(2.0)
    lag = lag_of_peak(sent, user[0], FRAME_SIZE)
    assert abs(lag) < FRAME_SIZE and correlation_at(sent, user[0], lag) > 0.5
    assert len(user[0]) < 3 * SAMPLE_RATE  # 2 s sent, nothing of the first conversation's 4 s
    transcript = json.loads((session / "transcript.json").read_text())
    assert_same_pieces(transcript, second, answered_all=len(user[0]) // FRAME_SIZE >= len(sent) // FRAME_SIZE - 1)
    assert meta(session)["ended"] == "hang-up"


def check_reseeded(one: Path, two: Path) -> None:
    """--seed seeds again at each conversation's start. The text for position 1 is sampled from the
    initial tokens alone (the user's frame 0 is dropped), so two conversations begin with the same
    piece; without reseeding the second would draw from where the first left the generator."""
    def opening(session: Path) -> list:
        pieces = json.loads((session / "transcript.json").read_text())["pieces"]
        return [(p["frame"], p["id"]) for p in pieces if p["frame"] <= 1]

    assert opening(one) == opening(two) and opening(one), (opening(one), opening(two))


def check_stopped(session: Path, client_said: str) -> None:
    frames = assert_consistent_wav(session / "dialogue.wav", 2)
    assert frames >= 10 * FRAME_SIZE
    assert assert_consistent_wav(session / "user.wav", 1) == frames
    info = meta(session)
    assert info["ended"] == "server-stop" and info["frames"] * FRAME_SIZE == frames, (info, client_said)


def check_listing(folder: Path, tiny_env) -> None:
    listed = run_cli("recordings", str(folder), "--json", env=child_env(tiny_env))
    assert listed.returncode == 0, listed.stderr
    rows = json.loads(listed.stdout)["sessions"]
    assert [r["ended"] for r in rows] == ["hang-up", "hang-up", "server-stop"]
    assert all(r["variant"] == "tiny" and r["duration_s"] > 0 for r in rows)
    table = run_cli("recordings", str(folder), env=child_env(tiny_env))
    assert table.returncode == 0 and "server-stop" in table.stderr and "3 conversation(s)" in table.stderr


@pytest.mark.usefixtures("tiny_downloaded")
@pytest.mark.slow
def test_a_killed_server_leaves_valid_files_and_says_so(tiny_env, tmp_path):
    folder = tmp_path / "study"
    # moshi.server killed with SIGKILL: jmoshi closes the files it left and says so.
    served, url = serve_recording(tiny_env, folder)
    client = Talking(url, 30.0, tmp_path / "client.log")
    try:
        wait_until(lambda: recorded_frames(folder, 10), 120, "a conversation on disk")
        for pid in children_of(served.process.pid):
            os.kill(pid, signal.SIGKILL)
        served.process.wait(60)  # jmoshi sees its child die and exits on its own
        code, err = served.stop()
    finally:
        served.stop()
        client_said = client.stop()
    assert code == 137, err
    assert "a recording was cut when its server died" in err
    (killed,) = sessions(folder)
    frames = assert_consistent_wav(killed / "dialogue.wav", 2)
    assert frames >= 10 * FRAME_SIZE and assert_consistent_wav(killed / "jmoshi.wav", 1) > 0
    info = meta(killed)
    assert info["ended"] == "interrupted" and info["frames"] == frames // FRAME_SIZE and info["end_utc"], \
        (info, client_said)
    assert {p.name for p in killed.iterdir()} == FILES and json.loads((killed / "transcript.json").read_text())

    # jmoshi itself killed with SIGKILL: its child dies with it and nobody closes anything. The files
    # still open; the listing says the conversation was interrupted; settling fixes the headers.
    served, url = serve_recording(tiny_env, folder)
    client = Talking(url, 30.0, tmp_path / "client2.log")
    try:
        wait_until(lambda: len(sessions(folder)) == 2 and recorded_frames(folder, 25), 120, "a second conversation")
        kids = children_of(served.process.pid)
        served.stop(signal.SIGKILL)
        wait_until(lambda: not any(Path(f"/proc/{k}").exists() for k in kids), 30, "the child to die")
    finally:
        served.stop()
        client_said = client.stop()
    cut = sessions(folder)[1]
    for name, channels in recordings.WAV_CHANNELS.items():
        assert assert_readable_wav(cut / name, channels) >= 12 * FRAME_SIZE  # headers lag at most a second
    assert meta(cut)["ended"] == "running", (meta(cut), client_said)
    rows = json.loads(run_cli("recordings", str(folder), "--json", env=child_env(tiny_env)).stdout)["sessions"]
    assert [r["ended"] for r in rows] == ["interrupted", "interrupted"]
    assert (cut / ".transcript.jsonl").exists()  # the text so far, as it streamed
    assert [s.path for s in store.settle(folder)] == [cut]
    frames = assert_consistent_wav(cut / "dialogue.wav", 2)
    assert meta(cut)["ended"] == "interrupted" and meta(cut)["frames"] == frames // FRAME_SIZE
    assert {p.name for p in cut.iterdir()} == FILES and json.loads((cut / "transcript.json").read_text())["pieces"]


@pytest.mark.usefixtures("tiny_downloaded")
@pytest.mark.slow
def test_a_full_disk_stops_the_recording_not_the_conversation(tiny_env, tmp_path):
    """DIR on a 128 KiB tmpfs (a mount namespace of its own): the three wavs take 15 KiB a frame, so about 7
    frames fit. The free-space floor is off (--min-free-mb 0): this is a disk that fills unexpectedly."""
    if not shutil.which("unshare") or subprocess.run(
            ["unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o size=64k tmpfs {tmp_path}"]).returncode:
        pytest.skip("cannot mount a small tmpfs in a private mount namespace here (unshare -rm)")
    folder = tmp_path / "small"
    folder.mkdir()
    port = free_port()
    script = (f"mount -t tmpfs -o size=128k tmpfs {folder} && exec {sys.executable} -m jmoshi_cli serve --variant tiny "
              f"--device cpu --port {port} --record {folder} --min-free-mb 0")
    served = Running(["unshare", "-rm", "sh", "-c", script], tiny_env)
    said = user_audio(4.0)
    try:
        served.wait_ready()
        result = converse_sync(f"ws://127.0.0.1:{port}/api/chat", said, until=answered(said))
    finally:
        code, err = served.stop()
    assert err.count("jmoshi recorder: recording stopped in") == 1, err
    assert "No space left on device; the conversation goes on" in err
    # The conversation went on well past the frames that fitted.
    assert result.audio_samples >= 20 * FRAME_SIZE and len(result.text_pieces) > 5, result
    assert "Traceback" not in err


@pytest.mark.usefixtures("tiny_downloaded")
@pytest.mark.slow
def test_replicas_record_into_one_folder_each_saying_which(tiny_env, tmp_path, haproxy_binary):
    import asyncio

    folder = tmp_path / "study"
    said = speech_like(2.0)
    served, url = serve_recording(tiny_env, folder, "--replicas", "2")
    try:
        async def both():  # one conversation on each replica, each until J-Moshi answered all of it
            return await asyncio.gather(converse(url, said, until=answered(said)),
                                        converse(url, said, until=answered(said)))

        results = asyncio.run(both())
        wait_until(lambda: ended(folder, 2), 60, "both recordings to close")
    finally:
        code, err = served.stop()
    assert code == 143, err
    found = sessions(folder)
    assert sorted(meta(s)["replica"] for s in found) == ["r0", "r1"]
    for session in found:
        assert {p.name for p in session.iterdir()} == FILES
        pieces = sent_as(json.loads((session / "transcript.json").read_text()))
        assert any(r.text_pieces and pieces[:len(r.text_pieces)] == r.text_pieces for r in results)


def test_an_unwritable_record_folder_fails_in_preflight(tiny_env, tmp_path):
    in_the_way = tmp_path / "a-file"
    in_the_way.write_text("not a folder")
    started = time.monotonic()
    result = jmoshi("serve", "--variant", "tiny", "--device", "cpu", "--port", str(free_port()), "--record",
                    str(in_the_way / "study"), env=child_env(tiny_env))
    assert result.returncode == 2, result.stderr
    assert f"--record {in_the_way / 'study'}: cannot create the folder: Not a directory" in result.stderr
    assert "hint: choose a folder you can write to with --record" in result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 2
    assert time.monotonic() - started < 30 and not Path(tiny_env["HF_HUB_CACHE"]).exists()  # nothing loaded


def test_a_read_only_record_folder_fails_in_preflight(tiny_env, tmp_path):
    folder = tmp_path / "study"
    folder.mkdir()
    command = (f"mount --bind {folder} {folder} && mount -o remount,bind,ro {folder} && exec {sys.executable} -m "
               f"jmoshi_cli serve --variant tiny --device cpu --port {free_port()} --record {folder}")
    if not shutil.which("unshare"):
        pytest.skip("no unshare to make a read-only mount")
    result = subprocess.run(["unshare", "-rm", "sh", "-c", command], env=child_env(tiny_env), capture_output=True,
                            text=True, timeout=120)
    if "mount:" in result.stderr:
        pytest.skip(f"cannot make a read-only bind mount here: {result.stderr.strip()}")
    assert result.returncode == 2, result.stderr
    assert f"--record {folder}: cannot write there: Read-only file system" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("flags, message", [
    (["--temp", "-1"], "temp must be a number >= 0, not -1.0"),
    (["--top-k-text", "-3"], "top_k_text must be an integer >= 0, not -3"),
    (["--seed", str(2**32)], f"--seed {2**32} is too large"),
])
def test_bad_sampling_flags_are_one_line_errors(tiny_env, flags, message):
    result = run_cli("serve", "--variant", "tiny", "--device", "cpu", *flags, env=child_env(tiny_env))
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr, result.stderr


def test_recordings_of_a_missing_folder_is_a_usage_error(tmp_path, tiny_env):
    result = run_cli("recordings", str(tmp_path / "nope"), env=child_env(tiny_env))
    assert result.returncode == 2 and "no such folder" in result.stderr and "Traceback" not in result.stderr


def test_recordings_lists_sessions_as_a_table_or_json(tmp_path, tiny_env):
    folder = tmp_path / "study"
    folder.mkdir()
    base = {"format": 1, "variant": "ext", "replica": None, "duration_s": 75.5, "end_utc": "2026-11-25T15:31:27.000Z",
            "server": {"host": "elsewhere"}}
    for name, ended_as in (("20261125T153012Z-aaaaaa", "hang-up"), ("20261125T160000Z-bbbbbb", "error")):
        (folder / name).mkdir()
        recordings.write_json(folder / name / "meta.json", dict(base, start_utc=name[:15], ended=ended_as))
    (folder / "20261125T170000Z-cccccc").mkdir()
    (folder / "20261125T170000Z-cccccc" / "meta.json").write_text("{not json")
    (folder / "notes").mkdir()  # no meta.json: not a recording, not listed
    rows = json.loads(run_cli("recordings", str(folder), "--json", env=child_env(tiny_env)).stdout)["sessions"]
    assert [(r["id"], r["ended"]) for r in rows] == [("20261125T153012Z-aaaaaa", "hang-up"),
                                                     ("20261125T160000Z-bbbbbb", "error"),
                                                     ("20261125T170000Z-cccccc", "unreadable")]
    assert rows[0]["duration_s"] == 75.5 and rows[2]["error"].startswith("meta.json")
    table = run_cli("recordings", str(folder), env=child_env(tiny_env))
    assert table.returncode == 0 and "1:16" in table.stderr and "3 conversation(s)" in table.stderr
    assert Ended.UNREADABLE.value in table.stderr
