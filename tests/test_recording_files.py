"""The recording pieces without a server: timeline, writer thread, WAV headers, repair, listing, settings."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
import wave
from pathlib import Path

import numpy as np
import pytest

from jmoshi_cli.audio_io import FRAME_SIZE, SAMPLE_RATE
from jmoshi_cli.backends.contract import ChildContract, Recording
from jmoshi_cli.model import lm_config
from jmoshi_cli.recording import format as recordings
from jmoshi_cli.recording import store, tap
from jmoshi_cli.recording import writer as rec_writer
from jmoshi_cli.recording.format import Ended
from jmoshi_cli.transcript import join_pieces

from builders import read_wav_pcm16


def frame(value: float) -> np.ndarray:
    return np.full(FRAME_SIZE, value, dtype=np.float32)


def positions(columns) -> list[tuple[int, float | None, float | None]]:
    def value(pcm):
        return None if pcm is None else round(float(pcm[0]), 3)

    return [(c.position, value(c.user), value(c.model)) for c in columns]


def test_aligner_puts_both_voices_on_the_model_timeline():
    aligner = rec_writer.Aligner(max_delay=1)
    # As the server calls: encode user frame s, step s, decode position s (none for position 0).
    assert positions(aligner.add_user(0, frame(0.0))) == []
    assert positions(aligner.add_user(1, frame(0.1))) == [(0, 0.0, None)]  # position 0: nothing from J-Moshi
    assert positions(aligner.add_model(1, frame(-0.1))) == [(1, 0.1, -0.1)]
    assert positions(aligner.add_user(2, frame(0.2))) == []
    assert positions(aligner.add_model(2, frame(-0.2))) == [(2, 0.2, -0.2)]
    # A frame lost on a full queue becomes silence once the next one shows it will not come.
    assert positions(aligner.add_user(4, frame(0.4))) == [(3, None, None)]
    assert positions(aligner.add_model(4, frame(-0.4))) == [(4, 0.4, -0.4)]
    assert positions(aligner.add_user(5, frame(0.5))) == []
    assert positions(aligner.flush()) == [(5, 0.5, None)]


def test_aligner_waits_for_a_model_with_more_delay():
    aligner = rec_writer.Aligner(max_delay=2)
    out = [*aligner.add_user(0, frame(0.0)), *aligner.add_user(1, frame(0.1)), *aligner.add_user(2, frame(0.2))]
    assert positions(out) == [(0, 0.0, None)]
    assert positions(aligner.add_model(1, frame(-0.1))) == [(1, 0.1, -0.1)]


@pytest.fixture(scope="module")
def tokenizer():
    import sentencepiece

    from jmoshi_cli.tiny_model import cached_tiny_repo

    return sentencepiece.SentencePieceProcessor(model_file=str(cached_tiny_repo() / "tokenizer_spm_32k_3.model"))


def run_writer(root: Path, tokenizer, frames: int, text_ids: dict[int, int], drop: frozenset[int] = frozenset(),
               ended: Ended = Ended.HANG_UP) -> tuple[rec_writer.SessionWriter, list[str]]:
    """A writer fed as the tap feeds it: user frame s, then J-Moshi's position s (from s = 1)."""
    notes: list[str] = []
    writer = rec_writer.SessionWriter(root, {"format": recordings.FORMAT, "variant": "tiny"}, tokenizer, 1,
                                      notes.append)
    writer.start()
    for s in range(frames):
        if s in drop:  # lost on a full queue
            writer.dropped += 1
        else:
            writer.put(rec_writer.UserFrame(s, frame(s / 100)))
        if s >= 1:
            writer.put(rec_writer.ModelFrame(s, frame(-s / 100), text_ids.get(s, 3)))
    writer.close(ended, None)
    writer.join(10)
    assert not writer.is_alive()
    return writer, notes


