"""The /api/chat client without a server: what it sends, and how it fails."""

from __future__ import annotations

import socket

import numpy as np
import pytest

from jmoshi_cli import audio_io
from jmoshi_cli.audio_io import FRAME_SIZE
from jmoshi_cli.errors import JMoshiError
from jmoshi_cli.serving.chat import ChatError, chat_sync, prepare_pcm


def test_prepare_pcm_resamples_without_delay_and_pads_to_frames():
    t = np.arange(32000) / 32000
    tone = (0.5 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    sent = prepare_pcm(np.stack([tone, np.zeros_like(tone)]), 32000)  # first channel of (channels, samples)
    assert len(sent) == 13 * FRAME_SIZE  # 24000 samples, rounded up to whole frames
    np.testing.assert_array_equal(sent[:24000], audio_io.resample(tone, 32000, 24000))
    assert not sent[24000:].any()
    ints = (tone * 32767).astype(np.int16)
    assert np.abs(prepare_pcm(ints, 32000)[:24000] - sent[:24000]).max() < 1e-3


def test_chat_sync_forwards_its_arguments_and_fails_with_chat_error():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed again: nothing listens there
    with pytest.raises(ChatError, match="could not connect") as err:
        chat_sync(f"ws://127.0.0.1:{port}/api/chat", np.zeros(FRAME_SIZE, np.float32), timeout_s=5, realtime=False)
    assert isinstance(err.value, JMoshiError) and err.value.result is None
