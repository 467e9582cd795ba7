"""The moshi.server child: start it, relay its output, see when it listens, stop it, explain its exit.

The child runs in its own process group so a terminal's Ctrl-C reaches jmoshi first, which then
stops the child in order (SIGTERM, SIGKILL after a grace period).
"""

from __future__ import annotations

import collections
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

from .errors import ServerError

FRAME_LINE = re.compile(r"frame handled in ([0-9.]+)ms")

@dataclass(frozen=True)
class Launch:
    argv: list[str]
    env: dict[str, str]
    host: str
    port: int
    scheme: str

    @property
    def url(self) -> str:
        return f"{self.scheme}://{url_host(self.host)}:{self.port}/"

def url_host(host: str) -> str:
    if host in ("0.0.0.0", ""):
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    return f"[{host}]" if ":" in host else host

# --- running ----------------------------------------------------------------------------------------

REASONS = [
    ("read_pcm", "sphn 0.2 is installed; moshi 0.2.2 needs the sphn 0.1 API", "pip install 'sphn>=0.1.4,<0.2'"),
    ("read_bytes", "sphn 0.2 is installed; moshi 0.2.2 needs the sphn 0.1 API", "pip install 'sphn>=0.1.4,<0.2'"),
    ("out of memory", "the GPU ran out of memory", "stop other GPU processes, or use a GPU with more memory"),
    ("no kernel image is available", "the installed torch has no kernels for this GPU", "run `jmoshi doctor`"),
    ("Found no NVIDIA driver", "no NVIDIA driver", "use --device cpu for a (slow) test run"),
    ("Address already in use", "the port was taken while the model loaded", "pass another --port"),
    ("size mismatch", "the checkpoint does not fit the model config", "check --moshi-weight and the variant"),
]

def explain_exit(code: int, tail: list[str]) -> ServerError:
    text = "\n".join(tail)
    for needle, reason, hint in REASONS:
        if needle in text:
            break
    else:
        last = next((line.strip() for line in reversed(tail) if line.strip()), "no output")
        reason, hint = last[:200], "see moshi.server's output above; JMOSHI_DEBUG=1 shows more"
    shown = code if code >= 0 else 128 - code
    return ServerError(f"moshi.server exited with code {shown}: {reason}", hint, exit_code=shown or 1)

class Server:
    """The child moshi.server: start it, relay its output, see when it listens, stop it cleanly."""

    def __init__(self, launch: Launch, relay: Callable[[str], None] | None = None):
        self.launch = launch
        self.relay = relay or (lambda line: (sys.stderr.write(line), sys.stderr.flush()))
        self.tail: collections.deque[str] = collections.deque(maxlen=60)
        self.frame_ms: list[float] = []
        self.process: subprocess.Popen | None = None
        self._reader: threading.Thread | None = None

    def start(self) -> "Server":
        # Own process group: a terminal's Ctrl-C reaches jmoshi, which stops the child in order.
        self.process = subprocess.Popen(self.launch.argv, env=self.launch.env, stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        self._reader = threading.Thread(target=self._pump, daemon=True)
        self._reader.start()
        return self

    def _pump(self) -> None:
        assert self.process and self.process.stdout
        for raw in iter(self.process.stdout.readline, b""):
            line = raw.decode("utf-8", "replace")
            self.tail.append(line.rstrip("\n"))
            match = FRAME_LINE.search(line)
            if match:
                self.frame_ms.append(float(match.group(1)))
            self.relay(line)

    def wait_ready(self, timeout_s: float = 1800.0) -> float:
        """Seconds until the port accepts connections; ServerError if the child dies first."""
        assert self.process
        started = time.monotonic()
        target = url_host(self.launch.host).strip("[]")
        while time.monotonic() - started < timeout_s:
            code = self.process.poll()
            if code is not None:
                self.drain()
                raise explain_exit(code, list(self.tail))
            try:
                with socket.create_connection((target, self.launch.port), timeout=0.5):
                    return time.monotonic() - started
            except OSError:
                time.sleep(0.1)
        self.stop()
        raise ServerError(f"moshi.server did not listen within {timeout_s:.0f} s", "see its output above")

    def drain(self) -> None:
        if self._reader is not None:
            self._reader.join(timeout=5)

    def stop(self, grace_s: float = 10.0) -> int | None:
        """SIGTERM, then SIGKILL after grace_s: never leave a child holding GPU memory."""
        process = self.process
        if process is None or process.poll() is not None:
            self.drain()
            return process.returncode if process else None
        try:
            os.killpg(process.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            process.wait(grace_s)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        self.drain()
        return process.returncode

    def __enter__(self) -> "Server":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

@dataclass
class Stop:
    """Which signal asked us to stop (SIGINT -> 130, SIGTERM -> 143), or why the child never got ready."""

    signum: int | None = None
    event: threading.Event = field(default_factory=threading.Event)
    error: ServerError | None = None

def supervise(server: Server, on_ready: Callable[[float], None]) -> int:
    """Run until the child exits or we get SIGINT/SIGTERM; return jmoshi's exit code."""
    stop = Stop()

    def handler(signum, _frame):
        stop.signum = signum
        stop.event.set()

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        server.start()
        ready = threading.Thread(target=_announce, args=(server, on_ready, stop), daemon=True)
        ready.start()
        while not stop.event.wait(0.2):
            if server.process.poll() is not None:
                break
        if stop.signum is not None:
            server.stop()
            return 128 + stop.signum
        ready.join(timeout=6)
        server.drain()
        if stop.error is not None:
            raise stop.error
        raise explain_exit(server.process.returncode, list(server.tail))
    finally:
        server.stop()
        for sig, old in previous.items():
            signal.signal(sig, old)

def _announce(server: Server, on_ready: Callable[[float], None], stop: Stop) -> None:
    try:
        seconds = server.wait_ready()
    except ServerError as exc:
        stop.error = exc
        return
    if not stop.event.is_set():
        on_ready(seconds)

