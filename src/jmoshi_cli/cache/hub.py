"""Talking to the Hugging Face hub: resolve what to fetch, fetch it with retries, explain failures.

Settings are read from the environment at each call (HF_ENDPOINT, HF_TOKEN, HF_HUB_OFFLINE,
HF_HUB_CACHE/HF_HOME) and passed to huggingface_hub explicitly, because huggingface_hub itself only
reads them once, at import.
"""

from __future__ import annotations

import os
import random
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, TypeVar

from ..errors import CacheError, HubError, HubUnreachable, JMoshiError, UsageError
from ..upstream import hub_internals
from ..upstream.hub_internals import Stopped
from . import hashing

T = TypeVar("T")
DEFAULT_ENDPOINT = "https://huggingface.co"

# Plain HTTP downloads, the path jmoshi tests (resume from `.incomplete`, progress, sha256 as bytes land).
# huggingface_hub >= 0.30 with hf_xet installed (the current runtime has both) would switch to the Xet
# protocol for files the hub stores in Xet, as it now does for J-Moshi's: untested here (no hub to try it
# against). HF_HUB_DISABLE_XET=0 in the environment turns it back on. Read by huggingface_hub at import.
os.environ.setdefault("HF_HUB_DISABLE_XET", "1")


@dataclass(frozen=True)
class Artifact:
    """One file of one repo at one commit."""

    role: str
    repo: str
    filename: str
    revision: str
    commit: str | None = None
    size: int | None = None
    sha256: str | None = None  # LFS files: the content hash the hub publishes
    blob_id: str | None = None  # small files: the git blob id

    @property
    def etag(self) -> str | None:
        """The name huggingface_hub gives the file's blob in the cache."""
        return self.sha256 or self.blob_id

    @property
    def label(self) -> str:
        return f"{self.repo}/{self.filename}"


def endpoint() -> str:
    return (os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")


def token() -> str | None:
    return os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN") or None


def offline_env() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE")


def cache_dir() -> Path:
    explicit = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
    if explicit:
        return Path(explicit).expanduser()
    home = os.environ.get("HF_HOME")
    if home:
        return Path(home).expanduser() / "hub"
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg).expanduser() / "huggingface" / "hub"


# --- hub exceptions -> messages --------------------------------------------------------------------
# Ordered: the first matching class wins, so subclasses come before their parents
# (GatedRepoError < RepositoryNotFoundError; LocalEntryNotFoundError < EntryNotFoundError).


