"""`jmoshi selftest`: prove the installed stack (moshi, sphn, torch, aiohttp) end to end, on the CPU.

It runs on whichever runtime is installed (runtime.py), with torch.compile off as jmoshi runs the CPU.

A tiny random model (same generator as the tests) is served by the real moshi.server through the
same launch code as `jmoshi serve`, and a client speaks the /api/chat protocol to it. The server's
output is kept, not shown: a failure carries its last lines as the error's `detail`, which the CLI
prints with --verbose or JMOSHI_DEBUG=1.
"""

from __future__ import annotations

import secrets
import socket
from pathlib import Path
from typing import Callable

from . import scratch
from .audio_io import SAMPLE_RATE
from .backends import Backend, ServerSpec, cpu_threads, render
from .backends.contract import Access, ChildContract, Launch
from .cache.artifacts import ModelFiles, unpack_bundle
from .errors import JMoshiError, ServerError
from .model.precision import Precision
from .results import SelftestResult
from .serving import server_log
from .serving.child import Server, explain_exit

SELFTEST_REPO = "jmoshi/selftest-tiny"
SEE_LOG = "`jmoshi --verbose selftest` (or JMOSHI_DEBUG=1) shows the server's last lines"


class SelftestError(JMoshiError):
    """The stack failed the test; `detail` holds the server's last lines (empty when they say nothing)."""

    exit_code = 1

    def __init__(self, message: str, hint: str = "", detail: str = ""):
        super().__init__(message, hint, detail=detail)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def speech_like(seconds: float = 3.0, sample_rate: int = SAMPLE_RATE):
    """A voiced, syllable-paced test signal (harmonics of a gliding pitch, 4 Hz envelope)."""
    import numpy as np

    t = np.arange(int(seconds * sample_rate)) / sample_rate
    pitch = 140 + 40 * np.sin(2 * np.pi * 0.5 * t)
    phase = 2 * np.pi * np.cumsum(pitch) / sample_rate
    voice = sum(np.sin(k * phase) / k for k in range(1, 8))
    envelope = 0.5 * (1 + np.sin(2 * np.pi * 4 * t)) ** 2 / 4
    return (0.3 * voice * envelope / np.max(np.abs(voice))).astype(np.float32)


def run(on_step: Callable[[str], None] = lambda step: None, seconds: float = 3.0,
        backend: str | None = None) -> SelftestResult:
    """The tiny model through `backend` (--backend: auto, torch or mlx), the same launch as `serve`."""
    from . import backends
    from .tiny_model import cached_tiny_repo

    chosen = backends.choose(backend)
    chosen.refuse(backends.Features(device="cpu"))
    on_step("building the tiny model (cached after the first run)")
    repo = cached_tiny_repo()
    with scratch.held("selftest") as tmp:
        launch = _launch(chosen, repo, tmp, on_step)
        on_step(f"starting {chosen.server_name} on the CPU")
        # Started on the caller's (main) thread, as Server.start requires; the child dies with jmoshi.
        with Server(launch, relay=lambda line: None) as server:
            result = _converse(server, launch, on_step, seconds)
    result.server = chosen.server_name
    return result


def _launch(backend: Backend, repo: Path, tmp: Path, on_step: Callable[[str], None]) -> Launch:
    from .tiny_model import build_web_ui_bundle

    static = unpack_bundle(build_web_ui_bundle(tmp / "dist.tgz"), tmp / "dist")
    files = ModelFiles(repo / "model.safetensors", repo / "tokenizer-e351c8d8-checkpoint125.safetensors",
                       repo / "tokenizer_spm_32k_3.model", repo / "config.json", static)
    files = backend.from_local(files, tmp, on_step)
    # A token of its own, as on every server jmoshi starts: the selftest's client is the only one let in.
    contract = ChildContract(bind_host="127.0.0.1", config_path=str(files.config), threads=cpu_threads(),
                             access=Access(token=secrets.token_urlsafe(18)))
    return render(ServerSpec(backend.kind, files, SELFTEST_REPO, Precision.BF16, "127.0.0.1", free_port(), "cpu",
                             contract=contract))


def _converse(server: Server, launch: Launch, on_step: Callable[[str], None], seconds: float) -> SelftestResult:
    from .serving.chat import ChatError, chat_sync

    result = SelftestResult()
    try:
        result.ready_s = server.wait_ready(timeout_s=180, unknown_hint=SEE_LOG)
    except ServerError as exc:
        raise _failed(exc, server) from None
    on_step("talking to /api/chat")
    try:
        # Listen until audio and text came back (up to a minute: a busy CPU runs the tiny model slower than
        # real time), not for a fixed tail that a loaded machine would cut short.
        chat = chat_sync(f"ws://127.0.0.1:{launch.port}/api/chat", speech_like(seconds), tail_s=60, timeout_s=30,
                         until=lambda got: got.audio_samples > 0 and bool(got.text_pieces), token=launch.token)
    except ChatError as exc:
        assert server.process is not None  # started: wait_ready returned
        code = server.process.poll()
        if code is None:
            raise SelftestError(f"the /api/chat conversation failed: {exc}", f"run `jmoshi doctor`; {SEE_LOG}",
                                _server_lines(server)) from None
        server.drain()
        raise _failed(explain_exit(code, list(server.tail), SEE_LOG, server.launch.name), server) from None
    result.handshake_s = chat.handshake_s
    result.audio_samples = chat.audio_samples
    result.text_pieces = chat.text_pieces
    result.sent_frames = chat.sent_frames
    result.frame_ms = list(server.frame_ms)
    _check(result, server)
    return result


def _check(result: SelftestResult, server: Server) -> None:
    if result.audio_samples == 0:
        raise SelftestError("the server answered the handshake but sent no audio",
                            f"run `jmoshi doctor` (a sphn that does not fit moshi breaks audio); {SEE_LOG}",
                            _server_lines(server))
    if not result.text_pieces:
        raise SelftestError("the server sent audio but no text pieces", f"run `jmoshi doctor`; {SEE_LOG}",
                            _server_lines(server))


def _failed(error: ServerError, server: Server) -> SelftestError:
    """The server's failure as the selftest's, with the output that selftest never shows."""
    return SelftestError(f"{server.launch.name} failed: {error.message}", error.hint, _server_lines(server))


def _server_lines(server: Server) -> str:
    return "\n".join(server_log.plain(line) for line in server.tail)
