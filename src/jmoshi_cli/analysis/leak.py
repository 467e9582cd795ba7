"""Leakage: one voice heard, quieter and often later, on the other's microphone, told apart on the audio.

Two headsets in one room pick up each other's voice 20 to 40 dB down; a participant without headphones
has J-Moshi's voice come back from the speakers, tens to hundreds of milliseconds late, with the room's
reverberation, as much as the browser's echo canceller leaves of it. Silero VAD hears speech in that
leak as readily as in a voice, and keeps hearing it for a moment after it stops, so the VAD decisions
alone cannot tell it apart. Here each channel's speech is checked against what the other channel's
audio explains.

1. The leak path, per direction and per file: from the windows where one channel speaks and the other
   is well below it (the stretches where one side speaks alone, as far as levels tell), the delay is
   the lag (0 to ``max_lag_s``, 8 ms steps) at which the loud channel's level envelope correlates best
   with the quiet one's, and the level is the median of the quiet channel's level minus the loud
   channel's that delay earlier. People overlap for far less than half of the time, so the median is
   the leak's. A leak that does not rise above the quiet channel's noise is "not
   heard": its level is then an upper bound and it has no delay.
2. The recent level of the loud channel, as heard in each window of the quiet one: its level that
   ``delay`` earlier, the louder of the windows either side (the delay is in 8 ms steps, the windows
   32 ms), and a reverberation tail: any earlier window's level less ``TAIL_DECAY_DB`` per window,
   over ``TAIL_WINDOWS`` (320 ms; a room with a reverberation time up to about 1 s). The same is done
   per frequency band (``BAND_EDGES_HZ``), with a leak level per band, since a loudspeaker and a room
   colour the voice they pass on.
3. A window of the quiet channel is explained by the leak when its level is at most ``margin``
   (``--leak-db``) above the leak predicted there, and never above the loud channel's recent level;
   and when, band by band, what it has above the band's predicted leak (or noise) plus ``margin``
   adds up to no more than ``BAND_EVIDENCE_DB``. A voice talking over the other's has its own
   spectrum, and stands out of the predicted leak in some bands even when it is no louder overall.
   The loud channel's level counts here only where it carries its own voice: not where it carries
   the quiet channel's voice leaking back, which would otherwise pass for the other voice and hide
   the quiet voice's soft endings (a first pass over both channels tells which is which).
4. A channel's own speech is its VAD speech that the leak does not explain and that is louder than
   the channel's noise (``WEAK_DB`` above its 5th percentile), lone windows aside (a window rising
   out of the leak on its own is the leak's variation more often than a voice; not so just after
   the voice's own speech), followed by ``HANGOVER`` windows (160 ms) while the VAD still holds: the time Silero's
   scores take to fall after a voice stops, whether silence or the other's leak follows. Past that,
   the VAD's hold over windows near the noise is the echo of what it heard last, the leak's as well
   as a voice's, and not speech.

What no level tells apart: a voice as quiet, in every band, as the other's leak at the same moment,
such as a soft ending under the other's loud start when the leak is strong (lost; a long enough stretch
of it splits an IPU).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from .vad import VAD_RATE, WINDOW, WINDOW_S

FRAME = 128  # samples: 8 ms, the step of the measured delay
FRAMES = WINDOW // FRAME
BAND_EDGES_HZ = (60, 300, 600, 1000, 1500, 2200, 3200, 4500, 8001)
TAIL_WINDOWS = 10  # 320 ms of reverberation tail
TAIL_DECAY_DB = 2.0  # per window: 60 dB in 0.96 s
DOMINANCE_DB = 6.0  # the quiet channel this far below the loud one's recent level: one side speaks alone
MIN_WINDOWS = 31  # a second of one side speaking alone, to measure a leak path from
LAG_SAMPLES = 20000  # frames (160 s of one-sided speech) to find the delay on
MIN_CORRELATION = 0.3  # a leak heard: its envelope follows the other channel's this closely
HEARD_DB = 3.0  # and it lifts the quiet channel this far above its noise
WEAK_DB = 8.0  # above the noise: a window with something to tell
MIN_OWN = 2  # windows rising out of the leak together, to be a voice on their own
BAND_EVIDENCE_DB = 6.0  # a voice's spectrum out of the leak's, summed over the bands
HANGOVER = 5  # windows (160 ms) the VAD holds on after a voice
NOISE_PERCENTILE = 5  # of a channel's levels: its noise, since nobody speaks all the time
FLOOR_DB = -100.0  # digital silence


@dataclass(frozen=True)
class Levels:
    """Levels in dB of both channels: per VAD window (2, windows), and where the audio was at hand, per
    8 ms frame (2, windows * 4) and per band and window (2, windows, bands)."""

    windows: np.ndarray
    frames: np.ndarray | None = None
    bands: np.ndarray | None = None

    @classmethod
    def of(cls, windows: np.ndarray) -> Levels:
        """From (2, windows, 512) samples at 16 kHz."""
        channels, count, _ = windows.shape
        framed = windows.reshape(channels, count * FRAMES, FRAME)
        power = np.einsum("cfk,cfk->cf", framed, framed).astype(np.float64) / FRAME
        per_window = power.reshape(channels, count, FRAMES).mean(axis=2)
        return cls(_db(per_window).astype(np.float32), _db(power).astype(np.float32), _band_levels(windows))

    @functools.cached_property
    def noise(self) -> np.ndarray:
        """Each channel's noise level (2,)."""
        return np.percentile(self.windows, NOISE_PERCENTILE, axis=1)

    @functools.cached_property
    def band_noise(self) -> np.ndarray | None:
        """Each channel's noise level per band (2, bands)."""
        return None if self.bands is None else np.percentile(self.bands, NOISE_PERCENTILE, axis=1)


