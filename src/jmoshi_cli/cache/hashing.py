"""sha256 of a file taken while another writer is still appending to it.

huggingface_hub downloads into `blobs/<etag>.incomplete`, then renames it to `blobs/<etag>`. A
thread reads the growing file right behind the writer, while its pages are still in the page
cache, and feeds the bytes to the hash; when the last byte lands only the unread tail is left, and
the rename keeps the inode, so the tail is read from the same open file.

The writer may start over, and the hash then starts again from byte 0:
- a new inode behind the partial name (huggingface_hub removed the file and made a new one: a
  forced download, hf_transfer). The open descriptor keeps the old inode alive, so the new file
  cannot reuse its number;
- a size smaller than what was hashed (a truncate the thread saw);
- a truncate the writer reported (`note_rewind`). huggingface_hub 0.36.2 and later truncate the
  file in place when a server answers a resumed request with the whole file, then write it again
  from byte 0; it may grow back past what was hashed before the thread looks again, so only the
  report makes such a truncate certain to be seen (upstream.hub_internals.report_rewinds wires it).

The follower keeps no copy of what the writer wrote: it reads each block back into one reused
buffer, from the page cache, right behind the writer. Holding on to the writer's blocks until they
are hashed instead makes each new block land in freshly faulted memory, which on a virtual machine
costs more than the read it saves (bench/download.py measured it).

`finish` vouches for the digest only when the final file is the very inode that was followed,
every one of its bytes was hashed, and no rewind was reported since the hash last started; else it
returns None and the caller hashes the final file in full. A match then proves the bytes read were
the right ones, and since the writer only appends (huggingface_hub opens the file with "ab") and
reports its truncates, the bytes read are the bytes that stay. Writers that write blocks out of
order (hf_transfer, Xet) are not followed at all (hub._followable), and a mismatch is never
trusted: the caller hashes the final file again.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from pathlib import Path
from typing import Callable

BLOCK = 1024**2  # small enough to stay in the CPU cache between the read and the hash
POLL_S = 0.01  # how long to wait for new bytes once caught up: short, so little is left when the last lands
REPORT_S = 0.1  # the least time between two progress reports

Report = Callable[[int], None]


Identity = tuple[int, int]  # (device, inode)


class _Rewinds:
    """Truncates reported by writers, kept only for files that a follower has open: the table holds
    as many entries as there are follows running, however many files a process downloads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._entries: dict[Identity, list[int]] = {}  # identity -> [followers, truncates]

    def follow(self, key: Identity) -> int:
        with self._lock:
            entry = self._entries.setdefault(key, [0, 0])
            entry[0] += 1
            return entry[1]

    def unfollow(self, key: Identity) -> None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                entry[0] -= 1
                if entry[0] <= 0:
                    del self._entries[key]

    def note(self, key: Identity) -> None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                entry[1] += 1

    def count(self, key: Identity | None) -> int:
        entry = self._entries.get(key) if key is not None else None
        return entry[1] if entry is not None else 0

    def __len__(self) -> int:
        return len(self._entries)


_rewinds = _Rewinds()


def files_followed() -> int:
    """How many files' rewinds are being kept: one per file a FollowingHash has open, none once it is closed."""
    return len(_rewinds)


def note_rewind(fd: int) -> None:
    """Record that the writer of this open file cut it back: a follower of it starts over."""
    stat = os.fstat(fd)
    _rewinds.note((stat.st_dev, stat.st_ino))


def supported() -> bool:
    """Whether this platform can follow a file (positioned reads into a reused buffer)."""
    return os.name == "posix" and hasattr(os, "preadv")


class _Throttled:
    """A progress callback called at most every REPORT_S seconds (the last value always goes through)."""

    def __init__(self, report: Report | None):
        self.report = report
        self.last = 0.0

    def __call__(self, done: int, force: bool = False) -> None:
        now = time.monotonic()
        if self.report is not None and (force or now - self.last >= REPORT_S):
            self.last = now
            self.report(done)