def test_writer_streams_three_aligned_wavs_a_transcript_and_meta(tmp_path, tokenizer):
    ids = {2: 5, 4: 0, 5: 7}  # 0 and 3 (the default here) are never shown, as upstream
    writer, notes = run_writer(tmp_path, tokenizer, 6, ids)
    folder = writer.folder
    assert folder.parent == tmp_path and {p.name for p in folder.iterdir()} == {
        "dialogue.wav", "user.wav", "jmoshi.wav", "transcript.json", "meta.json"}
    dialogue, rate = read_wav_pcm16(folder / "dialogue.wav")
    user, _ = read_wav_pcm16(folder / "user.wav")
    voice, _ = read_wav_pcm16(folder / "jmoshi.wav")
    assert rate == SAMPLE_RATE and dialogue.shape == (2, 6 * FRAME_SIZE)
    assert np.array_equal(dialogue[0], user[0]) and np.array_equal(dialogue[1], voice[0])
    starts = np.arange(6) * FRAME_SIZE
    assert np.allclose(user[0][starts], np.arange(6) / 100, atol=1e-4)
    assert np.allclose(voice[0][starts], [0.0, *(-np.arange(1, 6) / 100)], atol=1e-4)
    transcript = json.loads((folder / "transcript.json").read_text())
    assert [(p["frame"], p["time_s"], p["id"]) for p in transcript["pieces"]] == [(2, 0.16, ids[2]), (5, 0.4, 7)]
    assert transcript["text"] == join_pieces(p["piece"] for p in transcript["pieces"])
    assert not (folder / ".transcript.jsonl").exists()  # the journal the text streamed to is gone
    meta = json.loads((folder / "meta.json").read_text())
    assert (meta["ended"], meta["frames"], meta["duration_s"], meta["dropped_frames"]) == ("hang-up", 6, 0.48, 0)
    assert meta["start_utc"] <= meta["end_utc"] and meta["id"] == folder.name
    assert notes == [f"jmoshi recorder: saved {folder} (0.5 s, hang-up)"]


def test_a_dropped_frame_is_silence_and_counted(tmp_path, tokenizer):
    writer, _ = run_writer(tmp_path, tokenizer, 5, {}, drop=frozenset({2}))
    user, _ = read_wav_pcm16(writer.folder / "user.wav")
    assert user.shape[1] == 5 * FRAME_SIZE and not user[0][2 * FRAME_SIZE:3 * FRAME_SIZE].any()
    assert json.loads((writer.folder / "meta.json").read_text())["dropped_frames"] == 1


def test_a_killed_writer_leaves_readable_wavs_that_settle_repairs(tmp_path):
    path = tmp_path / "user.wav"
    stream = rec_writer.WavStream(path, 1)
    stream.write(np.arange(2 * FRAME_SIZE, dtype="<i2"))
    stream.sync()
    stream.write(np.arange(FRAME_SIZE + 7, dtype="<i2"))  # written, never synced: then the process died
    stream.file.flush()
    with wave.open(str(path)) as w:
        assert w.getnframes() == 2 * FRAME_SIZE  # the header claims what was synced, never more
    assert store.repair_wav(path, 1) == 3 * FRAME_SIZE + 7
    with wave.open(str(path)) as w:
        assert w.getnframes() == 3 * FRAME_SIZE + 7
    assert path.stat().st_size == 44 + 2 * (3 * FRAME_SIZE + 7)


def gone_server() -> dict:
    """The identity of a process that has ended."""
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        identity = dict(recordings.server_identity(), pid=process.pid,
                        start_ticks=recordings.start_ticks(process.pid))
    finally:
        process.kill()
        process.wait()
    return identity


def make_session(root: Path, name: str, server: dict, ended: str = "running", frames: int = 3) -> Path:
    folder = root / name
    folder.mkdir(parents=True)
    for wav_name, channels in recordings.WAV_CHANNELS.items():
        data = np.zeros(frames * FRAME_SIZE * channels, dtype="<i2").tobytes()
        (folder / wav_name).write_bytes(recordings.wav_header(channels, 0) + data)  # header never updated
    recordings.write_json(folder / "meta.json", {"format": 1, "variant": "ext", "ended": ended, "server": server,
                                                 "start_utc": "2026-11-25T15:30:12.000Z", "frames": 0})
    recordings.write_transcript(folder)
    (folder / ".transcript.jsonl").write_text(recordings.piece_line(1, 5, "\u2581今日は") + recordings.piece_line(
        2, 6, "\u2581晴れ") + '{"frame": 3, "ti')  # the last line cut short by the kill
    return folder


