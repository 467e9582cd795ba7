"""The process supervisor: every child of jmoshi (a server of any backend, its replicas, HAProxy,
selftest's server) is started, relayed, watched and stopped here.

The child runs in its own session, so a terminal's Ctrl-C reaches jmoshi alone, which then stops the
child in order (SIGTERM, SIGKILL after a grace period). If jmoshi dies without that chance (kill -9,
the OOM killer), the kernel kills the child: a server child asks for that first thing in its
bootstrap, told by its contract (backends/contract.py) which process it must outlive no longer; any
other program is started through lifetime.tied_argv.
"""

from __future__ import annotations

import collections
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator

from ..addresses import url_host
from ..backends.contract import Launch
from ..errors import ServerError
from . import server_log

POLL_S = 0.1  # how often supervise looks at the stop signal, the child's exit and the port
READY_TIMEOUT_S = 1800.0  # a 7B load from a slow disk takes minutes; half an hour means it hangs


# --- why it stopped ---------------------------------------------------------------------------------

def _kernel_hint() -> str:
    """The way to a torch with kernels for this GPU, for the installed runtime (see runtime.py)."""
    from .. import runtime

    rt = runtime.detect()
    if rt.kind == runtime.UNTESTED:
        return "run `jmoshi doctor`: it names the torch this GPU needs"
    # The documented runtime's torch predates Blackwell; the current one's dropped Maxwell and Pascal.
    return f"run `jmoshi doctor`; the other runtime has kernels for it: {rt.other_install()}"


# moshi.server is another program: its output text is all there is to tell why it stopped.
# A hint is a string, or a function that gives it for the installed runtime.
REASONS: list[tuple[str, str, str | Callable[[], str]]] = [
    # moshi < 0.2.12 calls the sphn 0.1 API, gone in sphn 0.2; 0.2.12+ calls the 0.2 API (sphn 0.1 returns None).
    ("read_pcm", "sphn 0.2 is installed; this moshi needs the sphn 0.1 API", "pip install 'sphn>=0.1.4,<0.2'"),
    ("read_bytes", "sphn 0.2 is installed; this moshi needs the sphn 0.1 API", "pip install 'sphn>=0.1.4,<0.2'"),
    ("'nonetype' object has no attribute 'shape'", "sphn 0.1 is installed; moshi 0.2.12+ needs the sphn 0.2 API",
     "pip install 'sphn>=0.2,<0.3'"),
    ("out of memory", "the GPU ran out of memory", "stop other GPU processes, or use a GPU with more memory"),
    ("no kernel image is available", "the installed torch has no kernels for this GPU", _kernel_hint),
    ("no working c++ compiler", "torch.compile found no C++ compiler",
     "apt-get install g++, or set NO_TORCH_COMPILE=1 (moshi runs uncompiled)"),
    ("failed to find c compiler", "triton (torch.compile on the GPU) found no C compiler",
     "apt-get install gcc python3-dev, or set NO_TORCH_COMPILE=1 (moshi runs uncompiled)"),
    ("found no nvidia driver", "no NVIDIA driver", "use --device cpu for a (slow) test run"),
    ("address already in use", "the port was taken while the model loaded", "pass another --port"),
    ("size mismatch", "the checkpoint does not fit the model config", "check --moshi-weight and the variant"),
]
SEE_OUTPUT = "see moshi.server's output above; `jmoshi --verbose serve ...` shows every line it printed"


def explain_exit(code: int, tail: list[str], unknown_hint: str = SEE_OUTPUT,
                 name: str = "moshi.server") -> ServerError:
    """The child's exit as one line: a known cause from its last lines, else its last line."""
    text = "\n".join(tail).lower()
    known = next(((reason, hint) for needle, reason, hint in REASONS if needle in text), None)
    if known is not None:
        reason, hint = known
        hint = hint() if callable(hint) else hint
    else:
        last = next((server_log.plain(line).strip() for line in reversed(tail) if line.strip()), "no output")
        reason, hint = last[:200], unknown_hint
    shown = code if code >= 0 else 128 - code
    return ServerError(f"{name} exited with code {shown}: {reason}", hint, exit_code=shown or 1)


# --- running ----------------------------------------------------------------------------------------


def _to_stderr(line: str) -> None:
    sys.stderr.write(line)
    sys.stderr.flush()


