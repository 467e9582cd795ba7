"""Private temp folders that do not outlive the jmoshi that made them, and whether a process still runs.

A jmoshi killed with SIGKILL cannot remove its temp folder (HAProxy's config and runtime socket, under
--https a copy of the private key), so each folder names its owner in a marker file: the pid and when
that process started, and where pids mean that process (the machine and, on Linux, the pid namespace: a
container may share /tmp). Making a folder first removes the marked folders whose owner has ended. A
folder without a marker is never touched, nor one of another user or another place, nor one whose owner
still runs.

When a process started tells a reused pid from the original: on Linux the start time in clock ticks
from /proc/<pid>/stat, on macOS what `ps -o lstart=` says (to the second), elsewhere nothing (the pid
alone then).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

PREFIX = "jmoshi-"
MARKER = ".jmoshi-owner"
PROC = Path("/proc")
PID_NAMESPACE = Path("/proc/self/ns/pid")
PS_TIMEOUT_S = 5.0


# --- whether a process runs ---------------------------------------------------------------------------


def _proc_stat(pid: int) -> list[str]:
    """The fields of /proc/<pid>/stat after the name (state first); empty without /proc or without the process."""
    try:
        return (PROC / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return []


def start_ticks(pid: int) -> int | None:
    """When a process started (clock ticks since boot, from /proc); None without /proc or without the process."""
    fields = _proc_stat(pid)
    return int(fields[19]) if len(fields) > 19 and fields[19].isdigit() else None


def ticks_stamp(ticks: int) -> str:
    """The start stamp (see `process_start`) of a process that started at `ticks`."""
    return f"ticks:{ticks}"


def process_start(pid: int) -> str | None:
    """When `pid` started, as a stamp that a later process with the same pid does not share; None if unknown."""
    ticks = start_ticks(pid)
    if ticks is not None:
        return ticks_stamp(ticks)
    if (PROC / "self" / "stat").exists():
        return None  # /proc is there and the process is not: asking ps would tell nothing more
    return _ps_start(pid)


def _ps_start(pid: int) -> str | None:
    # Fixed locale and zone: the stamp is compared with one written by another process, maybe another shell.
    env = dict(os.environ, LC_ALL="C", TZ="UTC")
    try:
        done = subprocess.run(["ps", "-o", "lstart=", "-p", str(pid)], capture_output=True, text=True, env=env,
                              timeout=PS_TIMEOUT_S, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    started = " ".join(done.stdout.split())
    return f"lstart:{started}" if done.returncode == 0 and started else None


def is_running(pid: int, start: str | None = None) -> bool:
    """True while `pid` runs and, when its start stamp was recorded, is still the process that started then."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # it runs, as another user
    if _proc_stat(pid)[:1] == ["Z"]:
        return False  # ended, and its parent has not collected it yet
    return _same_start(start, process_start(pid))


def _same_start(recorded: str | None, now: str | None) -> bool:
    """False only when both stamps are known, of the same kind, and differ: unknown means the pid decides."""
    if recorded is None or now is None or recorded.split(":", 1)[0] != now.split(":", 1)[0]:
        return True
    return recorded == now


# --- folders owned by a process -----------------------------------------------------------------------


@dataclass(frozen=True)
class Owner:
    pid: int
    start: str | None
    place: str

    @classmethod
    def this_process(cls) -> Owner:
        return cls(os.getpid(), process_start(os.getpid()), this_place())

    def ended(self) -> bool:
        """Known to have ended: its pid means here what it meant to it, and no longer names it."""
        return self.place == this_place() and not is_running(self.pid, self.start)


def this_place() -> str:
    """Where this process's pids mean something: the machine, and its pid namespace where there are any."""
    try:
        namespace = os.readlink(PID_NAMESPACE)
    except OSError:
        namespace = ""
    return f"{socket.gethostname()} {namespace}".strip()


def make(kind: str, root: Path | None = None) -> Path:
    """A new private (0700) folder `jmoshi-<kind>-*` in the temp folder (or `root`), owned by this process.

    The folders of jmoshis that have ended go first. The caller removes its own when done."""
    root = Path(tempfile.gettempdir()) if root is None else root
    sweep(root)
    folder = Path(tempfile.mkdtemp(prefix=f"{PREFIX}{kind}-", dir=root))
    _write_marker(folder, Owner.this_process())
    return folder


@contextlib.contextmanager
def held(kind: str, root: Path | None = None) -> Iterator[Path]:
    """`make`, removed again when the block ends."""
    folder = make(kind, root)
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def sweep(root: Path | None = None) -> list[Path]:
    """Remove the marked jmoshi folders whose owner has ended; the ones removed."""
    root = Path(tempfile.gettempdir()) if root is None else root
    removed = []
    for folder in sorted(root.glob(f"{PREFIX}*")):
        if _abandoned(folder):
            # Two jmoshis starting at once may both sweep the same folder: whatever the other removed is fine.
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    return removed


def owner(folder: Path) -> Owner | None:
    """Who made `folder`, from its marker; None when it has none that reads as one."""
    try:
        data = json.loads((folder / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict):
        return None
    pid, start, place = data.get("pid"), data.get("start"), data.get("place")
    if type(pid) is not int or pid <= 0 or not (start is None or isinstance(start, str)) or not isinstance(place, str):
        return None
    return Owner(pid, start, place)


def _abandoned(folder: Path) -> bool:
    try:
        info = folder.lstat()
    except OSError:
        return False
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid():
        return False  # a link, a file, or another user's: not ours to judge
    found = owner(folder)
    return found is not None and found.ended()


def _write_marker(folder: Path, who: Owner) -> None:
    # One write into a folder only this user can enter: a sweep that reads it half-written keeps the folder.
    (folder / MARKER).write_text(json.dumps({"pid": who.pid, "start": who.start, "place": who.place}), encoding="utf-8")