def _db(power: np.ndarray) -> np.ndarray:
    return 10 * np.log10(power + 1e-10)


def _band_levels(windows: np.ndarray, chunk: int = 4096) -> np.ndarray:
    """Level per band of each window, (channels, windows, bands), from its spectrum (torch's FFT: twice as
    fast as numpy's here, and torch is loaded for the VAD anyway)."""
    import torch

    freqs = np.fft.rfftfreq(WINDOW, 1 / VAD_RATE)
    edges = zip(BAND_EDGES_HZ[:-1], BAND_EDGES_HZ[1:], strict=True)
    bands = torch.from_numpy(np.stack([(freqs >= lo) & (freqs < hi) for lo, hi in edges], axis=1).astype(np.float32))
    # Hann-weighted: a rectangular window's side lobes would spread a loud low band into the quiet high
    # ones by an amount that depends on where the window cuts the waveform, different for the voice and
    # for its leak a few milliseconds later.
    taper = torch.hann_window(WINDOW, periodic=True, dtype=torch.float32)
    scale = 2 / float(taper.square().sum()) / WINDOW
    out = np.empty((*windows.shape[:2], len(BAND_EDGES_HZ) - 1), dtype=np.float32)
    pairs = bands.repeat_interleave(2, dim=0) * scale  # the real and imaginary parts of each bin
    with torch.inference_mode():
        for start in range(0, windows.shape[1], chunk):
            spectrum = torch.fft.rfft(torch.from_numpy(windows[:, start:start + chunk]) * taper)
            power = torch.view_as_real(spectrum).square().flatten(-2) @ pairs
            out[:, start:start + chunk] = (10 * torch.log10(power + 1e-10)).numpy()
    return out


@dataclass(frozen=True)
class LeakPath:
    """How one channel's voice reaches the other channel: its level relative to the voice (dB), its delay,
    and how much one-sided speech that was measured on. Not heard: the level is an upper bound."""

    level_db: float
    delay_s: float | None
    heard: bool
    measured_s: float

    def as_json(self) -> dict:
        return {"heard": self.heard, "level_db": round(self.level_db, 1),
                "delay_ms": None if self.delay_s is None else round(self.delay_s * 1000),
                "measured_s": round(self.measured_s, 2)}


@dataclass(frozen=True)
class _Model:
    """One direction's leak as measured: the path, its delay in frames, and its level relative to the loud
    channel's recent level (see :func:`_heard`), broadband and per band."""

    path: LeakPath
    lag: int
    level_db: float
    band_levels_db: np.ndarray | None


def own_speech(active: np.ndarray, levels: Levels, margin_db: float, max_lag_s: float
               ) -> tuple[np.ndarray, list[LeakPath | None]]:
    """Both channels' speech with the other voice's leak taken out, and the leak path into each channel
    (None where there was too little one-sided speech to measure it; the channel is then left as it is)."""
    models = [_measure(levels, active, 1 - me, me, max_lag_s) for me in (0, 1)]
    out = active.copy()
    # First against all the other channel carries; then against the other voice alone, without this
    # voice's own leak coming back through it, which would pass for the other voice and hide this
    # voice's soft endings.
    for _ in range(2):
        source = out.copy()
        for me, model in enumerate(models):
            if model is not None:
                explained = _explained(levels, me, model, _heard(levels, 1 - me, model.lag, source[1 - me]),
                                       margin_db)
                out[me] = _attribute(active[me], explained, levels.windows[me] < levels.noise[me] + WEAK_DB)
    return out, [model.path if model else None for model in models]


