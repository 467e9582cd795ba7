"""Where a variant's files are in the Hugging Face cache, what is missing, and whether it is intact.

The cache is huggingface_hub's standard layout, so other tools (moshi, transformers, huggingface-cli)
reuse what jmoshi downloads:

    models--org--name/refs/<revision>          the commit a branch or tag points to
    models--org--name/snapshots/<commit>/file  a link to ../../blobs/<etag>
    models--org--name/blobs/<etag>             the content; <etag>.incomplete while downloading

A blob's name is its content hash (sha256 for LFS files, the git blob id for small ones), so a
cached file can be verified with no network at all.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import shutil
import tarfile
import tempfile
import threading
from dataclasses import dataclass, field, replace
from enum import Enum
from pathlib import Path
from typing import Callable, ContextManager, Protocol

from ..errors import CacheError, HubUnreachable, UsageError
from ..fsutil import atomic_write
from ..variants import Catalogue, Variant
from . import hub, side_by_side
from .hub import Artifact

COMMIT = re.compile(r"^[0-9a-f]{40}$")
DISK_MARGIN = 256 * 1024**2
FETCH_AT_ONCE = 4  # J-Moshi's files: the weights, Mimi, the tokenizer, the web UI


@dataclass(frozen=True)
class ModelFiles:
    """Local paths of everything the moshi loaders need for one model."""

    moshi_weight: Path
    mimi_weight: Path
    tokenizer: Path
    # config.json when the repo has one; None means moshi's built-in 7B config (J-Moshi's case).
    config: Path | None = None
    # The unpacked web UI (a folder with index.html) when it was asked for.
    web_ui: Path | None = None
    lora: Path | None = None  # a LoRA adapter over moshi_weight (finetune.py)


class Status(str, Enum):
    """What the cache holds of one file."""

    COMPLETE = "complete"  # there, and its content hash matched (or it was just fetched and matched)
    MISSING = "missing"
    PARTIAL = "partial"  # a resumable .incomplete download
    CORRUPT = "corrupt"  # wrong size or wrong content hash
    UNVERIFIED = "unverified"  # there, but no content hash is known to check it against

    @property
    def usable(self) -> bool:
        return self in (Status.COMPLETE, Status.UNVERIFIED)


@dataclass
class Entry:
    """One artifact and what the cache holds of it."""

    artifact: Artifact
    path: Path | None = None  # the snapshot path when the file is there
    status: Status = Status.MISSING
    partial_bytes: int = 0
    detail: str = ""

    @property
    def missing_bytes(self) -> int | None:
        if self.status.usable:
            return 0
        size = self.artifact.size
        return None if size is None else max(size - self.partial_bytes, 0)


@dataclass
class Plan:
    """Everything a variant needs, resolved to commits, with the cache's state of each file."""

    variant: Variant
    entries: list[Entry]
    offline: bool
    notes: list[str] = field(default_factory=list)
    fetched: tuple[str, ...] = ()  # labels of the files this run downloaded

    @property
    def missing(self) -> list[Entry]:
        """What is to be fetched: a file that is there, with no hash to check it against, is not."""
        return [e for e in self.entries if not e.status.usable]

    @property
    def missing_bytes(self) -> int:
        return sum(e.missing_bytes or 0 for e in self.missing)

    def entry(self, role: str) -> Entry | None:
        return next((e for e in self.entries if e.artifact.role == role), None)


# --- resolving -------------------------------------------------------------------------------------


def _cached_commit(repo: str, revision: str) -> str | None:
    if COMMIT.match(revision):
        return revision if (hub.repo_folder(repo) / "snapshots" / revision).is_dir() else None
    ref = hub.repo_folder(repo) / "refs" / revision
    try:
        commit = ref.read_text().strip()
    except OSError:
        return None
    return commit if COMMIT.match(commit) else None


def _offline_artifacts(repo: str, revision: str, wanted: list[tuple[str, str]]) -> list[Artifact]:
    commit = _cached_commit(repo, revision)
    if commit is None:
        raise CacheError(
            f"offline and nothing of {repo}@{revision} is in the cache ({hub.cache_dir()})",
            f"run `jmoshi download` while online, or set HF_HUB_CACHE to a cache that has {repo}")
    snapshot = hub.repo_folder(repo) / "snapshots" / commit
    found = []
    for role, filename in wanted:
        link = snapshot / filename
        blob = Path(os.path.realpath(link)).name if link.is_symlink() else None
        if role == "config" and not link.exists():
            continue
        sha256, blob_id = (blob, None) if blob and len(blob) == 64 else (None, blob)
        found.append(Artifact(role, repo, filename, revision, commit, sha256=sha256, blob_id=blob_id))
    return found


