"""`jmoshi serve --backend mlx` as a user runs it: the tiny model downloaded from the loopback hub,
verified, converted once, served by jmoshi's MLX server on MLX's CPU backend, spoken to through
/api/chat, recorded with --record. Needs `.[mlx]`."""

from __future__ import annotations

import json
import socket
import wave

import pytest

pytest.importorskip("moshi_mlx", reason="the MLX runtime is not installed (pip install -e '.[mlx]')")

from conftest import TEST_TOKEN, child_env, jmoshi  # noqa: E402
from jmoshi_cli.transcript import join_pieces  # noqa: E402

from helpers import Served, answered, converse_sync, japanese, user_audio, wait_until  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_serve_backend_mlx_downloads_converts_talks_and_records(tiny_env, tmp_path):
    port, study = free_port(), tmp_path / "study"
    served = Served(["--backend", "mlx", "--variant", "tiny", "--quantize", "bf16", "--port", str(port),
                     "--record", str(study)], child_env(tiny_env))
    try:
        url = served.wait_ready()
        said = user_audio(3.2)
        result = converse_sync(f"ws://127.0.0.1:{port}/api/chat", said, until=answered(said))
    finally:
        code, err = served.stop()
    assert url.strip() == f"http://127.0.0.1:{port}/?token={TEST_TOKEN}" and code == 143, err
    assert "starting jmoshi's MLX server (tiny" in err and "converting" in err and "far slower than real time" in err
    assert result.audio_samples > 0 and japanese("".join(result.text_pieces)), result.text_pieces
    assert "a browser connected" in err and "frames, median" in err  # the same console lines as on torch
    sessions = [p for p in study.iterdir() if p.is_dir()]
    assert len(sessions) == 1
    meta_path = sessions[0] / "meta.json"
    wait_until(lambda: json.loads(meta_path.read_text()).get("ended") not in (None, "running"), 30, "the recording")
    meta = json.loads(meta_path.read_text())
    assert (meta["variant"], meta["precision"], meta["device"]) == ("tiny", "bf16", "cpu")
    assert meta["runtime"]["mlx"] and meta["runtime"]["moshi_mlx"] == "0.3.0"
    with wave.open(str(sessions[0] / "dialogue.wav")) as dialogue:
        assert dialogue.getnchannels() == 2 and dialogue.getframerate() == 24000 and dialogue.getnframes() > 0
    transcript = json.loads((sessions[0] / "transcript.json").read_text())
    sent = "".join(result.text_pieces)
    assert transcript["text"] == join_pieces(p["piece"] for p in transcript["pieces"])
    assert sent and transcript["text"].startswith(sent[: len(sent) // 2])  # what the browser read, recorded

    # Offline, the second time: nothing fetched, the conversion kept (made once), the same server.
    port = free_port()
    again = Served(["--backend", "mlx", "--variant", "tiny", "--quantize", "bf16", "--port", str(port), "--offline"],
                   child_env(tiny_env))
    try:
        again.wait_ready()
        second = converse_sync(f"ws://127.0.0.1:{port}/api/chat", said, until=answered(said))
    finally:
        _, err = again.stop()
    assert "converting" not in err and "downloading" not in err, err
    assert second.audio_samples > 0 and japanese("".join(second.text_pieces))


@pytest.mark.slow
def test_serve_backend_mlx_refuses_what_it_cannot_do_before_anything_loads(tiny_env):
    for flags, needle in ((["--replicas", "2"], "--replicas is not offered"), (["--half"], "--half is for NVIDIA"),
                          (["--quantize", "fp8"], "is not one of auto, bf16, int8, int4")):
        done = jmoshi("serve", "--backend", "mlx", "--variant", "tiny", "--port", str(free_port()), *flags,
                      env=child_env(tiny_env), timeout=120)
        assert done.returncode == 2 and needle in done.stderr and "Traceback" not in done.stderr, done.stderr


@pytest.mark.slow
def test_selftest_on_the_mlx_backend(tiny_env):
    done = jmoshi("selftest", "--backend", "mlx", "--json", env=child_env(tiny_env), timeout=600)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert out["server"] == "jmoshi's MLX server" and out["audio_samples"] > 0 and out["text_pieces"] > 0
