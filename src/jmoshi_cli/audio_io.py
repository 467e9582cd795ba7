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
- Limits: a file is refused, before it is decoded when its header tells enough, when its rate lies
  outside :data:`MIN_RATE` .. :data:`MAX_RATE` or it lasts more than :data:`MAX_SECONDS`; resampling
  refuses an output longer than :data:`MAX_SECONDS`. A damaged header otherwise turns a small file
  into billions of samples (800 KB claiming 1 Hz is 4.8 billion samples at 24 kHz).
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
_WAV_MAGIC = (b"RIFF", b"RIFX", b"RF64")

# Real recordings lie between telephone speech (8 kHz) and the highest rate audio interfaces record
# (384 kHz). A rate outside is a damaged header, and believing it is what costs memory: resampling
# multiplies the length by target rate / file rate.
MIN_RATE, MAX_RATE = 8000, 384000
# The longest audio read in one piece. Dialogues (J-Moshi's, and the corpora analysed beside them) last
# minutes, an hour at most; 4 hours leaves room for long sessions. At the limit a stereo 48 kHz input
# decodes to 5.5 GB of float32 and each channel resampled to 24 kHz is 1.4 GB more, about what a machine
# that runs J-Moshi can spare; past it a header lies, or the file is better split. Within the rates
# above resampling to 24 kHz at most triples a length, so this one bound on seconds bounds every array
# made from the file.
MAX_SECONDS = 4 * 3600
_SPLIT_HINT = "split it, e.g. ffmpeg -i IN -f segment -segment_time 3600 OUT%03d.wav"


class AudioReadError(JMoshiError):
    """The file could not be decoded, or holds no samples. The message is one line for people."""

    def one_line(self) -> str:
        """The message and its hint together, for reports that give each file one line."""
        return f"{self.message}; {self.hint}" if self.hint else self.message


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


def check_rate(sample_rate: int) -> None:
    """AudioReadError unless ``sample_rate`` is one a recording can have (:data:`MIN_RATE` .. :data:`MAX_RATE`)."""
    if not MIN_RATE <= sample_rate <= MAX_RATE:
        raise AudioReadError(f"implausible sample rate {sample_rate} Hz (jmoshi reads {MIN_RATE} to {MAX_RATE} Hz)",
                             hint="the header is probably damaged: if the samples are fine, rewrite it with the "
                             "rate they were recorded at")


def check_length(seconds: float) -> None:
    """AudioReadError when audio of ``seconds`` is longer than :data:`MAX_SECONDS`."""
    if seconds > MAX_SECONDS:
        raise AudioReadError(f"{seconds / 3600:.1f} hours long, more than the {MAX_SECONDS // 3600} hours jmoshi "
                             "reads in one piece", hint=_SPLIT_HINT)


def _check_header(path: Path) -> None:
    """Refuse an implausible rate or length as the header states them, before any sample is decoded.

    A file sphn cannot open this way is left to decoding, which says why (or reads it as Ogg Opus).
    """
    import sphn

    try:
        reader = sphn.FileReader(str(path))
        rate, channels, seconds = int(reader.sample_rate), int(reader.channels), float(reader.duration_sec)
    except BaseException as exc:  # sphn raises ValueError, and a panic in its Rust code a BaseException
        if isinstance(exc, (KeyboardInterrupt, SystemExit)):
            raise
        return
    check_rate(rate)
    check_length(min(seconds, _most_wav_seconds(path, rate, channels)))


def _most_wav_seconds(path: Path, rate: int, channels: int) -> float:
    """The most a WAV file's bytes can hold: two samples a byte (4-bit ADPCM, its densest coding).

    Writers that stream leave the data size at 4 GB in the header, and sphn's duration believes it; the
    file's real size tells how much can actually be decoded. Other formats' durations are not guesses.
    """
    try:
        with path.open("rb") as file:
            if file.read(4) not in _WAV_MAGIC:
                return math.inf
        return 2 * path.stat().st_size / (max(channels, 1) * rate)
    except OSError:
        return math.inf


def _decode(path: Path) -> tuple[np.ndarray, int]:
    """``sphn.read``, then ``sphn.read_opus`` for an Ogg file it rejects; AudioReadError with sphn's reason."""
    import sphn

    try:
        return sphn.read(str(path))
    except BaseException as first:  # sphn raises ValueError, and a panic in its Rust code a BaseException
        if isinstance(first, (KeyboardInterrupt, SystemExit, MemoryError)):
            raise
        if path.suffix.lower() in _OGG_SUFFIXES:
            with contextlib.suppress(ValueError, OSError):
                return sphn.read_opus(str(path))
        raise AudioReadError(_clean_sphn_message(first, path)) from first


def read_audio(path: Path) -> Audio:
    """Decode a whole file at its own sample rate. Raises AudioReadError: not audio, empty, an implausible
    rate or length (checked on the header before decoding, and again on what was decoded), no memory."""
    path = Path(path)
    _check_readable(path)
    _check_header(path)
    try:
        return _to_audio(*_decode(path))
    except MemoryError as exc:
        raise AudioReadError("not enough memory to decode it", hint=f"free memory, or {_SPLIT_HINT}") from exc


def _to_audio(pcm: np.ndarray, sample_rate: int) -> Audio:
    pcm = np.asarray(pcm, dtype=np.float32)
    if pcm.ndim == 1:
        pcm = pcm[None, :]
    if pcm.ndim != 2 or pcm.shape[0] == 0 or int(sample_rate) <= 0:
        raise AudioReadError(f"unexpected decoded shape {tuple(pcm.shape)}")
    if pcm.shape[1] == 0:
        raise AudioReadError("no audio samples")
    check_rate(int(sample_rate))
    check_length(pcm.shape[1] / int(sample_rate))
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
    high-quality filter). Past the end the signal is taken as silence. AudioReadError, before anything is
    allocated, when the output would last more than :data:`MAX_SECONDS`.
    """
    import soxr

    x = np.asarray(x, dtype=np.float32)
    if src_rate == dst_rate:
        return x.copy()
    out_len = resampled_length(x.shape[-1], src_rate, dst_rate)
    check_length(out_len / dst_rate)
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