def _online_artifacts(repo: str, revision: str, wanted: list[tuple[str, str]]) -> list[Artifact]:
    _, files = hub.repo_files(repo, revision)
    where = f"{repo}@{revision}"
    return [hub.pick(files, role, name, where) for role, name in wanted if role != "config" or name in files]


def resolve(catalogue: Catalogue, variant: Variant, revision: str | None = None,
            offline: bool = False, web_ui: bool = True) -> Plan:
    """What a variant needs, at which commits, and what the cache already has of it."""
    offline = offline or hub.offline_env()
    revision = revision or variant.revision
    _check_revision(revision)
    wanted = [("moshi", variant.moshi), ("tokenizer", variant.tokenizer), ("mimi", variant.mimi),
              ("config", "config.json")]
    lookup = _offline_artifacts if offline else _online_artifacts
    artifacts = lookup(variant.repo, revision, wanted)
    if web_ui:
        ui = catalogue.web_ui
        artifacts += lookup(ui.repo, ui.revision, [("web_ui", ui.file)])
    return Plan(variant, [inspect(a) for a in artifacts], offline)


def resolve_or_cached(catalogue: Catalogue, variant: Variant, revision: str | None = None,
                      offline: bool = False, web_ui: bool = True) -> Plan:
    """resolve(), falling back to the cache when the hub cannot be reached (serving needs no network)."""
    try:
        return resolve(catalogue, variant, revision, offline, web_ui)
    except HubUnreachable as online_error:
        try:
            plan = resolve(catalogue, variant, revision, offline=True, web_ui=web_ui)
        except CacheError:
            raise online_error from None
        if plan.missing:
            raise online_error
        plan.notes.append(f"the hub cannot be reached; using the cached {variant.repo}@{revision or variant.revision}")
        return plan


def _check_revision(revision: str) -> None:
    if not revision or revision.startswith(("/", "-")) or ".." in revision or any(c.isspace() for c in revision):
        raise UsageError(f"bad revision {revision!r}", "use a branch, tag or 40-character commit sha")


# --- inspecting and verifying ----------------------------------------------------------------------


def inspect(artifact: Artifact) -> Entry:
    """Look at the cache for one artifact, without hashing."""
    folder = hub.repo_folder(artifact.repo)
    if artifact.commit:
        link = folder / "snapshots" / artifact.commit / artifact.filename
        if link.exists():
            size = link.stat().st_size
            if artifact.size is not None and size != artifact.size:
                return Entry(artifact, link, Status.CORRUPT, detail=f"{size} bytes, expected {artifact.size}")
            return Entry(artifact, link, Status.COMPLETE)
    if artifact.etag:
        partial = folder / "blobs" / f"{artifact.etag}.incomplete"
        if partial.exists():
            return Entry(artifact, None, Status.PARTIAL, partial.stat().st_size)
    return Entry(artifact)


def file_hash(path: Path, kind: str, chunk: int = 8 * 1024**2,
              on_bytes: Callable[[int], None] | None = None) -> str:
    """sha256 of the content, or the git blob id ("sha1" of 'blob <size>\\0' + content)."""
    digest = hashlib.sha256() if kind == "sha256" else hashlib.sha1(b"blob %d\0" % path.stat().st_size)
    done = 0
    with path.open("rb") as stream:
        while block := stream.read(chunk):
            digest.update(block)
            done += len(block)
            if on_bytes:
                on_bytes(done)
    return digest.hexdigest()


def expected_hash(entry: Entry) -> tuple[str, str] | None:
    """(kind, value) the file must hash to: the hub's metadata, else its blob name in the cache."""
    artifact = entry.artifact
    if artifact.sha256:
        return "sha256", artifact.sha256
    if artifact.blob_id:
        return "sha1", artifact.blob_id
    if entry.path is not None:
        name = Path(os.path.realpath(entry.path)).name
        if len(name) == 64:
            return "sha256", name
        if len(name) == 40:
            return "sha1", name
    return None