def _measure(levels: Levels, active: np.ndarray, loud: int, quiet: int, max_lag_s: float) -> _Model | None:
    lag_windows = int(np.ceil(max_lag_s / WINDOW_S))
    # The loud channel speaking now or up to the longest delay ago, the quiet one well below it.
    alone = _recent_max(active[loud], lag_windows) & (
        levels.windows[quiet] < _recent_max(levels.windows[loud], lag_windows) - DOMINANCE_DB)
    if alone.sum() < MIN_WINDOWS:
        return None
    lag, correlation = _lag(levels, alone, loud, quiet, max_lag_s)
    delayed = _delayed(levels.windows[loud], None if levels.frames is None else levels.frames[loud], lag)
    recent, recent_bands = _heard(levels, loud, lag, np.ones_like(active[loud]))
    # The louder part of the loud voice: its leak well clear of the quiet channel's noise.
    strong = alone & (recent >= np.median(recent[active[loud]]) - 10)
    if strong.sum() < MIN_WINDOWS:
        strong = alone
    quiet_level = levels.windows[quiet][strong]
    heard = correlation >= MIN_CORRELATION and bool(np.median(quiet_level) > levels.noise[quiet] + HEARD_DB)
    # Reported against the voice's level at the delay; predicted against its recent level (louder, by
    # the neighbours and the tail it takes in), so each has its own median.
    path = LeakPath(float(np.median(quiet_level - delayed[strong])), lag * FRAME / VAD_RATE if heard else None,
                    heard, float(alone.sum() * WINDOW_S))
    level = float(np.median(quiet_level - recent[strong]))
    bands = None if recent_bands is None or levels.bands is None or levels.band_noise is None else _band_leak(
        levels.bands[quiet], levels.band_noise[quiet], recent_bands, strong, level)
    return _Model(path, lag, level, bands)