def test_settle_closes_only_sessions_whose_server_is_gone(tmp_path):
    dead = make_session(tmp_path, "20261125T153012Z-aaaaaa", gone_server())
    alive = make_session(tmp_path, "20261125T153013Z-bbbbbb", recordings.server_identity())
    elsewhere = make_session(tmp_path, "20261125T153014Z-cccccc", {"host": "another-machine", "pid": 1})
    done = make_session(tmp_path, "20261125T153015Z-dddddd", gone_server(), ended="hang-up")
    listed = {s.path.name: s.ended for s in store.list_sessions(tmp_path)}
    assert listed == {dead.name: Ended.INTERRUPTED, alive.name: Ended.RUNNING, elsewhere.name: Ended.RUNNING,
                      done.name: Ended.HANG_UP}
    settled = store.settle(tmp_path)
    assert [s.path for s in settled] == [dead]
    meta = json.loads((dead / "meta.json").read_text())
    assert (meta["ended"], meta["frames"], meta["duration_s"]) == ("interrupted", 3, 0.24) and meta["end_utc"]
    transcript = json.loads((dead / "transcript.json").read_text())
    assert [(p["frame"], p["time_s"], p["piece"]) for p in transcript["pieces"]] == [(1, 0.08, "\u2581今日は"),
                                                                                     (2, 0.16, "\u2581晴れ")]
    assert transcript["text"] == "今日は晴れ" and not (dead / ".transcript.jsonl").exists()
    with wave.open(str(dead / "dialogue.wav")) as w:
        assert (w.getnchannels(), w.getnframes()) == (2, 3 * FRAME_SIZE)
    with wave.open(str(alive / "dialogue.wav")) as w:
        assert w.getnframes() == 0  # a running server's files are left alone
    assert store.settle(tmp_path) == []


def test_sampling_config_is_what_moshi_reads_lm_gen_config_from(tmp_path, monkeypatch):
    from moshi.models import loaders

    from jmoshi_cli.tiny_model import cached_tiny_repo

    monkeypatch.setenv("JMOSHI_HOME", str(tmp_path / "home"))
    overrides = {"temp": 0.6, "top_k_text": 20}
    # J-Moshi's repos have no config.json: moshi's built-in Moshi-7B kwargs, plus the values.
    built_in = lm_config.with_sampling(None, overrides, tmp_path / "home")
    config = json.loads(built_in.read_text())
    assert {k: v for k, v in config.items() if k != "lm_gen_config"} == loaders._lm_kwargs
    # A variant with a config.json keeps it and gets lm_gen_config added.
    tiny = lm_config.with_sampling(cached_tiny_repo() / "config.json", overrides, tmp_path / "home")
    assert json.loads(tiny.read_text())["dim"] == json.loads((cached_tiny_repo() / "config.json").read_text())["dim"]
    assert lm_config.with_sampling(None, overrides, tmp_path / "home") == built_in  # named by content: made once
    for path in (built_in, tiny):
        info = loaders.CheckpointInfo.from_hf_repo("x/y", Path("lm"), Path("mimi"), Path("tok"), config_path=path)
        assert info.lm_gen_config == overrides


def test_the_recorder_reads_what_serve_hands_the_child(tmp_path):
    contract = ChildContract(record=Recording(str(tmp_path), {"variant": "ext", "commit": "c" * 40}), seed=7,
                             sampling={"temp": 0.5})
    settings = tap.Settings.from_contract(ChildContract.from_env(contract.to_env()))
    assert settings == tap.Settings(tmp_path, {"variant": "ext", "commit": "c" * 40}, 7, {"temp": 0.5}, None,
                                    min_free_mb=1024)
    assert tap.Settings.from_contract(ChildContract(replica="r1")) == tap.Settings(replica="r1", min_free_mb=1024)
    assert not tap.Settings.from_contract(ChildContract()).wanted


