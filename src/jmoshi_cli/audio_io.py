"""Audio for J-Moshi: its rate and frame, reading, channel picking, resampling and writing.

- J-Moshi hears and speaks 24 kHz mono in 80 ms frames (Mimi's rate and frame): :data:`SAMPLE_RATE`,
  :data:`FRAME_SIZE` and :data:`FRAME_S` are the one definition the package uses.
- Decoding uses sphn 0.1 (symphonia): WAV (8/16/24-bit PCM, float), FLAC, MP3 and Ogg Vorbis
  through ``sphn.read``. ``sphn.read`` cannot decode Ogg *Opus*, so for ``.ogg``/``.opus`` files it
  rejects, ``sphn.read_opus`` is tried (it always returns 48 kHz).
- Resampling is done here and not with ``sphn.read(..., sample_rate=)`` / ``sphn.resample``: those
  shift the signal late by a rate-dependent delay (16 ms at 32 -> 24 kHz) and, for some rates, drop
  the end of the file (8 ms at 48 -> 24 kHz). :func:`resample` uses libsoxr (``soxr``), which has no
  delay, and returns exactly ``ceil(n * dst / src)`` samples.
- Writing uses the standard library's ``wave``: 16-bit PCM, mono or stereo (``sphn.write_wav`` is
  documented as mono only), replaced in one step (:func:`jmoshi_cli.fsutil.atomic_write`). Same
  samples in, same bytes out.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import wave
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import JMoshiError
from .fsutil import atomic_write

SAMPLE_RATE = 24000  # Mimi's rate: what J-Moshi hears and speaks
FRAME_SIZE = 1920  # samples per 80 ms frame at 24 kHz, Mimi's frame
FRAME_S = FRAME_SIZE / SAMPLE_RATE

AUDIO_EXTENSIONS = (".wav", ".flac", ".mp3", ".ogg", ".oga", ".opus")
CHANNELS = ("left", "right", "mix")
_OGG_SUFFIXES = (".ogg", ".oga", ".opus")  # sphn.read rejects Ogg Opus: sphn.read_opus is tried


class AudioReadError(JMoshiError):
    """The file could not be decoded, or holds no samples. The message is one line for people."""


@dataclass(frozen=True)
class Audio:
    """Decoded audio: ``pcm`` is float32 with shape (channels, samples)."""

    pcm: np.ndarray
    sample_rate: int

    @property
    def channels(self) -> int:
        return int(self.pcm.shape[0])

    @property
    def samples(self) -> int:
        return int(self.pcm.shape[1])

    @property
    def duration_s(self) -> float:
        return self.samples / self.sample_rate


def _clean_sphn_message(exc: BaseException, path: Path) -> str:
    msg = str(exc).strip()
    quoted = f'"{path}":'
    if msg.startswith(quoted):
        msg = msg[len(quoted):].strip()
    if "no suitable format reader" in msg:
        return "not a supported audio file (wav, flac, mp3, ogg)"
    if "No such file" in msg:
        return "no such file"
    return f"not a readable audio file ({msg or type(exc).__name__})"


def _check_readable(path: Path) -> None:
    if not path.is_file():
        raise AudioReadError("no such file" if not path.exists() else "not a regular file")
    try:
        if path.stat().st_size == 0:
            raise AudioReadError("empty file (0 bytes)")
    except OSError as exc:
        raise AudioReadError(f"cannot read: {exc.strerror or exc}") from exc
    if not os.access(path, os.R_OK):
        raise AudioReadError("cannot read: permission denied")


def _decode(path: Path) -> tuple[np.ndarray, int]:
    """``sphn.read``, then ``sphn.read_opus`` for an Ogg file it rejects; AudioReadError with sphn's reason."""
    import sphn

    try:
        return sphn.read(str(path))
    except BaseException as first:  # sphn raises ValueError, and a panic in its Rust code a BaseException
        if isinstance(first, (KeyboardInterrupt, SystemExit)):
            raise
        if path.suffix.lower() in _OGG_SUFFIXES:
            with contextlib.suppress(ValueError, OSError):
                return sphn.read_opus(str(path))
        raise AudioReadError(_clean_sphn_message(first, path)) from first