def _heard(levels: Levels, loud: int, lag: int, keep: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """The loud channel's recent level as heard in each window of the other, broadband and per band, from
    its windows in ``keep`` only."""
    windows = np.where(keep, levels.windows[loud], FLOOR_DB)
    frames = None if levels.frames is None else np.where(np.repeat(keep, FRAMES), levels.frames[loud], FLOOR_DB)
    recent = _recent(_delayed(windows, frames, lag))
    if levels.bands is None:
        return recent, None
    bands = np.where(keep[:, None], levels.bands[loud], FLOOR_DB)
    return recent, _recent(_shift(bands, round(lag / FRAMES)))  # the neighbours in _recent cover the rest


def _lag(levels: Levels, alone: np.ndarray, loud: int, quiet: int, max_lag_s: float) -> tuple[int, float]:
    """The delay (in frames, or in windows without frames) at which the loud channel's envelope best
    follows the quiet one's over the one-sided windows, and that correlation."""
    if levels.frames is None:
        envelope, step, picked = levels.windows, WINDOW, alone
    else:
        envelope, step, picked = levels.frames, FRAME, np.repeat(alone, FRAMES)
    most = int(max_lag_s * VAD_RATE / step)
    x = np.maximum(envelope[loud], levels.noise[loud]).astype(np.float64)
    y = np.maximum(envelope[quiet], levels.noise[quiet]).astype(np.float64)
    index = np.flatnonzero(picked[most:]) + most
    if len(index) == 0:
        return 0, 0.0
    if len(index) > LAG_SAMPLES:  # spread over the file: as sure a delay, in bounded time
        index = index[np.linspace(0, len(index) - 1, LAG_SAMPLES).astype(int)]
    yc = y[index] - y[index].mean()
    best, best_lag = -1.0, 0
    for lag in range(most + 1):
        xc = x[index - lag] - x[index - lag].mean()
        scale = float(np.sqrt(np.dot(xc, xc) * np.dot(yc, yc)))
        correlation = float(np.dot(xc, yc)) / scale if scale > 0 else 0.0
        if correlation > best:
            best, best_lag = correlation, lag
    if levels.frames is None:
        best_lag *= FRAMES
    return best_lag, best


def _delayed(windows: np.ndarray, frames: np.ndarray | None, lag: int) -> np.ndarray:
    """Window levels ``lag`` frames later, as they arrive in the other channel."""
    if frames is None or lag % FRAMES == 0:
        return _shift(windows, lag // FRAMES)
    power = 10 ** (_shift(frames, lag) / 10)
    return _db(power.reshape(-1, FRAMES).mean(axis=1)).astype(np.float32)


def _shift(x: np.ndarray, by: int) -> np.ndarray:
    if by <= 0:
        return x
    return np.concatenate([np.full((by, *x.shape[1:]), FLOOR_DB, dtype=x.dtype), x[:-by]])


def _recent(level: np.ndarray) -> np.ndarray:
    """The louder of each window and its neighbours, then a decaying hold over the tail (along axis 0)."""
    near = level.copy()
    near[1:] = np.maximum(near[1:], level[:-1])
    near[:-1] = np.maximum(near[:-1], level[1:])
    out = near.copy()
    for back in range(1, TAIL_WINDOWS + 1):
        out[back:] = np.maximum(out[back:], near[:-back] - TAIL_DECAY_DB * back)
    return out


def _recent_max(x: np.ndarray, windows: int) -> np.ndarray:
    out = x.copy()
    for back in range(1, windows + 1):
        out[back:] = np.maximum(out[back:], x[:-back])
    return out


def _band_leak(quiet: np.ndarray, noise: np.ndarray, recent: np.ndarray, strong: np.ndarray, level: float
               ) -> np.ndarray:
    """The leak's level per band, relative to the loud channel's recent level in that band: measured where
    the quiet channel rises out of its noise in that band, else the broadband level."""
    out = np.full(quiet.shape[1], level, dtype=np.float32)
    for band in range(quiet.shape[1]):
        heard = strong & (quiet[:, band] > noise[band] + 2 * HEARD_DB)
        if heard.sum() >= MIN_WINDOWS:
            out[band] = np.median(quiet[heard, band] - recent[heard, band])
    return out


def _explained(levels: Levels, me: int, model: _Model, heard: tuple[np.ndarray, np.ndarray | None],
               margin_db: float) -> np.ndarray:
    """Windows of channel ``me`` that the other channel's leak, as ``heard`` there, accounts for."""
    recent, recent_bands = heard
    explained = levels.windows[me] <= recent + min(model.level_db + margin_db, 0.0)
    if levels.bands is None or levels.band_noise is None or recent_bands is None or model.band_levels_db is None:
        return explained
    leak = recent_bands + np.minimum(model.band_levels_db + margin_db, 0.0).astype(np.float32)
    noise = (levels.band_noise[me] + margin_db).astype(np.float32)
    allowed = 10 * np.log10(10 ** (leak / 10) + 10 ** (noise / 10))
    return explained & (np.maximum(levels.bands[me] - allowed, 0).sum(axis=1) <= BAND_EVIDENCE_DB)


def _attribute(active: np.ndarray, explained: np.ndarray, weak: np.ndarray) -> np.ndarray:
    """A channel's own speech: its VAD speech that neither the leak explains nor lies near its noise, and
    up to HANGOVER windows after it while the VAD still holds."""
    own = _without_lone_windows(active & ~explained & ~weak)
    run_start = _last_index(active & ~np.concatenate([[False], active[:-1]]))
    last_own = _last_index(own)
    return active & (last_own >= 0) & (last_own >= run_start) & (np.arange(len(active)) - last_own <= HANGOVER)


def _last_index(mask: np.ndarray) -> np.ndarray:
    """For each position, the last position at or before it where ``mask`` holds (-1: none)."""
    return np.maximum.accumulate(np.where(mask, np.arange(len(mask)), -1))


def _without_lone_windows(own: np.ndarray) -> np.ndarray:
    """``own`` without its runs shorter than MIN_OWN windows, but for those that follow a kept run within
    HANGOVER windows: the same voice going on, now and then rising out of the leak."""
    edges = np.flatnonzero(np.diff(np.concatenate([[0], own.astype(np.int8), [0]]))).reshape(-1, 2)
    out = own.copy()
    kept_end = None
    for start, end in edges.tolist():
        if end - start >= MIN_OWN or (kept_end is not None and start - kept_end <= HANGOVER):
            kept_end = end
        else:
            out[start:end] = False
    return out
