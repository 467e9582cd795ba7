"""Files whose header lies: a rate of 1 Hz, or hours of audio in a small file. They are refused from
the header, before a sample is decoded or resampled, in one line naming the file, and the files beside
them are still analysed (`analyze`) or processed (`infer`)."""

from __future__ import annotations

import json
import os
import struct
import wave
from pathlib import Path

import numpy as np
import pytest

from conftest import run_cli
from jmoshi_cli import audio_io
from jmoshi_cli.audio_io import MAX_SECONDS, AudioReadError


def _env(tmp_path) -> dict:
    return {**os.environ, "NO_COLOR": "1", "JMOSHI_HOME": str(tmp_path / "home"), "COLUMNS": "200"}


def one_hz_stereo(path: Path, frames: int = 200_000) -> Path:
    """A real 16-bit stereo WAV, 800 KB of samples, whose header says 1 Hz (4.8 billion samples at 24 kHz)."""
    rng = np.random.default_rng(0)
    with wave.open(str(path), "wb") as w:
        w.setnchannels(2)
        w.setsampwidth(2)
        w.setframerate(1)
        w.writeframes((rng.standard_normal((frames, 2)) * 3000).astype("<i2").tobytes())
    return path


def wav_header(path: Path, rate: int, channels: int, data_bytes: int, size: int) -> Path:
    """A 16-bit PCM WAV header claiming ``data_bytes`` of samples, the file ``size`` bytes long (sparse:
    the disk holds only the header)."""
    fmt = struct.pack("<IHHIIHH", 16, 1, channels, rate, rate * channels * 2, channels * 2, 16)
    header = (b"RIFF" + struct.pack("<I", min(36 + data_bytes, 0xFFFFFFFF)) + b"WAVEfmt " + fmt + b"data"
              + struct.pack("<I", data_bytes))
    with path.open("wb") as file:
        file.write(header)
        file.truncate(size)
    return path


def good_stereo(path: Path, seconds: float = 3.0, rate: int = 16000) -> Path:
    """A short two-speaker file: a burst of noise on each channel, one after the other."""
    rng = np.random.default_rng(1)
    pcm = np.zeros((2, int(seconds * rate)), dtype=np.float32)
    pcm[0, int(0.3 * rate):int(1.2 * rate)] = 0.2 * rng.standard_normal(int(0.9 * rate))
    pcm[1, int(1.6 * rate):int(2.6 * rate)] = 0.2 * rng.standard_normal(int(1.0 * rate))
    audio_io.write_wav(path, pcm, rate)
    return path


@pytest.fixture
def no_decoding(monkeypatch):
    """Make decoding fail loudly: what is refused must be refused from the header alone."""
    import sphn

    def refuse(*args, **kwargs):
        raise AssertionError("the samples were decoded")

    monkeypatch.setattr(sphn, "read", refuse)
    monkeypatch.setattr(sphn, "read_opus", refuse)
    monkeypatch.setattr(audio_io, "resample", refuse)


def test_a_one_hz_header_is_refused_before_decoding(tmp_path, no_decoding):
    path = one_hz_stereo(tmp_path / "one-hz.wav")
    with pytest.raises(AudioReadError, match=r"implausible sample rate 1 Hz \(jmoshi reads 8000 to 384000 Hz\)") as err:
        audio_io.read_audio(path)
    assert "header" in err.value.hint and "\n" not in err.value.one_line()


def test_a_header_claiming_a_huge_count_at_one_hz_is_refused_before_decoding(tmp_path, no_decoding):
    path = wav_header(tmp_path / "huge.wav", rate=1, channels=2, data_bytes=0xFFFFFF00, size=4096)
    with pytest.raises(AudioReadError, match="implausible sample rate 1 Hz"):
        audio_io.read_audio(path)


@pytest.mark.parametrize("rate", [7999, 384001, 10_000_000])
def test_rates_outside_the_range_are_refused(tmp_path, no_decoding, rate):
    path = wav_header(tmp_path / "odd.wav", rate=rate, channels=1, data_bytes=2000, size=2044)
    with pytest.raises(AudioReadError, match=f"implausible sample rate {rate} Hz"):
        audio_io.read_audio(path)


def test_hours_past_the_limit_are_refused_from_the_header(tmp_path, no_decoding):
    seconds = MAX_SECONDS + 600
    data = seconds * 8000 * 2  # 8 kHz mono 16-bit, a sparse file as long as the header says
    path = wav_header(tmp_path / "long.wav", rate=8000, channels=1, data_bytes=data, size=44 + data)
    with pytest.raises(AudioReadError, match=r"4\.2 hours long, more than the 4 hours") as err:
        audio_io.read_audio(path)
    assert "split it" in err.value.hint


