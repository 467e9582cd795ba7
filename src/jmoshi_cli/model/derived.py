"""Weights jmoshi derives once from a verified source file: the int8 checkpoint (quantize.py) and the
MLX weights (mlx/convert.py). What both need, in one place:

- a folder keyed by the source's sha256, made under a lock so that two jmoshi never make it twice;
- the sha256 of a local file (--moshi-weight), remembered by path, size and mtime so it is read once;
- a safetensors file read tensor by tensor with plain reads: safetensors' and MLX's own readers map the
  file into memory, and every page touched stays resident (to convert 15 GB that way is to hold 15 GB);
- room on the disk checked before anything is written;
- whether a derived file is still what was written: its manifest records its sha256 and the stamp
  (size, mtime, ctime, inode) it had when it last hashed to it. Loading hashes it again only when the
  stamp differs, since a full hash of 15 GB costs a minute at every start; a byte that rots on the
  disk changes no stamp, so `jmoshi verify` hashes every derived file whole. A file that fails is
  removed, manifest first, and the next start makes it again.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator

from ..errors import CacheError

if TYPE_CHECKING:
    from ..cache.artifacts import Status
    from ..cache.hub import Artifact

DISK_MARGIN = 512 * 2**20  # left free after a derived file is written
BYTES = {"BF16": 2, "F16": 2, "F32": 4, "F64": 8, "I8": 1, "U8": 1, "I16": 2, "I32": 4, "U32": 4, "I64": 8, "BOOL": 1}
REREAD_HINT = "run `jmoshi verify`; a damaged file is fetched again by `jmoshi download`"
STAMP = "stamp"  # a manifest's record of the file's stamp when it last hashed to the manifest's sha256


def make_folder(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CacheError(f"cannot create {folder}: {exc.strerror or exc}",
                         "set JMOSHI_HOME to a folder you can write to") from exc


@contextlib.contextmanager
def locked(folder: Path) -> Iterator[None]:
    import fcntl

    with open(folder / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def local_sha256(data_dir: Path, path: Path, on_note: Callable[[str], None], purpose: str) -> str:
    """sha256 of a local file, remembered by path, size and mtime so that it is read once."""
    from ..fsutil import atomic_write_text

    stat = path.stat()
    key = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
    memo = Path(data_dir) / "local-sha256.json"
    try:
        known = json.loads(memo.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        known = {}
    if key not in known:
        on_note(f"hashing {path} ({stat.st_size / 1e9:.1f} GB) to key its {purpose}")
        known[key] = sha256_of(path)
        with contextlib.suppress(OSError):
            memo.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(memo, json.dumps(known, indent=1) + "\n")
    return known[key]


def sha256_of(path: Path) -> str:
    from ..cache.artifacts import file_hash

    return file_hash(path, "sha256")


def check_room(folder: Path, size: int, what: str) -> None:
    free = shutil.disk_usage(folder).free
    if free < size + DISK_MARGIN:
        raise CacheError(f"not enough disk to make {what}: it needs {size / 1e9:.1f} GB in {folder}, "
                         f"{free / 1e9:.1f} GB is free",
                         "free some space there, or set JMOSHI_HOME to a disk with room")


@contextlib.contextmanager
def written_in_one_step(final: Path, what: str) -> Iterator[Path]:
    """A `.partial` path to write `final` to: renamed into place when the block ends well, removed
    otherwise, so a half-written file never has the final name; a failed write is one CacheError."""
    partial = final.with_name(final.name + ".partial")
    try:
        yield partial
        os.replace(partial, final)
    except OSError as exc:
        raise CacheError(f"could not write {what} in {final.parent}: {exc.strerror or exc}",
                         "free some space there, or set JMOSHI_HOME to a disk with room") from exc
    finally:
        partial.unlink(missing_ok=True)


# --- whether a derived file is still what was written ------------------------------------------------------


def stamp(path: Path) -> list[int]:
    """What a write, a replacement or a copy changes: size, mtime, ctime (set by the kernel on every write,
    even when a tool puts the mtime back) and inode."""
    stat = path.stat()
    return [stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_ino]


def unchanged(weight: Path, manifest: Path) -> bool:
    """Whether `weight` has the stamp its manifest recorded when it last hashed to its sha256 (no hash)."""
    try:
        return json.loads(manifest.read_text(encoding="utf-8")).get(STAMP) == stamp(weight)
    except (OSError, ValueError, AttributeError):
        return False


def matches(weight: Path, manifest: Path) -> bool:
    """Whether `weight` still has the sha256 its manifest recorded (reads it whole; an unreadable file does
    not). A match records the stamp the file had before it was read, so that the next load need not hash it;
    a file written meanwhile has another stamp and is hashed again then."""
    from ..fsutil import atomic_write_text

    try:
        record = json.loads(manifest.read_text(encoding="utf-8"))
        before = stamp(weight)
        intact = sha256_of(weight) == record["sha256"]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    if intact and record.get(STAMP) != before:
        with contextlib.suppress(OSError):  # the stamp only saves a hash: losing it costs time, not correctness
            atomic_write_text(manifest, json.dumps({**record, STAMP: before}, indent=2) + "\n")
    return intact


@dataclass(frozen=True)
class Rechecked:
    """A derived file hashed whole (`jmoshi verify`): removed when it no longer matched."""

    kind: str  # what it is: int8, mlx-bf16, mlx-int8, mlx-int4, mlx-mimi
    path: Path
    intact: bool
    made_from: Artifact | None = None  # the hub file it was made from, when the caller knows it

    @property
    def status(self) -> Status:
        from ..cache.artifacts import Status

        return Status.COMPLETE if self.intact else Status.CORRUPT

    @property
    def detail(self) -> str:
        return "" if self.intact else "not the sha256 it was written with; removed, the next start makes it again"


def recheck(kind: str, weight: Path, manifest: Path, verify: Callable[[], bool]) -> Rechecked:
    """`verify` (the file's own check) run on a finished derived file; one that fails is removed. The caller
    holds the folder's lock: no other jmoshi is making the file meanwhile."""
    intact = verify()
    if not intact:
        discard(weight, manifest)
    return Rechecked(kind, weight, intact)


def confirm(what: str, weight: Path, manifest: Path, verify: Callable[[], bool],
            on_note: Callable[[str], None]) -> None:
    """A finished derived file checked before it is loaded: `verify` (the file's own check) runs only when its
    stamp changed since it last matched; one that fails is removed and is a CacheError. The caller holds the
    folder's lock."""
    if unchanged(weight, manifest):  # hashed meanwhile by another jmoshi, or unchanged after all
        return
    on_note(f"checking the sha256 of {weight} ({weight.stat().st_size / 1e9:.1f} GB): it changed since it was "
            "last checked, or never was")
    if not verify():
        discard(weight, manifest)
        raise CacheError(f"{what} {weight} no longer has the sha256 it was written with; it was removed",
                         "run the command again: it is made anew from the verified source file (if this "
                         "happens again, check the disk: `dmesg`)")


def discard(weight: Path, manifest: Path) -> None:
    """Remove a derived file, its manifest first: a folder without one is never used, whatever is left."""
    try:
        manifest.unlink(missing_ok=True)
        weight.unlink(missing_ok=True)
    except OSError as exc:
        raise CacheError(f"cannot remove {weight}: {exc.strerror or exc}",
                         f"remove the folder {weight.parent} by hand; the next start makes it again") from exc


def count(shape) -> int:
    total = 1
    for n in shape:
        total *= n
    return total


class SafetensorsReader:
    """A safetensors file read tensor by tensor with plain reads: only the tensor asked for is in memory."""

    def __init__(self, path: Path):
        try:
            with open(path, "rb") as f:
                (length,) = struct.unpack("<Q", f.read(8))
                if not 2 <= length <= 100_000_000:
                    raise ValueError("not a safetensors file (bad header length)")
                header = json.loads(f.read(length))
            header.pop("__metadata__", None)
            for entry in header.values():
                begin, end = entry["data_offsets"]
                if entry["dtype"] not in BYTES or end - begin != count(entry["shape"]) * BYTES[entry["dtype"]]:
                    raise ValueError("not a safetensors file (bad tensor entry)")
        except (OSError, ValueError, KeyError, TypeError, struct.error) as exc:
            raise CacheError(f"cannot read {path}: {exc}", REREAD_HINT) from exc
        self.path, self.start, self.entries = Path(path), 8 + length, header

    def keys(self) -> list[str]:
        return list(self.entries)

    def dtype(self, key: str) -> str:
        return self.entries[key]["dtype"]

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.entries[key]["shape"])

    def raw(self, key: str) -> bytearray:
        begin, end = self.entries[key]["data_offsets"]
        data = bytearray(end - begin)
        try:
            with open(self.path, "rb") as f:
                f.seek(self.start + begin)
                if f.readinto(data) != len(data):
                    raise OSError(f"{self.path} ends before tensor {key}")
        except OSError as exc:
            raise CacheError(f"cannot read {self.path}: {exc}", REREAD_HINT) from exc
        return data