def read_audio(path: Path) -> Audio:
    """Decode a whole file at its own sample rate. Raises AudioReadError (empty files included)."""
    path = Path(path)
    _check_readable(path)
    pcm, sample_rate = _decode(path)
    pcm = np.asarray(pcm, dtype=np.float32)
    if pcm.ndim == 1:
        pcm = pcm[None, :]
    if pcm.ndim != 2 or pcm.shape[0] == 0 or int(sample_rate) <= 0:
        raise AudioReadError(f"unexpected decoded shape {tuple(pcm.shape)}")
    if pcm.shape[1] == 0:
        raise AudioReadError("no audio samples")
    if not np.isfinite(pcm).all():
        pcm = np.nan_to_num(pcm, nan=0.0, posinf=1.0, neginf=-1.0)
    return Audio(np.ascontiguousarray(pcm), int(sample_rate))


def pick_channel(pcm: np.ndarray, channel: str) -> tuple[np.ndarray, str]:
    """One channel out of (channels, samples) float32: returns (mono 1-D array, what was used).

    ``left`` is channel 0, ``right`` channel 1, ``mix`` the mean of all channels. A mono file is
    used as is whatever ``channel`` says (the second value then reads ``mono``).
    """
    if channel not in CHANNELS:
        raise ValueError(f"channel must be one of {', '.join(CHANNELS)}, not {channel!r}")
    if pcm.ndim == 1:
        pcm = pcm[None, :]
    if pcm.shape[0] == 1:
        return np.ascontiguousarray(pcm[0], dtype=np.float32), "mono"
    if channel == "left":
        return np.ascontiguousarray(pcm[0], dtype=np.float32), "left"
    if channel == "right":
        return np.ascontiguousarray(pcm[1], dtype=np.float32), "right"
    return pcm.astype(np.float64).mean(axis=0).astype(np.float32), "mix"


def resampled_length(samples: int, src_rate: int, dst_rate: int) -> int:
    """Number of samples :func:`resample` returns: ``ceil(samples * dst_rate / src_rate)``."""
    g = math.gcd(int(src_rate), int(dst_rate))
    src, dst = src_rate // g, dst_rate // g
    return -(-samples * dst // src)


def resample(x: np.ndarray, src_rate: int, dst_rate: int) -> np.ndarray:
    """Resample a 1-D float32 signal with no delay; output length is ``resampled_length``.

    Sample ``k`` of the output is the input's value at time ``k / dst_rate`` (band-limited, libsoxr's
    high-quality filter). Past the end the signal is taken as silence.
    """
    import soxr

    x = np.asarray(x, dtype=np.float32)
    if src_rate == dst_rate:
        return x.copy()
    out_len = resampled_length(x.shape[-1], src_rate, dst_rate)
    if out_len == 0:
        return np.zeros(0, dtype=np.float32)
    # soxr returns round(n * dst / src) samples, one short of the ceiling for some lengths. The filter
    # already treats what follows the end as silence, so a little explicit silence leaves the samples
    # unchanged and lets the last one be computed.
    tail = np.zeros(-(-2 * int(src_rate) // int(dst_rate)), dtype=np.float32)
    y = soxr.resample(np.concatenate([x, tail]), int(src_rate), int(dst_rate), quality="HQ")
    return np.ascontiguousarray(y[:out_len], dtype=np.float32)


def to_pcm16(x: np.ndarray) -> np.ndarray:
    """float [-1, 1] -> little-endian int16 (clipped, rounded)."""
    y = np.clip(np.asarray(x, dtype=np.float32), -1.0, 1.0) * 32767.0
    return np.round(y).astype("<i2")


def write_wav(path: Path, pcm: np.ndarray, sample_rate: int) -> None:
    """Write 16-bit PCM WAV atomically. ``pcm``: (samples,) or (channels, samples), float in [-1, 1]."""
    pcm = np.asarray(pcm, dtype=np.float32)
    if pcm.ndim == 1:
        pcm = pcm[None, :]
    data = to_pcm16(pcm).T.copy()  # interleave: (samples, channels)
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as w:
        w.setnchannels(int(pcm.shape[0]))
        w.setsampwidth(2)
        w.setframerate(int(sample_rate))
        w.writeframes(data.tobytes())
    atomic_write(Path(path), buffer.getvalue())