def test_a_streamed_header_claiming_4_gb_reads_what_the_file_holds(tmp_path):
    """Writers that stream leave the data size at its maximum: the file's real size decides, not the claim."""
    path = wav_header(tmp_path / "streamed.wav", rate=48000, channels=2, data_bytes=0xFFFFFFFF, size=44 + 4000)
    audio = audio_io.read_audio(path)
    assert (audio.channels, audio.sample_rate, audio.samples) == (2, 48000, 1000)


def test_the_decoded_rate_is_checked_when_the_header_cannot_be_probed(tmp_path, monkeypatch):
    import sphn

    def unreadable(path):
        raise ValueError("no header probe")

    monkeypatch.setattr(sphn, "FileReader", unreadable)
    monkeypatch.setattr(audio_io, "resample", unreadable)
    with pytest.raises(AudioReadError, match="implausible sample rate 1 Hz"):
        audio_io.read_audio(one_hz_stereo(tmp_path / "one-hz.wav", frames=100))


def test_running_out_of_memory_while_decoding_is_a_read_error(tmp_path, monkeypatch):
    import sphn

    def no_memory(path):
        raise MemoryError

    monkeypatch.setattr(sphn, "read", no_memory)
    with pytest.raises(AudioReadError, match="not enough memory to decode it"):
        audio_io.read_audio(good_stereo(tmp_path / "good.wav"))


def test_resampling_refuses_an_output_past_the_limit_before_allocating():
    x = np.zeros(MAX_SECONDS + 60, dtype=np.float32)  # 4 hours and a minute at 1 Hz
    with pytest.raises(AudioReadError, match="hours long"):
        audio_io.resample(x, 1, 24000)
    assert len(audio_io.resample(x[:100], 1, 24000)) == 2_400_000  # short enough: resampled as asked


def test_analyze_reports_the_bad_file_and_analyses_the_good_one(tmp_path):
    good = good_stereo(tmp_path / "good.wav")
    bad = one_hz_stereo(tmp_path / "one-hz.wav")
    done = run_cli("analyze", str(bad), str(good), env=_env(tmp_path))
    assert done.returncode == 1, done.stderr
    assert "(3.0 s)" in done.stderr and "IPU J-Moshi" in done.stderr  # the good file's table (its title wraps)
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: {bad}: implausible sample rate 1 Hz (jmoshi reads 8000 to 384000 Hz); the header is "
                      "probably damaged: if the samples are fine, rewrite it with the rate they were recorded at"]
    assert "Traceback" not in done.stderr + done.stdout

    as_json = run_cli("analyze", str(bad), str(good), "--json", env=_env(tmp_path))
    out = json.loads(as_json.stdout)
    assert as_json.returncode == 1 and [f["path"] for f in out["files"]] == [str(good)]
    assert [(p["path"], p["exit_code"]) for p in out["problems"]] == [(str(bad), 1)]


def test_an_unexpected_failure_in_one_file_names_it_and_the_others_go_on(tmp_path, monkeypatch):
    from jmoshi_cli.analysis import pipeline

    good, broken = good_stereo(tmp_path / "good.wav"), good_stereo(tmp_path / "broken.wav")
    analyze_file = pipeline.analyze_file

    def flaky(path, params):
        if Path(path).name == "broken.wav":
            raise MemoryError
        if Path(path).name == "bug.wav":
            raise RuntimeError("boom\nsecond line")
        return analyze_file(path, params)

    monkeypatch.setattr(pipeline, "analyze_file", flaky)
    bug = good_stereo(tmp_path / "bug.wav")
    done = run_cli("analyze", str(broken), str(bug), str(good), "--json", env=_env(tmp_path))
    assert done.returncode == 1, done.stderr
    out = json.loads(done.stdout)
    assert [f["path"] for f in out["files"]] == [str(good)]
    assert {p["path"]: p["error"] for p in out["problems"]} == {
        str(broken): f"{broken}: not enough memory to analyse it",
        str(bug): f"{bug}: internal error: RuntimeError: boom (please report it)"}
    assert "Traceback" not in done.stderr


def test_infer_refuses_a_one_hz_file_in_one_line(tmp_path, no_decoding):
    from jmoshi_cli.infer import InferOptions, Session
    from jmoshi_cli.infer.inputs import load_user

    bad = one_hz_stereo(tmp_path / "one-hz.wav")
    with pytest.raises(AudioReadError, match="implausible sample rate 1 Hz.*; the header is probably damaged"):
        load_user(bad, "left")
    result = Session(model=None, options=InferOptions(device="cpu")).run_file(bad, tmp_path / "out")  # type: ignore[arg-type]
    assert not result.ok and result.error is not None and "\n" not in result.error
    assert result.error.startswith(f"cannot read {bad}: implausible sample rate 1 Hz")