def verify(entry: Entry, on_bytes: Callable[[int], None] | None = None, sha256: str | None = None) -> Entry:
    """Hash a complete entry; mark it corrupt (with why) when the content is not what the hub has.

    `sha256` is a digest already taken while the file arrived (hashing.FollowingHash). Only a match
    is taken from it: anything else is settled by hashing the file itself, so a slip of the
    follower can cost time but never mark a good file corrupt or a bad one complete.
    """
    if entry.status is not Status.COMPLETE or entry.path is None:
        return entry
    expected = expected_hash(entry)
    if expected is None:
        return replace(entry, status=Status.UNVERIFIED, detail="no content hash known for this file")
    kind, value = expected
    matched = kind == "sha256" and sha256 == value
    actual = value if matched else file_hash(entry.path, kind, on_bytes=on_bytes)
    if actual != value:
        return replace(entry, status=Status.CORRUPT, detail=f"{kind} {actual[:12]}…, expected {value[:12]}…")
    stamp_verified(entry.path)
    return entry


def is_stamped(path: Path) -> bool:
    """True when this exact blob (same size and mtime) was hashed and matched before."""
    blob = Path(os.path.realpath(path))
    try:
        stat = blob.stat()
    except OSError:
        return False
    return _stamps().get(str(blob)) == [stat.st_size, stat.st_mtime_ns]


_stamping = threading.Lock()  # files downloaded side by side finish together: no stamp may be lost


def stamp_verified(path: Path) -> None:
    blob = Path(os.path.realpath(path))
    stat = blob.stat()
    with _stamping:
        stamps = _stamps()
        stamps[str(blob)] = [stat.st_size, stat.st_mtime_ns]
        _write_json(data_dir() / "verified.json", stamps)


def _stamps() -> dict:
    try:
        return json.loads((data_dir() / "verified.json").read_text())
    except (OSError, ValueError):
        return {}


def data_dir() -> Path:
    explicit = os.environ.get("JMOSHI_HOME")
    if explicit:
        return Path(explicit).expanduser()
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base).expanduser() / "jmoshi"


def _write_json(path: Path, data: object) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, json.dumps(data, indent=1).encode())
    except OSError:
        pass  # the stamp only saves a re-hash; losing it costs time, not correctness


def discard(entry: Entry) -> None:
    """Remove a corrupt file (its snapshot link and blob) so no later run takes it for complete."""
    if entry.path is None:
        return
    blob = Path(os.path.realpath(entry.path))
    entry.path.unlink(missing_ok=True)
    if blob != entry.path:
        blob.unlink(missing_ok=True)


# --- downloading -----------------------------------------------------------------------------------


def check_writable(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".jmoshi-write-test-"):
            pass
    except OSError as exc:
        raise CacheError(f"cannot write to the cache {folder}: {exc.strerror or exc}",
                         "make it writable, or point HF_HUB_CACHE (or HF_HOME) at a writable folder") from None


def check_disk(plan: Plan) -> None:
    from ..hardware import disk_free

    need = plan.missing_bytes
    free = disk_free(hub.cache_dir())
    if free.ok and need + DISK_MARGIN > int(free.value):
        raise CacheError(
            f"not enough disk space in {hub.cache_dir()}: need {gib(need)} more, {gib(int(free.value))} free",
            "free some space, or point HF_HUB_CACHE at a larger disk")


def gib(n: int) -> str:
    return f"{n / 1024**3:.1f} GiB" if n >= 1024**3 else f"{n / 1024**2:.1f} MiB"


Progress = Callable[[Entry, int], None]
Retry = Callable[[Entry, int, BaseException, float], None]


def download(plan: Plan, on_progress: Progress | None = None, on_retry: Retry | None = None,
             attempts_on_corruption: int = 2, on_hash: Progress | None = None) -> Plan:
    """Fetch what is missing, verify each file's hash, and return the plan with every file usable: complete,
    or unverified when no content hash is known for it (it stays so: nothing vouched for it).

    `on_progress` gets each file's bytes on disk while it downloads (once at its start, once when it
    is verified); `on_hash` the bytes hashed while a file is checked without downloading it. Up to
    FETCH_AT_ONCE files download at once, the biggest first, so the small ones (Mimi, the tokenizer,
    the web UI) arrive while the weights do, as huggingface_hub's own snapshot_download does; the
    callbacks are then called from several threads.
    """
    if plan.offline and plan.missing:
        names = ", ".join(e.artifact.filename for e in plan.missing)
        raise CacheError(f"offline and not cached: {names}",
                         "run `jmoshi download` while online, or unset HF_HUB_OFFLINE / drop --offline")
    if plan.missing:
        check_writable(hub.cache_dir())
        check_disk(plan)
    elif not plan.offline:
        check_writable(hub.cache_dir())
    _remember_refs(plan)
    entries = [verify(e, on_bytes=_for(on_hash, e)) if _unstamped(e)
               else e for e in plan.entries]  # put there by another tool, or changed since we hashed it
    todo = [i for i, e in enumerate(entries) if not e.status.usable]
    for i, entry in zip(todo, _fetch_all([entries[i] for i in todo], on_progress, on_retry,
                                         attempts_on_corruption, on_hash), strict=True):
        entries[i] = entry
    done = replace(plan, entries=entries, fetched=tuple(entries[i].artifact.label for i in todo))
    web_ui = done.entry("web_ui")
    if web_ui is not None:
        unpack_web_ui(web_ui)
    return done


