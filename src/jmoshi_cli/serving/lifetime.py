"""Children that die with jmoshi, even when jmoshi is killed with SIGKILL.

Linux's PR_SET_PDEATHSIG asks the kernel to signal a process when its parent dies, and it survives
exec for ordinary binaries. It is set in the child itself, and the child then checks that its
parent is still the process that started it: if jmoshi died between the fork and the prctl call,
the signal would never come, and the child would have been re-parented already.

Run any program tied to jmoshi with `python -m jmoshi_cli.serving.lifetime PARENT_PID PROGRAM ARGS...`.

macOS has no PR_SET_PDEATHSIG: there a Python child (a server's bootstrap) watches its parent from a
thread instead, and notices within a quarter of a second.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
import time

PR_SET_PDEATHSIG = 1
WATCH_S = 0.25  # where the kernel cannot signal: how often the watching thread looks at the parent


def die_with_parent(parent_pid: int, sig: int = signal.SIGKILL) -> None:
    """Make the kernel send `sig` to this process when its parent dies; exit now if it already has."""
    if not sys.platform.startswith("linux"):
        _watch_parent(parent_pid, sig)
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if os.getppid() != parent_pid:
        os._exit(1)


def _watch_parent(parent_pid: int, sig: int) -> None:
    """A daemon thread that sends `sig` to this process once it has another parent (re-parented: dead)."""
    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(WATCH_S)
        os.kill(os.getpid(), sig)

    if os.getppid() != parent_pid:
        os._exit(1)
    threading.Thread(target=watch, name="parent watch", daemon=True).start()


def tied_argv(argv: list[str], parent_pid: int | None = None) -> list[str]:
    """The command line that runs `argv` tied to this process (or to `parent_pid`)."""
    return [sys.executable, "-m", "jmoshi_cli.serving.lifetime", str(parent_pid or os.getpid()), *argv]


def main() -> None:
    parent, program = int(sys.argv[1]), sys.argv[2:]
    die_with_parent(parent)
    os.execvp(program[0], program)


if __name__ == "__main__":
    main()