class Server:
    """The child moshi.server: start it, relay its output, see when it listens, stop it cleanly.

    `relay` gets each line of the child's output with its newline, from the pump thread, then ""
    once when the output ends (readline's convention). `tail` keeps the last raw lines for
    explain_exit; `frame_ms` every per-frame handling time upstream logged.
    """

    def __init__(self, launch: Launch, relay: Callable[[str], None] | None = None):
        self.launch = launch
        self.relay = relay or _to_stderr
        self.tail: collections.deque[str] = collections.deque(maxlen=60)
        self.frame_ms: list[float] = []
        self.process: subprocess.Popen | None = None
        self._reader: threading.Thread | None = None

    def start(self) -> "Server":
        # PR_SET_PDEATHSIG fires when the *thread* that forked the child ends, not the process: from a
        # worker thread, the child would be killed when that thread finished. The main thread ends
        # only with jmoshi itself.
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError("Server.start must run on the main thread (the child dies with its forking thread)")
        env = dict(self.launch.env)
        if self.launch.contract is not None:
            env.update(self.launch.contract.with_parent(os.getpid()).to_env())
        # Own session: a terminal's Ctrl-C reaches jmoshi only, which stops the child in order.
        self.process = subprocess.Popen(self.launch.argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL, start_new_session=True)
        self._reader = threading.Thread(target=self._pump, name="moshi.server output", daemon=True)
        self._reader.start()
        return self

    def _pump(self) -> None:
        """Read every line the child writes (a full pipe would block it) and hand it on."""
        assert self.process and self.process.stdout
        relay = self.relay
        for raw in iter(self.process.stdout.readline, b""):
            line = raw.decode("utf-8", "replace")
            self.tail.append(line.rstrip("\n"))
            ms = server_log.frame_ms(line)
            if ms is not None:
                self.frame_ms.append(ms)
            relay = _relay_or_drop(relay, line)
        _relay_or_drop(relay, "")

    def listening(self) -> bool:
        """Whether the child's port accepts a connection now."""
        target = url_host(self.launch.host).strip("[]")
        try:
            with socket.create_connection((target, self.launch.port), timeout=0.5):
                return True
        except OSError:
            return False

    def wait_ready(self, timeout_s: float = READY_TIMEOUT_S, unknown_hint: str = SEE_OUTPUT) -> float:
        """Seconds until the port accepts connections; ServerError if the child dies first or never listens.

        unknown_hint: where to look when the cause is not a known one (the caller knows what was shown).
        """
        started = time.monotonic()
        try:
            while not self.check_ready(started, timeout_s, unknown_hint):
                time.sleep(POLL_S)
        except ServerError:
            self.stop()
            raise
        return time.monotonic() - started

    def check_ready(self, started: float, timeout_s: float = READY_TIMEOUT_S, unknown_hint: str = SEE_OUTPUT) -> bool:
        """One look: True once the port accepts; ServerError if the child died or the time is up."""
        assert self.process
        code = self.process.poll()
        if code is not None:
            self.drain()
            raise explain_exit(code, list(self.tail), unknown_hint, self.launch.name)
        if self.listening():
            return True
        if time.monotonic() - started > timeout_s:
            raise ServerError(f"the server did not listen within {timeout_s:.0f} s", unknown_hint)
        return False

    def drain(self) -> None:
        """Wait (briefly) for the pump to pass on the child's last lines."""
        if self._reader is not None:
            self._reader.join(timeout=5)

    def stop(self, grace_s: float = 10.0) -> int | None:
        """SIGTERM, then SIGKILL after grace_s: never leave a child holding GPU memory."""
        process = self.process
        if process is None or process.poll() is not None:
            self.drain()
            return process.returncode if process else None
        _kill_group(process.pid, signal.SIGTERM)
        try:
            process.wait(grace_s)
        except subprocess.TimeoutExpired:
            _kill_group(process.pid, signal.SIGKILL)
            process.wait()
        self.drain()
        return process.returncode

    def __enter__(self) -> "Server":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _relay_or_drop(relay: Callable[[str], None], line: str) -> Callable[[str], None]:
    """Hand on one line; if our stderr is gone, keep draining the child's output but show no more."""
    try:
        relay(line)
    except (OSError, ValueError):  # a closed or broken stderr
        return lambda line: None
    return relay


def _kill_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        pass


# --- supervising --------------------------------------------------------------------------------------


@dataclass
class StopSignals:
    """SIGINT/SIGTERM, latched by the handler and read by the main loop (nothing else runs in it)."""

    received: list[int] = field(default_factory=list)

    def handler(self, signum, _frame) -> None:
        self.received.append(signum)

    @contextmanager
    def installed(self) -> Iterator["StopSignals"]:
        previous = {sig: signal.signal(sig, self.handler) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield self
        finally:
            for sig, old in previous.items():
                signal.signal(sig, old)


def supervise(server: Server, on_ready: Callable[[float], None], ready_timeout_s: float = READY_TIMEOUT_S) -> int:
    """Run the child until it exits or SIGINT/SIGTERM arrives; return jmoshi's exit code.

    Runs on the main thread (signal handlers can only be set there, and Server.start needs it). One
    loop watches all three things that can happen: a stop signal, the child's exit, its port starting
    to accept. The only other thread is the output pump, which never stops the child; only this
    loop's `finally` does.
    """
    with StopSignals().installed() as signals:
        try:
            server.start()
            return _watch(server, on_ready, signals, ready_timeout_s)
        finally:
            server.stop()


def _watch(server: Server, on_ready: Callable[[float], None], signals: StopSignals, ready_timeout_s: float) -> int:
    process = server.process
    assert process is not None  # supervise started it
    started = time.monotonic()
    ready = False
    while not signals.received:
        if not ready and server.check_ready(started, ready_timeout_s):
            ready = True
            on_ready(time.monotonic() - started)
        elif ready and process.poll() is not None:
            server.drain()
            raise explain_exit(process.returncode, list(server.tail), name=server.launch.name)
        time.sleep(POLL_S)
    return 128 + signals.received[0]