def needs_hashing(plan: Plan) -> list[Entry]:
    """Complete files that download() will hash before trusting them (no stamp from an earlier check)."""
    return [e for e in plan.entries if _unstamped(e)]


def _unstamped(entry: Entry) -> bool:
    """A complete file with no stamp from an earlier check (a complete entry always has its path)."""
    return entry.status is Status.COMPLETE and entry.path is not None and not is_stamped(entry.path)


def _for(callback: Progress | None, entry: Entry) -> Callable[[int], None] | None:
    return (lambda n: callback(entry, n)) if callback else None


def _fetch_all(entries: list[Entry], on_progress: Progress | None, on_retry: Retry | None, attempts: int,
               on_hash: Progress | None) -> list[Entry]:
    """_fetch_verified for each entry, up to FETCH_AT_ONCE at once, the biggest started first.

    The first failure stops the others at their next block (their partial files stay, resumable).
    """
    for repo in sorted({e.artifact.repo for e in entries}):
        hub.check_symlinks(repo)
    stop = threading.Event()
    calls = [functools.partial(_fetch_verified, e, on_progress, on_retry, attempts, on_hash, stop) for e in entries]
    biggest_first = sorted(range(len(entries)), key=lambda i: -(entries[i].artifact.size or 0))
    return side_by_side.run_all(calls, FETCH_AT_ONCE, stop, order=biggest_first)


def _fetch_verified(entry: Entry, on_progress: Progress | None, on_retry: Retry | None, attempts: int,
                    on_hash: Progress | None = None, stop: threading.Event | None = None) -> Entry:
    artifact = entry.artifact
    for _ in range(attempts):
        if on_progress:
            # The file's own clock starts here; a CORRUPT status says why it is fetched again.
            on_progress(entry, entry.partial_bytes)
        entry = _clear_for_fetch(entry)
        retry = (lambda i, exc, delay, e=entry: on_retry(e, i, exc, delay)) if on_retry else None
        fetched = hub.fetch(artifact, on_bytes=_for(on_progress, entry), on_retry=retry,
                            on_hashed=_for(on_hash, entry), stop=stop)
        arrived = inspect(artifact)
        entry = verify(arrived, on_bytes=_for(on_hash, arrived), sha256=fetched.sha256)
        if entry.status.usable:
            if on_progress:
                on_progress(entry, artifact.size or 0)
            return entry
    discard(entry)
    raise CacheError(f"{artifact.label} arrived corrupt {attempts} times ({entry.detail}); the bad copy was removed",
                     "run the command again; if it persists, the mirror at HF_ENDPOINT serves a bad file")


def _clear_for_fetch(entry: Entry) -> Entry:
    """Remove what must not be resumed: a corrupt copy, or a partial file longer than the file.

    A partial that long comes from a server that once ignored the resume's Range header; resuming
    past the end of the file would fail with HTTP 416 on every later run.
    """
    artifact = entry.artifact
    overgrown = entry.status is Status.PARTIAL and artifact.size is not None and entry.partial_bytes > artifact.size
    if entry.status is Status.CORRUPT:
        discard(entry)
    elif overgrown:
        (hub.repo_folder(artifact.repo) / "blobs" / f"{artifact.etag}.incomplete").unlink(missing_ok=True)
    else:
        return entry
    return inspect(artifact)


def _remember_refs(plan: Plan) -> None:
    """Record branch -> commit like huggingface_hub does, so offline runs can resolve `main`."""
    for entry in plan.entries:
        artifact = entry.artifact
        if artifact.commit and not COMMIT.match(artifact.revision):
            ref = hub.repo_folder(artifact.repo) / "refs" / artifact.revision
            try:
                ref.parent.mkdir(parents=True, exist_ok=True)
                atomic_write(ref, artifact.commit.encode())
            except OSError as exc:
                raise CacheError(f"cannot write {ref}: {exc.strerror or exc}") from None


def web_ui_dir(entry: Entry) -> Path:
    """Where moshi.server itself unpacks dist.tgz: a `dist` folder beside the cached file."""
    assert entry.path is not None
    return entry.path.parent / "dist"