class FollowingHash:
    """Hash `growing` as it grows, in a thread; `finish(final)` hashes the rest and gives the digest.

    `on_arrived` gets the file's size as it grows (download progress); `on_hashed` gets the bytes
    hashed while `finish` catches up with a writer that got ahead (verification progress).
    """

    def __init__(self, growing: Path, on_arrived: Report | None = None, on_hashed: Report | None = None,
                 poll_s: float = POLL_S):
        self.growing = growing
        self.poll_s = poll_s
        self.restarts = 0  # how many times the writer started over (for tests and diagnostics)
        self._arrived = _Throttled(on_arrived)
        self._hashed = _Throttled(on_hashed)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._fd: int | None = None
        self._identity: tuple[int, int] | None = None
        self._rewinds_seen = 0
        self._digest = hashlib.sha256()
        self._offset = 0
        self._failed = False
        self._buffer = bytearray(BLOCK)

    def __enter__(self) -> FollowingHash:
        self.open()  # a partial file already there is followed from before the writer resumes it
        self._thread = threading.Thread(target=self._run, name=f"hash {self.growing.name}", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._halt()
        self.close()

    @property
    def hashed(self) -> int:
        """Bytes of the followed file hashed so far (from 0 again after a restart)."""
        return self._offset

    def finish(self, final: Path) -> str | None:
        """The sha256 of `final` when it is the file that was followed, fully hashed; else None."""
        self._halt()
        fd = self._fd
        if self._failed or fd is None or self._rewound():
            return None
        try:
            stat = final.stat()
            if (stat.st_dev, stat.st_ino) != self._identity or stat.st_size < self._offset:
                return None
            while self._offset < stat.st_size:
                if not self._read_block(fd, stat.st_size):
                    return None
                self._hashed(self._offset)
        except OSError:
            return None
        self._hashed(self._offset, force=True)
        return self._digest.hexdigest()

    # --- the thread ---------------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                if not self._step():
                    self._stop.wait(self.poll_s)
        except Exception:  # noqa: BLE001 - whatever went wrong, finish() then asks for a full hash
            self._failed = True

    def _step(self) -> bool:
        """Hash one more block when there is one; False when there is nothing new yet."""
        fd = self._fd if self._fd is not None else self.open()
        if fd is None:
            return False
        if self._replaced():
            self._restart(reopen=True)
            return True
        if self._rewound():
            self._restart(reopen=False)
            return True
        size = os.fstat(fd).st_size  # a restart that reopened returned above: fd is still the followed file
        if size < self._offset:
            self._restart(reopen=False)  # truncated under us: what was hashed may no longer be there
            return True
        self._arrived(size)
        return size > self._offset and self._read_block(fd, size)

    def open(self) -> int | None:
        """The descriptor of the followed file, now open; None while it does not exist yet."""
        try:
            fd = os.open(self.growing, os.O_RDONLY)
        except FileNotFoundError:
            return None
        stat = os.fstat(fd)
        self._fd, self._identity = fd, (stat.st_dev, stat.st_ino)
        self._rewinds_seen = _rewinds.follow(self._identity)
        return fd

    def _rewound(self) -> bool:
        """True when the writer reported a truncate since the hash last started."""
        return _rewinds.count(self._identity) != self._rewinds_seen

    def _replaced(self) -> bool:
        """True when a different file now has the partial name (the old one was removed)."""
        try:
            stat = self.growing.stat()
        except FileNotFoundError:
            return False  # renamed to its final name (same inode, keep reading) or being replaced
        return (stat.st_dev, stat.st_ino) != self._identity

    def _restart(self, reopen: bool) -> None:
        self.restarts += 1
        self._digest = hashlib.sha256()
        self._offset = 0
        self._rewinds_seen = _rewinds.count(self._identity)
        if reopen:
            self.close()
            self.open()

    def _read_block(self, fd: int, size: int) -> bool:
        want = min(BLOCK, size - self._offset)
        view = memoryview(self._buffer)[:want]
        got = os.preadv(fd, [view], self._offset)
        if got <= 0:
            return False  # shrank between fstat and read; the next step sees it and restarts
        self._digest.update(view[:got])
        self._offset += got
        return True

    # --- lifetime -------------------------------------------------------------------------------------

    def _halt(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
            assert self._identity is not None  # open sets it along with _fd
            _rewinds.unfollow(self._identity)
