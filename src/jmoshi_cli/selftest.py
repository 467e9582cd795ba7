"""`jmoshi selftest`: prove the installed stack (moshi, sphn, torch, aiohttp) end to end, on the CPU.

A tiny random model (same generator as the tests) is served by the real moshi.server through the
same launch code as `jmoshi serve`, and a client speaks the /api/chat protocol to it.
"""

from __future__ import annotations

import socket
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .artifacts import ModelFiles, unpack_bundle
from .child import Server, explain_exit
from .errors import JMoshiError
from .serve import ServeOptions, build_launch

SELFTEST_REPO = "jmoshi/selftest-tiny"


@dataclass
class SelftestResult:
    ready_s: float = 0.0
    handshake_s: float = 0.0
    audio_samples: int = 0
    text_pieces: list[str] = field(default_factory=list)
    frame_ms: list[float] = field(default_factory=list)
    sent_frames: int = 0

    @property
    def mean_frame_ms(self) -> float:
        return sum(self.frame_ms) / len(self.frame_ms) if self.frame_ms else 0.0


class SelftestError(JMoshiError):
    exit_code = 1


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def speech_like(seconds: float = 3.0, sample_rate: int = 24000):
    """A voiced, syllable-paced test signal (harmonics of a gliding pitch, 4 Hz envelope)."""
    import numpy as np

    t = np.arange(int(seconds * sample_rate)) / sample_rate
    pitch = 140 + 40 * np.sin(2 * np.pi * 0.5 * t)
    phase = 2 * np.pi * np.cumsum(pitch) / sample_rate
    voice = sum(np.sin(k * phase) / k for k in range(1, 8))
    envelope = 0.5 * (1 + np.sin(2 * np.pi * 4 * t)) ** 2 / 4
    return (0.3 * voice * envelope / np.max(np.abs(voice))).astype(np.float32)


def run(on_step: Callable[[str], None] = lambda step: None, seconds: float = 3.0) -> SelftestResult:
    from .chat import ChatError, chat_sync
    from .tiny_model import build_web_ui_bundle, cached_tiny_repo

    result = SelftestResult()
    on_step("building the tiny model (cached after the first run)")
    repo = cached_tiny_repo()
    with tempfile.TemporaryDirectory(prefix="jmoshi-selftest-") as tmp:
        static = unpack_bundle(build_web_ui_bundle(Path(tmp) / "dist.tgz"), Path(tmp) / "dist")
        files = ModelFiles(repo / "model.safetensors", repo / "tokenizer-e351c8d8-checkpoint125.safetensors",
                           repo / "tokenizer_spm_32k_3.model", repo / "config.json", static)
        options = ServeOptions(host="127.0.0.1", port=free_port(), device="cpu")
        launch = build_launch(files, SELFTEST_REPO, options, None, half=False)
        server = Server(launch, relay=lambda line: None)
        on_step("starting moshi.server on the CPU")
        with server:
            result.ready_s = server.wait_ready(timeout_s=180)
            on_step("talking to /api/chat")
            try:
                chat = chat_sync(f"ws://127.0.0.1:{options.port}/api/chat", speech_like(seconds), tail_s=3.0,
                                 timeout_s=30)
            except ChatError as exc:
                code = server.process.poll()
                if code is not None:
                    server.drain()
                    raise SelftestError(*_broken("moshi.server", explain_exit(code, list(server.tail)))) from None
                raise SelftestError(f"the /api/chat conversation failed: {exc}",
                                    "run `jmoshi doctor`; JMOSHI_DEBUG=1 shows the server log") from None
            result.handshake_s = chat.handshake_s
            result.audio_samples = chat.audio_samples
            result.text_pieces = chat.text_pieces
            result.sent_frames = chat.sent_frames
            result.frame_ms = list(server.frame_ms)
    if result.audio_samples == 0:
        raise SelftestError("moshi.server answered the handshake but sent no audio",
                            "run `jmoshi doctor` (a sphn 0.2 install breaks audio at the first frame)")
    if not result.text_pieces:
        raise SelftestError("moshi.server sent audio but no text pieces", "run `jmoshi doctor`")
    return result


def _broken(piece: str, error: JMoshiError) -> tuple[str, str]:
    return f"{piece} failed: {error.message}", error.hint