def unpack_web_ui(entry: Entry) -> Path:
    assert entry.path is not None
    return unpack_bundle(entry.path, web_ui_dir(entry))


def unpack_bundle(tgz: Path, target: Path) -> Path:
    """Unpack a dist.tgz (top-level dist/ with index.html) into target, atomically."""
    if (target / "index.html").is_file():
        return target
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".dist-") as tmp:
        try:
            with tarfile.open(tgz, "r:gz") as tar:
                members = [m for m in tar.getmembers() if _safe_member(m)]
                tar.extractall(tmp, members=members)  # noqa: S202 - members filtered above
        except (tarfile.TarError, OSError, EOFError) as exc:
            raise CacheError(f"cannot unpack the web UI bundle {tgz}: {exc}",
                             "remove it and run `jmoshi download` again") from None
        unpacked = Path(tmp) / "dist"
        if not (unpacked / "index.html").is_file():
            raise CacheError(f"{tgz} has no dist/index.html", "check [web_ui] in the variant catalogue")
        shutil.rmtree(target, ignore_errors=True)
        os.replace(unpacked, target)
    return target


def _safe_member(member: tarfile.TarInfo) -> bool:
    name = member.name
    return (member.isfile() or member.isdir()) and not name.startswith("/") and ".." not in Path(name).parts


def model_files_with(plan: Plan, moshi_weight: Path | None) -> ModelFiles:
    """The plan's files, with a user's checkpoint in place of the variant's weights when given."""
    if moshi_weight is None:
        return model_files(plan)
    extra = Entry(Artifact("moshi", "", "", ""), moshi_weight, Status.COMPLETE)
    return model_files(replace(plan, entries=[e for e in plan.entries if e.artifact.role != "moshi"] + [extra]))


def model_files(plan: Plan) -> ModelFiles:
    def path(role: str) -> Path:
        entry = plan.entry(role)
        if entry is None or entry.path is None or not entry.status.usable:
            raise CacheError(f"{role} file of {plan.variant.repo} is not in the cache", "run `jmoshi download`")
        return entry.path

    config = plan.entry("config")
    ui = plan.entry("web_ui")
    return ModelFiles(path("moshi"), path("mimi"), path("tokenizer"), config.path if config else None,
                      web_ui_dir(ui) if ui is not None and ui.path is not None else None)


# --- one way to make a variant local, for download, serve and infer -------------------------------


class DownloadWatch(Protocol):
    """What a progress display gets told while files arrive."""

    def progress(self, entry: Entry, done: int) -> None: ...

    def retry(self, entry: Entry, attempt: int, exc: BaseException, delay: float) -> None: ...

    # Optional (called only when the watch has it): bytes hashed while a file is checked, for files
    # another tool put in the cache and for a hash still catching up after a download.
    def hashing(self, entry: Entry, done: int) -> None: ...


WatchFactory = Callable[[Plan], ContextManager[DownloadWatch]]


def fetch_missing(plan: Plan, watch: WatchFactory | None = None) -> Plan:
    """download(), shown through `watch` when there is something to fetch or to hash."""
    if watch is not None and ((plan.missing and not plan.offline) or needs_hashing(plan)):
        with watch(plan) as view:
            return download(plan, on_progress=view.progress, on_retry=view.retry,
                            on_hash=getattr(view, "hashing", None))
    return download(plan)


def ensure_local(catalogue: Catalogue, variant: Variant, revision: str | None = None, *, offline: bool = False,
                 web_ui: bool = True, moshi_weight: Path | None = None, use_cache_if_unreachable: bool = True,
                 watch: WatchFactory | None = None,
                 on_note: Callable[[str], None] = lambda note: None) -> tuple[Plan, ModelFiles]:
    """Every file a variant needs, verified in the cache (fetched if missing, unless offline).

    With `moshi_weight` (a local checkpoint), the variant's own weights are neither fetched nor used.
    """
    find = resolve_or_cached if use_cache_if_unreachable else resolve
    plan = find(catalogue, variant, revision, offline=offline, web_ui=web_ui)
    for note in plan.notes:
        on_note(note)
    if moshi_weight is not None:
        plan = replace(plan, entries=[e for e in plan.entries if e.artifact.role != "moshi"])
    if plan.missing and variant.license:
        on_note(license_note(variant))  # before the first byte: the weights' terms bind whoever downloads them
    plan = fetch_missing(plan, watch)
    return plan, model_files_with(plan, moshi_weight)


def license_note(variant: Variant) -> str:
    where = f": {variant.license_url}" if variant.license_url else ""
    return f"{variant.repo} is licensed {variant.license}{where}"
