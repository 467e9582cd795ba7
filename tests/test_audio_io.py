"""Audio in and out: resampling with no delay and exact lengths, channel picking, WAV writing."""

from __future__ import annotations

import math
import os
import wave
from pathlib import Path

import numpy as np
import pytest

from jmoshi_cli import audio_io
from jmoshi_cli.audio_io import FRAME_S, FRAME_SIZE, SAMPLE_RATE

from builders import read_wav_pcm16

SHARED_AUDIO = Path(__file__).resolve().parents[2] / "shared" / "audio"
RATES = (8000, 11025, 16000, 22050, 32000, 44100, 48000, 96000)


def test_constants_are_mimis_frame():
    assert (SAMPLE_RATE, FRAME_SIZE, FRAME_S) == (24000, 1920, 0.08)


@pytest.mark.parametrize(("src", "dst"), [(rate, SAMPLE_RATE) for rate in RATES] + [(24000, 16000), (44100, 48000)])
def test_resample_length_is_exactly_the_ceiling(src, dst):
    for n in [*range(1, 40), 1001, src - 1, src, src + 1, 3 * src + 17]:
        y = audio_io.resample(np.ones(n, np.float32), src, dst)
        assert len(y) == audio_io.resampled_length(n, src, dst) == math.ceil(n * dst / src), n
        assert y.dtype == np.float32
    assert len(audio_io.resample(np.zeros(0, np.float32), src, dst)) == 0


@pytest.mark.parametrize("rate", RATES)
def test_resample_has_no_delay(rate):
    """A chirp sweeping the speech band comes out equal to the same chirp sampled at 24 kHz: a delay of
    a hundredth of a sample would already show at 5 kHz (2 pi 5000 / 24000 / 100 = 0.013)."""
    n = 2 * rate
    top = 0.4 * min(rate, SAMPLE_RATE)

    def chirp(t: np.ndarray) -> np.ndarray:
        envelope = np.sin(np.pi * t / 2.0) ** 2  # 2 s, smooth at both ends
        return envelope * np.sin(2 * np.pi * (100 * t + (top - 100) / 4.0 * t ** 2))

    y = audio_io.resample(chirp(np.arange(n) / rate).astype(np.float32), rate, SAMPLE_RATE)
    ref = chirp(np.arange(len(y)) / SAMPLE_RATE)
    assert np.abs(y - ref).max() < 2e-3


@pytest.mark.parametrize("rate", (16000, 22050, 32000, 44100, 48000))
def test_resample_impulse_stays_in_place(rate):
    for pos in (1000, 1001, 1234, 2047):
        x = np.zeros(4000, np.float32)
        x[pos] = 1.0
        y = audio_io.resample(x, rate, SAMPLE_RATE)
        assert abs(int(np.argmax(y)) - pos * SAMPLE_RATE / rate) <= 0.5, pos


def _fft_resample(x: np.ndarray, src: int, dst: int) -> np.ndarray:
    """The exact band-limited resampling of a periodic signal, by zero-padding or cutting its spectrum."""
    m = len(x) * dst // src
    spectrum = np.fft.rfft(x.astype(np.float64))
    out = np.zeros(m // 2 + 1, complex)
    k = min(len(spectrum), len(out))
    out[:k] = spectrum[:k]
    return np.fft.irfft(out, m) * m / len(x)


def _low_pass(y: np.ndarray, rate: int, top_hz: float) -> np.ndarray:
    spectrum = np.fft.rfft(y)
    spectrum[np.fft.rfftfreq(len(y), 1 / rate) > top_hz] = 0
    return np.fft.irfft(spectrum, len(y))


@pytest.mark.skipif(not (SHARED_AUDIO / "prompt-62.wav").is_file(), reason="../shared/audio is not present")
def test_resample_the_32k_prompt_like_an_exact_band_limited_resampler():
    """Both voices of the 10 s stereo prompt: exact length, and below 10 kHz (the filter's transition band
    is above) within -100 dB of the exact band-limited result, away from the ends where it wraps."""
    audio = audio_io.read_audio(SHARED_AUDIO / "prompt-62.wav")
    assert (audio.sample_rate, audio.samples) == (32000, 320000)
    for channel in audio.pcm:
        y = audio_io.resample(channel, 32000, SAMPLE_RATE)
        assert len(y) == 240000
        ours = _low_pass(y.astype(np.float64), SAMPLE_RATE, 10000)[2400:-2400]
        exact = _low_pass(_fft_resample(channel, 32000, SAMPLE_RATE), SAMPLE_RATE, 10000)[2400:-2400]
        error_db = 20 * np.log10(np.sqrt(np.mean((ours - exact) ** 2)) / np.sqrt(np.mean(exact ** 2)))
        assert error_db < -100


def test_resample_same_rate_is_a_copy():
    x = np.arange(5, dtype=np.float32)
    y = audio_io.resample(x, 24000, 24000)
    assert y is not x and y.tolist() == x.tolist()


def test_pick_channel():
    pcm = np.stack([np.full(4, 0.5, np.float32), np.full(4, -0.25, np.float32)])
    assert audio_io.pick_channel(pcm, "left")[0].tolist() == [0.5] * 4
    assert audio_io.pick_channel(pcm, "right")[0].tolist() == [-0.25] * 4
    assert audio_io.pick_channel(pcm, "mix")[0].tolist() == [0.125] * 4
    assert audio_io.pick_channel(pcm[:1], "right")[1] == "mono"


def test_write_wav_is_16_bit_pcm_and_reads_back(tmp_path):
    stereo = np.stack([np.linspace(-1, 1, 480, dtype=np.float32), np.full(480, 0.25, np.float32)])
    path = tmp_path / "out.wav"
    audio_io.write_wav(path, stereo, 24000)
    with wave.open(str(path), "rb") as w:
        assert (w.getnchannels(), w.getsampwidth(), w.getframerate(), w.getnframes()) == (2, 2, 24000, 480)
    pcm, rate = read_wav_pcm16(path)
    assert rate == 24000
    np.testing.assert_allclose(pcm, stereo, atol=1 / 32767)
    decoded = audio_io.read_audio(path)  # and the product's reader agrees
    assert (decoded.channels, decoded.sample_rate, decoded.samples) == (2, 24000, 480)


def test_write_wav_replaces_in_one_step(tmp_path):
    path = tmp_path / "out.wav"
    audio_io.write_wav(path, np.zeros(100, np.float32), 16000)
    before = path.read_bytes()
    (tmp_path / "blocked.wav").mkdir()
    with pytest.raises(OSError):
        audio_io.write_wav(tmp_path / "blocked.wav", np.zeros(100, np.float32), 16000)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blocked.wav", "out.wav"]  # no temporary file left


def test_files_written_in_one_step_follow_the_umask(tmp_path):
    from jmoshi_cli.fsutil import atomic_write, current_umask

    previous = os.umask(0o002)  # a lab's group shares results
    try:
        assert current_umask() == 0o002
        atomic_write(tmp_path / "shared.wav", b"data")
        os.umask(0o077)
        atomic_write(tmp_path / "private.json", b"{}")
        atomic_write(tmp_path / "key", b"k", mode=0o600)
    finally:
        os.umask(previous)
    assert (tmp_path / "shared.wav").stat().st_mode & 0o777 == 0o664
    assert (tmp_path / "private.json").stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "key").stat().st_mode & 0o777 == 0o600
