"""Reading, resampling, channel picking and writing audio for `jmoshi infer`.

- Decoding uses sphn 0.1 (symphonia): WAV (8/16/24-bit PCM, float), FLAC, MP3 and Ogg Vorbis
  through ``sphn.read``. ``sphn.read`` cannot decode Ogg *Opus*, so for ``.ogg``/``.opus`` files it
  rejects, ``sphn.read_opus`` is tried (it always returns 48 kHz).
- Resampling is done here and not with ``sphn.read(..., sample_rate=)`` / ``sphn.resample``: those
  shift the signal late by a rate-dependent delay (16 ms at 32 -> 24 kHz) and, for some rates, drop
  the end of the file (8 ms at 48 -> 24 kHz). :func:`resample` is a zero-delay windowed-sinc
  resampler whose output length is exactly ``ceil(n * dst / src)``.
- Writing uses the standard library's ``wave``: 16-bit PCM, mono or stereo (``sphn.write_wav`` is
  documented as mono only). Same samples in, same bytes out.
"""

from __future__ import annotations

import math
import os
import uuid
import wave
from dataclasses import dataclass
from pathlib import Path

import numpy as np

AUDIO_EXTENSIONS = (".wav", ".flac", ".mp3", ".ogg", ".oga", ".opus")
CHANNELS = ("left", "right", "mix")


class AudioReadError(Exception):
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


def read_audio(path: Path) -> Audio:
    """Decode a whole file at its own sample rate. Raises AudioReadError (empty files included)."""
    import sphn

    path = Path(path)
    if not path.is_file():
        raise AudioReadError("no such file" if not path.exists() else "not a regular file")
    try:
        if path.stat().st_size == 0:
            raise AudioReadError("empty file (0 bytes)")
    except OSError as exc:
        raise AudioReadError(f"cannot read: {exc.strerror or exc}") from exc
    if not os.access(path, os.R_OK):
        raise AudioReadError("cannot read: permission denied")
    try:
        pcm, sample_rate = sphn.read(str(path))
    except BaseException as first:  # sphn raises ValueError; keep KeyboardInterrupt alive
        if isinstance(first, (KeyboardInterrupt, SystemExit)):
            raise
        pcm = None
        if path.suffix.lower() in (".ogg", ".oga", ".opus"):
            try:
                pcm, sample_rate = sphn.read_opus(str(path))
            except Exception:
                pcm = None
        if pcm is None:
            raise AudioReadError(_clean_sphn_message(first, path)) from first
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


def _sinc_kernel(src: int, dst: int, width_zeros: int, rolloff: float):
    """Polyphase windowed-sinc kernels (one per output phase), Hann window, as float64 numpy."""
    base = min(src, dst) * rolloff
    width = math.ceil(width_zeros * src / base)
    idx = np.arange(-width, width + src, dtype=np.float64)[None, :] / src
    t = (-np.arange(dst, dtype=np.float64)[:, None] / dst + idx) * base
    t = np.clip(t, -width_zeros, width_zeros)
    window = np.cos(t * math.pi / width_zeros / 2) ** 2
    kernel = np.sinc(t) * window * (base / src)
    return kernel, width


def resample(x: np.ndarray, src_rate: int, dst_rate: int, width_zeros: int = 16,
             rolloff: float = 0.95) -> np.ndarray:
    """Resample a 1-D float32 signal with no delay; output length is ``resampled_length``.

    Band-limited interpolation with a Hann-windowed sinc (``width_zeros`` zero crossings each side,
    cutoff at ``rolloff`` x the lower Nyquist frequency), evaluated as a strided convolution. Sample
    ``k`` of the output is the input's value at time ``k / dst_rate``.
    """
    import torch

    x = np.asarray(x, dtype=np.float32)
    if src_rate == dst_rate:
        return x.copy()
    g = math.gcd(int(src_rate), int(dst_rate))
    src, dst = int(src_rate) // g, int(dst_rate) // g
    n = x.shape[-1]
    out_len = resampled_length(n, src_rate, dst_rate)
    kernel, width = _sinc_kernel(src, dst, width_zeros, rolloff)
    w = torch.from_numpy(kernel.astype(np.float32))[:, None, :]
    with torch.no_grad():
        wav = torch.from_numpy(x)[None, None, :]
        wav = torch.nn.functional.pad(wav, (width, width + src))
        out = torch.nn.functional.conv1d(wav, w, stride=src)  # (1, dst, frames)
        out = out.transpose(1, 2).reshape(-1)[:out_len]
    return out.numpy().astype(np.float32, copy=True)


def to_pcm16(x: np.ndarray) -> np.ndarray:
    """float [-1, 1] -> little-endian int16 (clipped, rounded)."""
    y = np.clip(np.asarray(x, dtype=np.float32), -1.0, 1.0) * 32767.0
    return np.round(y).astype("<i2")


def write_wav(path: Path, pcm: np.ndarray, sample_rate: int) -> None:
    """Write 16-bit PCM WAV atomically (temp file + rename). ``pcm``: (samples,) or (channels, samples)."""
    path = Path(path)
    pcm = np.asarray(pcm, dtype=np.float32)
    if pcm.ndim == 1:
        pcm = pcm[None, :]
    data = to_pcm16(pcm).T.copy()  # interleave: (samples, channels)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with wave.open(str(tmp), "wb") as w:
            w.setnchannels(int(pcm.shape[0]))
            w.setsampwidth(2)
            w.setframerate(int(sample_rate))
            w.writeframes(data.tobytes())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def read_wav_pcm16(path: Path) -> tuple[np.ndarray, int]:
    """Read a 16-bit PCM WAV written by :func:`write_wav`: ((channels, samples) float32, rate)."""
    with wave.open(str(path), "rb") as w:
        ch, width, rate, frames = w.getnchannels(), w.getsampwidth(), w.getframerate(), w.getnframes()
        if width != 2:
            raise ValueError(f"{path}: {8 * width}-bit WAV, expected 16-bit")
        raw = np.frombuffer(w.readframes(frames), dtype="<i2")
    return (raw.reshape(-1, ch).T.astype(np.float32) / 32767.0), rate
