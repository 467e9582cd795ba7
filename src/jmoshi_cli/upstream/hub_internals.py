"""huggingface_hub's download functions, as jmoshi wraps them (checked on huggingface_hub 0.28.1 and 0.36.2).

- `file_download.http_get` sees the partial file through `PartialFile`: its truncates are reported to
  the follower that hashes it as it grows (hashing.py), and the download of a file ends after its next
  block once its thread's stop event is set (side by side downloads: the first failure stops the others).
- `file_download.http_backoff` (0.36) is told to retry nothing: jmoshi retries itself (hub.with_retries).
- `writes_in_order`: hf_transfer and Xet write blocks out of order, which no follower can hash.
- `check_symlinks`: huggingface_hub tests once per repo folder whether it can hold symlinks, in a
  temporary folder inside it, from whichever download links a file first. jmoshi runs that test on
  the main thread before the downloads start (see the function).
"""

from __future__ import annotations

import functools
import threading
from pathlib import Path

from ..cache import hashing

CHECKED = ("0.28.1", "0.36.2")


class Stopped(Exception):
    """A download told to stop because another one failed: not an error of its own."""


def writes_in_order() -> bool:
    from huggingface_hub import constants, file_download

    xet = getattr(file_download, "is_xet_available", None)  # huggingface_hub >= 0.31
    return not constants.HF_HUB_ENABLE_HF_TRANSFER and not (xet is not None and xet())


this_thread = threading.local()  # .stop: the event that stops the download running on this thread


class PartialFile:
    """The partial file huggingface_hub writes to: reports each truncate to its follower, and ends the
    download after its next block once its thread's stop event is set (the partial stays, resumable)."""

    def __init__(self, stream, stop: threading.Event | None):
        self._stream = stream
        self._stop = stop

    def write(self, data):
        written = self._stream.write(data)  # first: a block that arrived is kept for the resume
        if self._stop is not None and self._stop.is_set():
            raise Stopped()
        return written

    def truncate(self, *args):
        size = self._stream.truncate(*args)
        hashing.note_rewind(self._stream.fileno())  # after: what is read from now on is the new content
        return size

    def __getattr__(self, name):
        return getattr(self._stream, name)


def report_rewinds() -> bool:
    """Have huggingface_hub's HTTP downloads report when they cut the partial file back.

    huggingface_hub 0.36.2 and later truncate the partial file in place when a server answers a
    resumed request with the whole file (200, not 206), then write it again from byte 0: the same
    inode, and it may grow back past what was hashed before the follower looks again, so only the
    truncate itself tells. False when there is no http_get to wrap: then nothing is followed.
    """
    from huggingface_hub import file_download

    get = getattr(file_download, "http_get", None)
    if get is None:
        return False
    if getattr(get, "jmoshi_reports_rewinds", False):
        return True

    @functools.wraps(get)
    def reporting(url, temp_file, *args, **kwargs):
        if not isinstance(temp_file, PartialFile):  # it calls itself again to resume
            temp_file = PartialFile(temp_file, getattr(this_thread, "stop", None))
        return get(url, temp_file, *args, **kwargs)

    reporting.__dict__["jmoshi_reports_rewinds"] = True  # via __dict__: functools' wrapper type declares no such field
    file_download.http_get = reporting
    return True


def check_symlinks(repo_folder: Path) -> None:
    """Run huggingface_hub's once-per-folder symlink test now, on this thread.

    Left to a download thread, the test's temporary folder may still be in the making when Ctrl-C ends
    the process: the interpreter's exit then removes it while that thread writes into it, prints a
    traceback and leaves the folder in the cache. huggingface_hub keys the test by the resolved common
    folder of a blob and its snapshot link, which is the repo folder; the result is remembered, so the
    downloads do not run it again.
    """
    from huggingface_hub import file_download

    repo_folder.mkdir(parents=True, exist_ok=True)
    file_download.are_symlinks_supported(repo_folder)


_wrapping = threading.Lock()  # files fetched side by side: only one thread wraps huggingface_hub


def wrap_downloads() -> None:
    """Wrap huggingface_hub's download functions once: one try per request, and the partial file
    seen through PartialFile (its truncates reported, its thread's stop obeyed) on every path."""
    with _wrapping:
        one_try_per_request()
        report_rewinds()


def one_try_per_request() -> None:
    """One HTTP try per request inside hf_hub_download, on every huggingface_hub version.

    huggingface_hub 0.28 (the documented runtime) makes one try and raises; later versions (0.36 in the
    current runtime) retry 5xx answers and connection errors inside the call, up to 5 times with their
    own backoff (1 to 8 s) and a warning per try. jmoshi already retries (with_retries: Retry-After,
    a note per retry, the one-line error at the end); both together would multiply the tries and
    print the library's warnings. So its backoff is told to retry nothing: the behaviour of 0.28.
    """
    from huggingface_hub import file_download

    backoff = getattr(file_download, "http_backoff", None)  # absent in 0.28: nothing to do
    if backoff is None or getattr(backoff, "jmoshi_one_try", False):
        return

    @functools.wraps(backoff)
    def one_try(*args, **kwargs):
        kwargs.setdefault("retry_on_status_codes", ())
        kwargs.setdefault("retry_on_exceptions", ())
        return backoff(*args, **kwargs)

    one_try.__dict__["jmoshi_one_try"] = True  # via __dict__: functools' wrapper type declares no such field
    file_download.http_backoff = one_try  # type: ignore[attr-defined]  # 0.28 has none (returned above)