def _explain(exc: BaseException, what: str) -> JMoshiError | None:
    import requests
    from huggingface_hub.utils import (
        EntryNotFoundError,
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    table: list[tuple[type[BaseException], Callable[[], JMoshiError]]] = [
        (GatedRepoError, lambda: HubError(
            f"{what}: the repo is gated and this account has not been granted access",
            "accept the conditions on the repo's page, then log in (`huggingface-cli login`) or set HF_TOKEN")),
        (RepositoryNotFoundError, lambda: HubError(
            f"{what}: repository not found at {endpoint()} (or it is private)",
            "check the repo id in the variant catalogue; for a private repo set HF_TOKEN")),
        (RevisionNotFoundError, lambda: UsageError(
            f"{what}: revision not found",
            "use a branch, tag or full commit sha that exists on the hub (`--revision main`)")),
        (LocalEntryNotFoundError, lambda: HubUnreachable(
            f"{what}: the hub at {endpoint()} cannot be reached and the file is not cached",
            "check the network or HF_ENDPOINT, or copy the Hugging Face cache from a machine that has it")),
        (EntryNotFoundError, lambda: HubError(
            f"{what}: no such file in the repo", "check the file names in the variant catalogue")),
        (OfflineModeIsEnabled, lambda: CacheError(
            f"{what}: HF_HUB_OFFLINE=1 and the file is not cached",
            "run `jmoshi download` on a connected machine, or unset HF_HUB_OFFLINE")),
        (HfHubHTTPError, lambda: HubError(
            f"{what}: the hub answered HTTP {_status(exc)}", "try again later; JMOSHI_DEBUG=1 shows the details")),
        (requests.exceptions.SSLError, lambda: HubError(
            f"{what}: TLS error talking to {endpoint()}", "check HF_ENDPOINT and REQUESTS_CA_BUNDLE for a mirror")),
        (requests.exceptions.RequestException, lambda: HubUnreachable(
            f"{what}: the hub at {endpoint()} cannot be reached ({type(exc).__name__})",
            "check the network or HF_ENDPOINT (a mirror), or work offline with files already cached")),
    ]
    for kind, build in table:
        if isinstance(exc, kind):
            error = build()
            error.__cause__ = exc
            return error
    if isinstance(exc, OSError) and exc.errno == 28:
        return CacheError(f"{what}: the disk is full ({cache_dir()})", "free space or point HF_HUB_CACHE elsewhere")
    if isinstance(exc, PermissionError):
        return CacheError(f"{what}: permission denied in {cache_dir()}", "make it writable or set HF_HUB_CACHE")
    return None


def _status(exc: BaseException) -> str:
    response = getattr(exc, "response", None)
    return str(getattr(response, "status_code", "error"))


def explain(exc: BaseException, what: str) -> JMoshiError:
    """A JMoshiError for any hub-side failure (unknown ones included, keeping the cause)."""
    if isinstance(exc, JMoshiError):
        return exc
    error = _explain(exc, what) or HubError(f"{what}: {type(exc).__name__}: {exc}")
    error.__cause__ = exc
    return error


# --- retries ----------------------------------------------------------------------------------------


def _retry_after(exc: BaseException) -> float | None:
    response = getattr(exc, "response", None)
    value = getattr(response, "headers", {}).get("Retry-After") if response is not None else None
    try:
        return min(float(value), 60.0) if value is not None else None
    except ValueError:
        return None


def is_transient(exc: BaseException) -> bool:
    """Errors worth another try: dropped connections, timeouts, 5xx, 429."""
    import requests
    from huggingface_hub.utils import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    if isinstance(exc, (RepositoryNotFoundError,)):
        return False
    if isinstance(exc, LocalEntryNotFoundError):
        # huggingface_hub turns a failed HEAD (a 5xx, a refused connection) into this.
        return not offline_env()
    if isinstance(exc, HfHubHTTPError):
        code = getattr(getattr(exc, "response", None), "status_code", None)
        return code is not None and (code >= 500 or code == 429)
    return isinstance(exc, (requests.exceptions.ConnectionError, requests.exceptions.Timeout,
                            requests.exceptions.ChunkedEncodingError))


def retry_base_s() -> float:
    try:
        return float(os.environ.get("JMOSHI_RETRY_BASE_S", "1"))
    except ValueError:
        return 1.0


def with_retries(call: Callable[[], T], what: str, attempts: int = 5,
                 on_retry: Callable[[int, BaseException, float], None] | None = None) -> T:
    """call() until it succeeds, backing off exponentially on transient errors; explain the last one."""
    for attempt in range(1, attempts + 1):
        try:
            return call()
        except Stopped:
            raise
        except Exception as exc:  # noqa: BLE001 - every error is either retried or explained
            if attempt == attempts or not is_transient(exc):
                raise explain(exc, what) from exc
            delay = _retry_after(exc) or retry_base_s() * 2 ** (attempt - 1) * (1 + random.random() / 4)
            if on_retry:
                on_retry(attempt, exc, delay)
            time.sleep(delay)
    raise AssertionError("unreachable")


# --- resolving ---------------------------------------------------------------------------------------


def repo_files(repo: str, revision: str) -> tuple[str | None, dict[str, Artifact]]:
    """Ask the hub for a repo's commit (None if it gives none) and files (with sizes and content hashes)."""
    from huggingface_hub import HfApi

    api = HfApi(endpoint=endpoint(), token=token())
    info = with_retries(lambda: api.model_info(repo, revision=revision, files_metadata=True),
                        f"{repo}@{revision}", attempts=3)
    files = {}
    for sibling in info.siblings or []:
        lfs = sibling.lfs
        files[sibling.rfilename] = Artifact(
            role="", repo=repo, filename=sibling.rfilename, revision=revision, commit=info.sha,
            size=sibling.size if sibling.size is not None else (lfs.size if lfs else None),
            sha256=lfs.sha256 if lfs else None, blob_id=sibling.blob_id)
    return info.sha, files


def pick(files: dict[str, Artifact], role: str, filename: str, where: str) -> Artifact:
    if filename not in files:
        raise HubError(f"{where} has no file '{filename}'", "check the file names in the variant catalogue")
    return replace(files[filename], role=role)


# --- downloading -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Fetched:
    """Where a fetched file is, and its sha256 when it was hashed while its bytes arrived."""

    path: Path
    sha256: str | None = None  # None: not followed, or the follower could not vouch for every byte


def _watch(path: Path, report: Callable[[int], None], stop: threading.Event) -> None:
    while not stop.wait(0.2):
        try:
            report(path.stat().st_size)
        except OSError:
            pass


def _followable(artifact: Artifact) -> bool:
    """Whether the partial file can be hashed as it grows.

    Only LFS files have a plain sha256 to check (small files are hashed after, at no real cost).
    hf_transfer and Xet write blocks out of order, so reading behind them would hash holes;
    elsewhere than POSIX an open reader can block the final rename; and without its truncates
    reported (upstream.hub_internals) a rewritten partial could go unseen.
    """
    return bool(artifact.sha256) and hashing.supported() and hub_internals.writes_in_order() \
        and hub_internals.report_rewinds()


def fetch(artifact: Artifact, on_bytes: Callable[[int], None] | None = None,
          on_retry: Callable[[int, BaseException, float], None] | None = None,
          on_hashed: Callable[[int], None] | None = None, stop: threading.Event | None = None) -> Fetched:
    """Download one file into the standard cache (resuming a partial one), hashing it as it arrives.

    `on_bytes` gets the bytes on disk as they grow; `on_hashed` the bytes hashed when the hash is
    still catching up after the last byte landed. Once `stop` is set the download ends with Stopped
    after its next block (huggingface_hub writes 10 MB at a time).
    """
    hub_internals.wrap_downloads()
    blob = repo_folder(artifact.repo) / "blobs" / str(artifact.etag)
    partial = blob.with_name(f"{blob.name}.incomplete")
    hub_internals.this_thread.stop = stop
    try:
        if _followable(artifact):
            return _fetch_followed(artifact, blob, partial, on_bytes, on_retry, on_hashed)
        return _fetch_watched(artifact, partial, on_bytes, on_retry)
    finally:
        hub_internals.this_thread.stop = None


def _fetch_watched(artifact: Artifact, partial: Path, on_bytes: Callable[[int], None] | None,
                   on_retry: Callable[[int, BaseException, float], None] | None) -> Fetched:
    stop = threading.Event()
    watcher = None
    if on_bytes is not None and artifact.etag:
        watcher = threading.Thread(target=_watch, args=(partial, on_bytes, stop), daemon=True)
        watcher.start()
    try:
        return Fetched(_download(artifact, on_retry))
    finally:
        stop.set()
        if watcher is not None:
            watcher.join()


def _fetch_followed(artifact: Artifact, blob: Path, partial: Path, on_bytes: Callable[[int], None] | None,
                    on_retry: Callable[[int, BaseException, float], None] | None,
                    on_hashed: Callable[[int], None] | None) -> Fetched:
    created = _create_partial(partial, blob)
    try:
        # One follower across all retries: each retry appends to the same partial file.
        with hashing.FollowingHash(partial, on_arrived=on_bytes, on_hashed=on_hashed) as follower:
            path = _download(artifact, on_retry)
            return Fetched(path, follower.finish(path))
    except BaseException:
        if created:
            _remove_if_empty(partial)
        raise


def _create_partial(partial: Path, blob: Path) -> bool:
    """Create the empty partial file huggingface_hub will append to, so the hash is on it from byte 0.

    Without it a small file can arrive and be renamed between two looks of the follower, and then
    costs a second read. huggingface_hub appends to an empty partial just as it starts a new one;
    one already there is left as it is, to be resumed. True when this call created it.
    """
    if blob.exists():
        return False  # nothing will be downloaded
    try:
        partial.parent.mkdir(parents=True, exist_ok=True)
        os.close(os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    except OSError:
        return False  # there already, or not creatable: the follower picks up what huggingface_hub makes
    return True


def _remove_if_empty(partial: Path) -> None:
    """Leave no empty partial behind for a download that failed before its first byte."""
    try:
        if partial.stat().st_size == 0:
            partial.unlink()
    except OSError:
        pass


def _download(artifact: Artifact, on_retry: Callable[[int, BaseException, float], None] | None) -> Path:
    from huggingface_hub import hf_hub_download

    def call() -> Path:
        return Path(hf_hub_download(
            artifact.repo, artifact.filename, revision=artifact.commit or artifact.revision,
            cache_dir=cache_dir(), endpoint=endpoint(), token=token()))

    return with_retries(call, artifact.label, on_retry=on_retry)


def check_symlinks(repo: str) -> None:
    """Before files of `repo` are fetched side by side (see hub_internals.check_symlinks)."""
    try:
        hub_internals.check_symlinks(repo_folder(repo))
    except OSError:
        pass  # an unwritable cache: the download meets it too, and says so


def repo_folder(repo: str) -> Path:
    return cache_dir() / ("models--" + repo.replace("/", "--"))
