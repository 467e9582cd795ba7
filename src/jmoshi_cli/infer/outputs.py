"""Writing one input's results: J-Moshi's voice, the stereo dialogue and the transcript, all or none.

- ``<name>.jmoshi.wav``: J-Moshi's voice, 24 kHz, mono, 16-bit PCM;
- ``<name>.dialogue.wav``: 24 kHz stereo, the user (what the model heard) on the left and J-Moshi on
  the right, sample-aligned;
- ``<name>.transcript.json``: see :func:`jmoshi_cli.transcript.document`.

Each file is replaced in one step; when one cannot be written, those already written are removed.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

import numpy as np

from .. import audio_io
from ..audio_io import SAMPLE_RATE
from ..errors import JMoshiError
from ..fsutil import atomic_write_text


class OutputError(JMoshiError):
    """An input's results could not be written (the other inputs go on)."""


def write_outputs(paths: dict[str, Path], user: np.ndarray, jmoshi: np.ndarray, transcript: dict[str, Any]) -> None:
    """Write the three files named in ``paths`` (keys jmoshi, dialogue, transcript); OutputError if not."""
    try:
        audio_io.write_wav(paths["jmoshi"], jmoshi, SAMPLE_RATE)
        audio_io.write_wav(paths["dialogue"], np.stack([user, jmoshi]), SAMPLE_RATE)
        atomic_write_text(paths["transcript"], json.dumps(transcript, ensure_ascii=False, indent=2) + "\n")
    except OSError as exc:
        for path in paths.values():
            with contextlib.suppress(OSError):
                path.unlink()
        where = Path(paths["transcript"]).parent
        raise OutputError(f"cannot write the outputs to {where}: {exc.strerror or exc}") from exc
