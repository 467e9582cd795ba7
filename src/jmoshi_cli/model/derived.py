"""Weights jmoshi derives once from a verified source file: the int8 checkpoint (quantize.py) and the
MLX weights (mlx/convert.py). What both need, in one place:

- a folder keyed by the source's sha256, made under a lock so that two jmoshi never make it twice;
- the sha256 of a local file (--moshi-weight), remembered by path, size and mtime so it is read once;
- a safetensors file read tensor by tensor with plain reads: safetensors' and MLX's own readers map the
  file into memory, and every page touched stays resident (to convert 15 GB that way is to hold 15 GB);
- room on the disk checked before anything is written.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import struct
from pathlib import Path
from typing import Callable, Iterator

from ..errors import CacheError

DISK_MARGIN = 512 * 2**20  # left free after a derived file is written
BYTES = {"BF16": 2, "F16": 2, "F32": 4, "F64": 8, "I8": 1, "U8": 1, "I16": 2, "I32": 4, "U32": 4, "I64": 8, "BOOL": 1}
REREAD_HINT = "run `jmoshi verify`; a damaged file is fetched again by `jmoshi download`"


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
