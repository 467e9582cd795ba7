"""`jmoshi infer` through the CLI: tiny model downloaded from the loopback hub, CPU, real files."""

from __future__ import annotations

import json
import wave
from pathlib import Path

import pytest

from conftest import SHARED_AUDIO, child_env, jmoshi, run_cli
from jmoshi_cli import audio_io
from jmoshi_cli.audio_io import FRAME_SIZE, SAMPLE_RATE
from jmoshi_cli.selftest import speech_like


def write_wav(path: Path, seconds: float, rate: int = SAMPLE_RATE) -> Path:
    audio_io.write_wav(path, speech_like(seconds, rate), rate)
    return path


@pytest.mark.usefixtures("tiny_downloaded")
@pytest.mark.slow
def test_infer_writes_results_and_one_bad_file_does_not_lose_the_others(tiny_env, tmp_path):
    env = child_env(tiny_env)
    good = write_wav(tmp_path / "hello.wav", 1.5, rate=16000)
    bad = tmp_path / "broken.wav"
    bad.write_bytes(b"RIFF not really a wave file")
    out = tmp_path / "out"
    result = jmoshi("infer", str(good), str(bad), "--variant", "tiny", "--device", "cpu", "--seed", "3",
                    "--out", str(out), "--json", env=env, timeout=300)
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    rows = {Path(r["source"]).name: r for r in json.loads(result.stdout)["files"]}
    assert rows["broken.wav"]["ok"] is False and rows["broken.wav"]["error"]
    ok = rows["hello.wav"]
    assert ok["ok"] is True
    with wave.open(ok["outputs"]["dialogue"]) as dialogue:
        assert dialogue.getnchannels() == 2 and dialogue.getframerate() == SAMPLE_RATE
        assert dialogue.getnframes() == 19 * FRAME_SIZE  # 1.5 s -> 36000 samples -> 19 whole 80 ms frames
    transcript = json.loads(Path(ok["outputs"]["transcript"]).read_text())
    assert transcript  # written, with the joined text
    assert "left channel" in result.stderr and "real-time factor" in result.stderr
    assert "bitsandbytes" not in result.stderr  # moshi's import noise stays out of a normal run


def test_infer_with_no_audio_in_a_folder_is_a_usage_error(tiny_env, tmp_path):
    (tmp_path / "notes.txt").write_text("no audio here")
    result = run_cli("infer", str(tmp_path), "--device", "cpu", env=child_env(tiny_env))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and "error:" in result.stderr


@pytest.mark.usefixtures("tiny_downloaded")
@pytest.mark.slow
@pytest.mark.skipif(not (SHARED_AUDIO / "prompt-62.wav").is_file(), reason="../shared/audio is not present")
def test_infer_stereo_32k_prompt_right_channel(tiny_env, tmp_path):
    """The shared J-Moshi prompt as it is recorded (stereo, 32 kHz), its first 2.5 s: the model runs per 80 ms
    frame, so a longer cut tests nothing more and costs a frame's compute each."""
    from jmoshi_cli.audio_io import read_audio
    from jmoshi_cli.audio_io import write_wav as write_pcm

    prompt = read_audio(SHARED_AUDIO / "prompt-62.wav")
    assert (prompt.pcm.shape[0], prompt.sample_rate) == (2, 32000)
    clip = tmp_path / "prompt-62.wav"
    write_pcm(clip, prompt.pcm[:, :80000], 32000)
    result = jmoshi("infer", str(clip), "--variant", "tiny", "--device", "cpu", "--channel", "right",
                    "--out", str(tmp_path / "o"), "--json", env=child_env(tiny_env), timeout=600)
    assert result.returncode == 0, result.stderr
    row = json.loads(result.stdout)["files"][0]
    assert row["channel"] == "right" and row["audio_s"] == pytest.approx(2.5, abs=0.05)