def test_the_tap_refuses_a_server_without_the_chat_handler():
    from aiohttp import web

    from jmoshi_cli.upstream import moshi_server

    app = web.Application()

    async def index(request):
        return web.Response(text="hi")

    app.router.add_get("/", index)
    with pytest.raises(RuntimeError, match="no /api/chat handler"):
        moshi_server.server_state(app)


def test_check_dir_creates_the_folder_and_leaves_nothing_behind(tmp_path):
    folder = store.check_dir(tmp_path / "a" / "b")
    assert folder.is_dir() and list(folder.iterdir()) == []
    assert recordings.folder_name(recordings.utc_now()) != recordings.folder_name(recordings.utc_now())


def test_below_the_free_space_floor_the_recording_stops_says_why_and_ends_the_conversation(tmp_path, tokenizer):
    ended = threading.Event()
    notes: list[str] = []
    floor = shutil.disk_usage(tmp_path).free + 2**40  # never met: the first check (a second in) stops it
    writer = rec_writer.SessionWriter(tmp_path, {"format": recordings.FORMAT}, tokenizer, 1, notes.append,
                                      min_free_bytes=floor, on_low_disk=ended.set)
    writer.start()
    for s in range(100):
        writer.put(rec_writer.UserFrame(s, frame(0.01)))
        if ended.wait(0.05):
            break
    assert ended.is_set()  # the conversation is told to end (gate.py closes it, saying why)
    writer.close(Ended.DISK_LOW, None)
    writer.join(10)
    meta = json.loads((writer.folder / "meta.json").read_text())
    assert meta["ended"] == "disk-low" and "MB free on the disk" in meta["recording_stopped"]
    assert any("recording stopped" in note for note in notes)


def test_a_conversation_without_audio_leaves_no_folder(tmp_path, tokenizer):
    writer = rec_writer.SessionWriter(tmp_path, {"format": recordings.FORMAT}, tokenizer, 1, lambda note: None)
    writer.start()
    writer.close(Ended.IDLE, None)
    writer.join(10)
    assert not writer.is_alive() and not list(tmp_path.iterdir())


@pytest.mark.parametrize("raised, ended", [(ConnectionResetError, "hang-up"), (BrokenPipeError, "hang-up"),
                                           (ConnectionAbortedError, "hang-up"), (RuntimeError, "error")])
def test_a_client_that_left_is_a_hang_up_however_its_socket_says_so(tmp_path, tokenizer, raised, ended):
    """The recorder's middleware on a real aiohttp server, a real websocket client: the handler records two
    frames, then fails as sending to a client that has gone fails (a reset, EPIPE, an abort), or as a bug does."""
    import asyncio

    import aiohttp
    from aiohttp import web

    recorder = tap.Recorder(tap.Settings(record_dir=tmp_path), lambda note: None)

    async def chat(request):
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        recorder.conversation_starts()
        for position in range(2):
            recorder.heard(frame(0.1))
            recorder.stepped(None if position == 0 else np.full((1, 1, 1), 3))
            if position:
                recorder.said(frame(-0.1))
        raise raised("as the socket said")

    async def scenario():
        app = web.Application()
        app.router.add_get("/api/chat", chat)
        recorder.attach(app, tap.ModelFacts(tokenizer, 1, {}), runtime={})
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        try:
            async with aiohttp.ClientSession() as session, session.ws_connect(f"ws://127.0.0.1:{port}/api/chat") as ws:
                await ws.receive(timeout=30)  # the server's end of the conversation
        finally:
            await runner.cleanup()

    asyncio.run(scenario())
    for writer in recorder.writers:
        writer.join(30)
    (session,) = store.list_sessions(tmp_path)
    meta = json.loads((session.path / "meta.json").read_text())
    assert meta["ended"] == ended
    assert (meta["error"] is None) == (ended == "hang-up"), meta["error"]
