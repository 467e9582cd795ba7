"""Children that die with jmoshi, even when jmoshi is killed with SIGKILL.

Linux's PR_SET_PDEATHSIG asks the kernel to signal a process when its parent dies, and it survives
exec for ordinary binaries. It is set in the child itself, and the child then checks that its
parent is still the process that started it: if jmoshi died between the fork and the prctl call,
the signal would never come, and the child would have been re-parented already.

Run any program tied to jmoshi with `python -m jmoshi_cli.serving.lifetime [--supervise] PARENT_PID
PROGRAM ARGS...`. On Linux that sets the signal and becomes the program (exec).

macOS has no PR_SET_PDEATHSIG. There a Python child (a server's bootstrap) watches its parent from a
thread instead, and notices within a quarter of a second. A thread does not survive exec, so another
program (HAProxy) runs under a small supervisor (--supervise, the default off Linux): it starts the
program as its child, passes on the signals it is sent, exits as the program did, and kills the
program once its own parent has gone. The two stay in one process group, so that stopping the group
stops both.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import threading
import time
from typing import NoReturn

PR_SET_PDEATHSIG = 1
WATCH_S = 0.25  # where the kernel cannot signal: how often the watching thread looks at the parent
SUPERVISE = "--supervise"
# What a supervisor passes on to its program: the signals that ask a program to stop. One sent to the whole
# group reaches the program twice, which asks nothing more of it than once.
FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT)


def die_with_parent(parent_pid: int, sig: int = signal.SIGKILL) -> None:
    """Make the kernel send `sig` to this process when its parent dies; exit now if it already has. From now
    on a write to this process's console that finds it broken takes `sig` at once as well (_TiedConsole)."""
    _tie_console(sig)
    if not has_pdeathsig():
        _watch_parent(parent_pid, sig)
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if os.getppid() != parent_pid:
        os._exit(1)


class _TiedConsole:
    """sys.stdout or sys.stderr of a child whose console is the pipe its parent reads for as long as it lives.

    A write that finds that pipe broken means the parent has died. A dying process's files are closed before
    the kernel signals its children, so the child runs on for a moment (longer on a busy machine), and the
    code that wrote (a conversation's handler, logging a line) would get BrokenPipeError: caught as any error,
    a recording of the conversation would end as "error" instead of being left as it was cut. The process
    takes the signal the kernel is about to send instead, at once."""

    def __init__(self, stream, sig: int):
        self._stream = stream
        self._sig = sig

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except BrokenPipeError:
            _take(self._sig)

    def flush(self) -> None:
        try:
            self._stream.flush()
        except BrokenPipeError:
            _take(self._sig)

    def __getattr__(self, name: str):
        return getattr(self._stream, name)


def _tie_console(sig: int) -> None:
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        if stream is not None and not isinstance(stream, _TiedConsole):
            setattr(sys, name, _TiedConsole(stream, sig))


def _take(sig: int) -> NoReturn:
    os.kill(os.getpid(), sig)
    os._exit(128 + sig)  # still here: the signal is caught or blocked; exit as the shell would report it


def _watch_parent(parent_pid: int, sig: int) -> None:
    """A daemon thread that sends `sig` to this process once it has another parent (re-parented: dead)."""
    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(WATCH_S)
        os.kill(os.getpid(), sig)

    if os.getppid() != parent_pid:
        os._exit(1)
    threading.Thread(target=watch, name="parent watch", daemon=True).start()


def tied_argv(argv: list[str], parent_pid: int | None = None, supervise: bool | None = None) -> list[str]:
    """The command line that runs `argv` tied to this process (or to `parent_pid`).

    supervise: run it under a supervisor rather than exec it (default: where PR_SET_PDEATHSIG is missing)."""
    flag = [SUPERVISE] if (not has_pdeathsig() if supervise is None else supervise) else []
    return [sys.executable, "-m", "jmoshi_cli.serving.lifetime", *flag, str(parent_pid or os.getpid()), *argv]


def has_pdeathsig() -> bool:
    return sys.platform.startswith("linux")


class _Forwarder:
    """Signal handlers that pass each signal on to the program, or hold it until the program exists."""

    def __init__(self) -> None:
        self.child: subprocess.Popen | None = None
        self.pending: list[int] = []
        for sig in FORWARDED:
            signal.signal(sig, self.handle)

    def handle(self, signum: int, _frame: object) -> None:
        if self.child is None:
            self.pending.append(signum)
        elif self.child.returncode is None:
            try:
                os.kill(self.child.pid, signum)
            except ProcessLookupError:
                pass  # it has just ended: the supervisor exits as it did

    def started(self, child: subprocess.Popen) -> None:
        self.child = child
        for signum in self.pending:
            self.handle(signum, None)


def supervise(parent_pid: int, program: list[str]) -> int:
    """Run `program` until it exits (its exit status) or `parent_pid` is no longer our parent (then kill it)."""
    forwarder = _Forwarder()  # before the program starts: a stop asked for meanwhile is passed on once it runs
    if os.getppid() != parent_pid:
        return 1
    child = subprocess.Popen(program)
    forwarder.started(child)
    while True:
        try:
            return child.wait(timeout=WATCH_S)
        except subprocess.TimeoutExpired:
            if os.getppid() != parent_pid:
                child.kill()
                return child.wait()


def exit_as(status: int) -> NoReturn:
    """Exit as a program with this Popen status did: by the same signal when it was killed by one."""
    if status < 0:
        signal.signal(-status, signal.SIG_DFL)
        os.kill(os.getpid(), -status)
        status = 128 - status  # still here (the signal is blocked): the exit code a shell reports for it
    sys.exit(status)


def main() -> None:
    args = sys.argv[1:]
    if args[0] == SUPERVISE:
        exit_as(supervise(int(args[1]), args[2:]))
    parent, program = int(args[0]), args[1:]
    die_with_parent(parent)
    os.execvp(program[0], program)


if __name__ == "__main__":
    main()
