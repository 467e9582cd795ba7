"""Voice activity per channel: Silero VAD, run offline from the model file its wheel carries.

Silero VAD (``silero-vad`` on PyPI, MIT) scores 32 ms windows (512 samples at 16 kHz) with a small
recurrent network. Its TorchScript model ships inside the wheel (``silero_vad/data/silero_vad.jit``)
and is loaded from there with torch, which jmoshi already depends on: nothing is downloaded, and
neither torchaudio nor onnxruntime is needed. The package's own ``load_silero_vad`` is not used
because importing it sets torch to one thread for the whole process.

Throughput: the network is cheap but runs one window at a time, so one long channel is bound by
per-call overhead. Each channel is cut into segments of about 30 s that run side by side as one batch;
segments are cut at the quietest window within 3 s of each 30 s mark, and each is preceded by 2 s
of the audio before it (scores thrown away) so that the state has settled when its own windows start.
The network's state depends, faintly, on everything it heard before, so the scores differ from one
uninterrupted run only in windows near the threshold: 0.3 % of the windows change side on 190 s of
the shared dialogue (tests/test_analyze_audio.py), neither run being the truer one.
"""

from __future__ import annotations

import functools
import math

import numpy as np

VAD_RATE = 16000
WINDOW = 512  # samples at 16 kHz: the model's fixed input size
WINDOW_S = WINDOW / VAD_RATE  # 32 ms: the time resolution of everything computed from the scores
SEGMENT_WINDOWS = 938  # about 30 s per batch row
WARMUP_WINDOWS = 63  # about 2 s of context before each segment
CUT_SEARCH_WINDOWS = 94  # look this far (3 s) either side of each mark for the quietest window


@functools.lru_cache(maxsize=1)
def _model():
    from importlib import resources

    import torch

    with resources.as_file(resources.files("silero_vad.data") / "silero_vad.jit") as path:
        model = torch.jit.load(str(path), map_location="cpu")
    return model.eval()


def vad_version() -> str:
    from importlib.metadata import version

    return f"silero-vad {version('silero-vad')}"


def to_vad_rate(pcm: np.ndarray, sample_rate: int) -> np.ndarray:
    """(channels, samples) at any rate -> float32 (channels, samples) at 16 kHz."""
    from ..audio_io import resample

    return np.stack([resample(channel, sample_rate, VAD_RATE) for channel in pcm])


def windows_of(pcm16k: np.ndarray) -> np.ndarray:
    """(channels, samples) -> (channels, windows, 512), the last window padded with silence."""
    channels, samples = pcm16k.shape
    count = max(1, math.ceil(samples / WINDOW))
    padded = np.zeros((channels, count * WINDOW), dtype=np.float32)
    padded[:, :samples] = pcm16k
    return padded.reshape(channels, count, WINDOW)


def levels_db(windows: np.ndarray) -> np.ndarray:
    """RMS level of each window in dBFS, (channels, windows)."""
    power = np.einsum("cwk,cwk->cw", windows, windows, dtype=np.float64) / WINDOW
    return (10 * np.log10(power + 1e-10)).astype(np.float32)


def speech_probs(windows: np.ndarray, segment: int = SEGMENT_WINDOWS) -> np.ndarray:
    """Silero's speech probability for each window, (channels, windows), ``segment`` windows a batch row."""
    import torch

    channels, count, _ = windows.shape
    levels = levels_db(windows)
    rows = []
    for c in range(channels):
        cuts = [0, *_cuts(levels[c], segment), count]
        rows += [(c, max(0, start - WARMUP_WINDOWS), start, end)
                 for start, end in zip(cuts[:-1], cuts[1:], strict=True)]
    # One silent window after the end stands for every step a shorter row takes past its end.
    padded = np.concatenate([windows, np.zeros((channels, 1, WINDOW), dtype=np.float32)], axis=1)
    channel = np.array([r[0] for r in rows])
    first = np.array([r[1] for r in rows])
    last = np.array([r[3] for r in rows])
    steps = int((last - first).max())
    scores = np.zeros((len(rows), steps), dtype=np.float32)
    model = _model()
    model.reset_states()
    with torch.inference_mode():
        for step in range(steps):
            index = np.where(first + step < last, first + step, count)
            batch = torch.from_numpy(padded[channel, index])
            scores[:, step] = model(batch, VAD_RATE).numpy()[:, 0]
    probs = np.zeros((channels, count), dtype=np.float32)
    for row, (c, lo, start, end) in enumerate(rows):
        probs[c, start:end] = scores[row, start - lo:end - lo]
    return probs


def _cuts(levels: np.ndarray, segment: int) -> list[int]:
    """Where to split one channel: the quietest window near each segment mark."""
    reach = min(CUT_SEARCH_WINDOWS, segment // 3)
    cuts = []
    for mark in range(segment, len(levels) - reach, segment):
        cuts.append(mark - reach + int(np.argmin(levels[mark - reach:mark + reach + 1])))
    return cuts
