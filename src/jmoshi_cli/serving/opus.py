"""Streaming Ogg/Opus through sphn, with either of its APIs (moshi's client side of /api/chat).

sphn 0.1 (the J-Moshi-documented runtime) buffers: ``OpusStreamWriter.append_pcm`` returns nothing
and ``read_bytes`` gives the pages so far; ``OpusStreamReader.append_bytes`` hands the bytes to a
decoding thread and ``read_pcm`` gives what it has decoded so far (so :meth:`OpusStream.drain` later
may give more).
sphn 0.2 (the current runtime) removed ``read_bytes`` / ``read_pcm``: ``append_pcm`` returns the
bytes and ``append_bytes`` the samples. Which one is installed is told by the writer's methods.
"""

from __future__ import annotations

import numpy as np


class OpusStream:
    """One encoder (what we send) and one decoder (what we receive) at a sample rate."""

    def __init__(self, sample_rate: int):
        import sphn

        self._writer = sphn.OpusStreamWriter(sample_rate)
        self._reader = sphn.OpusStreamReader(sample_rate)
        self.buffered_api = hasattr(self._writer, "read_bytes")  # sphn 0.1

    def encode(self, pcm: np.ndarray) -> bytes:
        """Ogg/Opus bytes ready to send after adding these samples (may be empty)."""
        out = self._writer.append_pcm(np.ascontiguousarray(pcm, dtype=np.float32))
        if self.buffered_api:
            out = self._writer.read_bytes()
        return bytes(out) if out is not None else b""

    def flush(self) -> bytes:
        """What the encoder still holds (sphn 0.2 hands everything out as it comes)."""
        return bytes(self._writer.read_bytes()) if self.buffered_api else b""

    def decode(self, data: bytes) -> np.ndarray:
        """The samples decoded so far with these Ogg/Opus bytes, as float32 mono (may be empty)."""
        out = self._reader.append_bytes(data)
        return self.drain() if self.buffered_api else _samples(out)

    def drain(self) -> np.ndarray:
        """Samples decoded since the last call (sphn 0.1 decodes in a thread; sphn 0.2 gives them at once)."""
        return _samples(self._reader.read_pcm()) if self.buffered_api else _samples(None)


def _samples(out) -> np.ndarray:
    if out is None:
        return np.zeros(0, dtype=np.float32)
    return np.asarray(out, dtype=np.float32).reshape(-1)
