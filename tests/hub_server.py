"""A small Hugging Face Hub look-alike served over loopback HTTP.

It speaks just enough of the Hub protocol for the real ``huggingface_hub``
client (0.24 - 0.28) to run ``hf_hub_download``, ``snapshot_download``,
``HfApi.model_info`` / ``repo_info`` and ``list_repo_files`` against it:

* ``HEAD|GET /{org}/{name}/resolve/{revision}/{path}``
  Files are served directly (no CDN redirect) with ``X-Repo-Commit``,
  ``ETag``, ``Content-Length``, ``Accept-Ranges`` and, for LFS-style files,
  ``X-Linked-Etag`` (quoted sha256) and ``X-Linked-Size``.  ``Range:
  bytes=N-`` / ``bytes=N-M`` gives ``206`` with ``Content-Range``.
* ``GET /api/models/{org}/{name}`` and
  ``GET /api/models/{org}/{name}/revision/{revision}``
  JSON with ``id``, ``sha``, ``siblings`` (``rfilename``; with ``?blobs=true``
  also ``size``, ``blobId`` and ``lfs: {sha256, size, pointerSize}``).
* ``GET /api/models/{org}/{name}/tree/{revision}[/{path}]`` (``?recursive=``)

Errors carry the ``X-Error-Code`` header the client maps to exceptions:
``RepoNotFound`` (401), ``GatedRepo`` (401 without token, 403 with a wrong
one), ``RevisionNotFound`` (404) and ``EntryNotFound`` (404).

Repositories are folders: ``root/<org>/<name>/`` holds the files of the single
commit of ``<org>/<name>``.  The commit sha is derived from the file names and
contents, so it changes when the files change, and the sha itself is accepted
as a revision, as is ``main``.  :meth:`LocalHub.add_revision` adds more named
revisions (an alias of ``main`` or another folder).

Faults can be injected per file with :meth:`LocalHub.add_fault` so download
error handling can be exercised against real sockets.

Run ``python tests/hub_server.py ROOT --port N`` to serve a folder
by hand.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import socket
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlsplit

__all__ = ["LocalHub", "FAULT_KINDS", "main"]

FAULT_KINDS = ("cut", "500", "head500", "429", "corrupt", "slow")

# Faults that only apply to GET, only to HEAD, or to both.
_GET_FAULTS = {"cut", "500", "corrupt", "slow"}
_HEAD_FAULTS = {"head500"}
_ANY_FAULTS = {"429"}

_SHA1_RE = re.compile(r"^[0-9a-f]{40}$")

# Extensions that the Hub's default .gitattributes stores with git-lfs.
_LFS_SUFFIXES = (
    ".7z", ".arrow", ".bin", ".bz2", ".ckpt", ".ftz", ".gguf", ".gz", ".h5",
    ".joblib", ".mlmodel", ".model", ".msgpack", ".npy", ".npz", ".onnx", ".ot",
    ".parquet", ".pb", ".pickle", ".pkl", ".pt", ".pth", ".rar", ".safetensors",
    ".tar", ".tflite", ".tgz", ".wasm", ".xz", ".zip", ".zst",
)

# Request headers kept in the request log (canonical spelling).
_LOGGED_HEADERS = ("Range", "Authorization", "Accept-Encoding", "If-None-Match")

_CHUNK = 1024 * 1024


def _git_blob_sha1_prefix(size: int) -> bytes:
    return b"blob %d\x00" % size


def _lfs_pointer(sha256: str, size: int) -> bytes:
    return (
        "version https://git-lfs.github.com/spec/v1\n"
        f"oid sha256:{sha256}\n"
        f"size {size}\n"
    ).encode()


class _FileInfo:
    __slots__ = ("path", "rfilename", "size", "sha256", "git_sha1", "lfs", "pointer_size", "blob_id")

    def __init__(self, path: Path, rfilename: str, size: int, sha256: str, git_sha1: str, lfs: bool):
        self.path = path
        self.rfilename = rfilename
        self.size = size
        self.sha256 = sha256
        self.git_sha1 = git_sha1
        self.lfs = lfs
        pointer = _lfs_pointer(sha256, size)
        self.pointer_size = len(pointer)
        if lfs:
            h = hashlib.sha1(_git_blob_sha1_prefix(len(pointer)))
            h.update(pointer)
            self.blob_id = h.hexdigest()
        else:
            self.blob_id = git_sha1

    @property
    def etag(self) -> str:
        return self.sha256 if self.lfs else self.git_sha1

    def sibling(self, blobs: bool) -> dict[str, Any]:
        out: dict[str, Any] = {"rfilename": self.rfilename}
        if blobs:
            out["blobId"] = self.blob_id
            out["size"] = self.size
            if self.lfs:
                out["lfs"] = {"sha256": self.sha256, "size": self.size, "pointerSize": self.pointer_size}
        return out


class _Snapshot:
    """The files of one revision folder and the commit sha derived from them."""

    def __init__(self, folder: Path, files: dict[str, _FileInfo]):
        self.folder = folder
        self.files = files
        h = hashlib.sha1()
        for name in sorted(files):
            info = files[name]
            h.update(f"{name}\x00{info.sha256}\x00{info.size}\n".encode())
        self.sha = h.hexdigest()


class _Fault:
    __slots__ = ("repo_id", "filename", "kind", "remaining")

    def __init__(self, repo_id: str, filename: str, kind: str, times: int):
        self.repo_id = repo_id
        self.filename = filename
        self.kind = kind
        self.remaining = times


class _HubError(Exception):
    def __init__(self, status: int, code: str | None, message: str, commit: str | None = None):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.commit = commit


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, addr: tuple[str, int], hub: LocalHub):
        self.hub = hub
        super().__init__(addr, _Handler)

    def handle_error(self, request: Any, client_address: Any) -> None:  # noqa: ARG002
        # Client disconnects and injected faults are expected; stay quiet.
        return


class LocalHub:
    """Hub-compatible HTTP server over folders ``root/<org>/<name>/``."""

    #: files at least this large are LFS-style even without an LFS suffix
    lfs_threshold: int = 10 * 1024 * 1024
    #: "slow" fault: bytes per write and pause after each write
    slow_chunk: int = 64 * 1024
    slow_delay: float = 0.05
    #: every file body sent at about this many bytes per second, like a network link (None: as fast as it goes)
    link_bytes_per_s: float | None = None

    def __init__(self, root: Path, host: str = "127.0.0.1", port: int = 0):
        self.root = Path(root)
        self.host = host
        self.port = port
        self.requests: list[tuple[str, str, dict]] = []
        self._lock = threading.RLock()
        self._faults: list[_Fault] = []
        self._gated: dict[str, str] = {}
        self._revisions: dict[str, dict[str, Path | None]] = {}
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._conns: set[socket.socket] = set()

    # ------------------------------------------------------------------ lifecycle
    @property
    def endpoint(self) -> str:
        if self._server is None:
            raise RuntimeError("LocalHub is not started")
        host, port = self._server.server_address[:2]
        if ":" in str(host):
            host = f"[{host}]"
        return f"http://{host}:{port}"

    def start(self) -> LocalHub:
        if self._server is not None:
            return self
        self._stopping.clear()
        self._server = _Server((self.host, self.port), self)
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.1}, name="LocalHub", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        self._stopping.set()
        server.shutdown()
        server.server_close()
        with self._lock:
            conns = list(self._conns)
            self._conns.clear()
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> LocalHub:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -------------------------------------------------------------- configuration
    def add_fault(self, repo_id: str, filename: str, kind: str, times: int = 1) -> None:
        """Apply fault ``kind`` to the next ``times`` matching requests of a file.

        ``cut``, ``500``, ``corrupt`` and ``slow`` match GET, ``head500`` matches
        HEAD and ``429`` matches either.  ``filename="*"`` matches any file of
        the repo.
        """
        if kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault kind {kind!r}; expected one of {FAULT_KINDS}")
        if times < 1:
            return
        with self._lock:
            self._faults.append(_Fault(repo_id, filename, kind, times))

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()

    def set_gated(self, repo_id: str, token: str) -> None:
        """Require ``Authorization: Bearer <token>`` to download files of ``repo_id``."""
        with self._lock:
            self._gated[repo_id] = token

    def add_revision(self, repo_id: str, name: str, folder: Path | None = None) -> None:
        """Add a named revision: an alias of ``main`` or, with ``folder``, other files."""
        with self._lock:
            self._revisions.setdefault(repo_id, {})[name] = Path(folder) if folder is not None else None

    def clear_log(self) -> None:
        with self._lock:
            self.requests.clear()

    def commit_sha(self, repo_id: str) -> str:
        folder = self._repo_dir(repo_id)
        if folder is None:
            raise KeyError(repo_id)
        return self._snapshot(folder).sha

    # ------------------------------------------------------------------ internals
    def _repo_dir(self, repo_id: str) -> Path | None:
        parts = repo_id.split("/")
        if len(parts) != 2 or any(p in ("", ".", "..") or p.startswith(".") for p in parts):
            return None
        folder = self.root / parts[0] / parts[1]
        return folder if folder.is_dir() else None

    # The files' hashes, shared by every hub of this process: each test's hub serves the same tiny model (symlinks
    # to one cache), whose 200 MB would otherwise be hashed again by each. A file is known by what its stat says
    # (device, inode, size, modification and change times), so one written or replaced since is hashed anew.
    _hashes: dict[tuple[int, int, int, int, int], tuple[str, str]] = {}
    _hashes_lock = threading.Lock()

    def _hash_file(self, path: Path, st: os.stat_result) -> tuple[str, str]:
        key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        with LocalHub._hashes_lock:
            cached = LocalHub._hashes.get(key)
        if cached is not None:
            return cached
        sha256 = hashlib.sha256()
        sha1 = hashlib.sha1(_git_blob_sha1_prefix(st.st_size))
        with open(path, "rb") as f:
            while True:
                block = f.read(_CHUNK)
                if not block:
                    break
                sha256.update(block)
                sha1.update(block)
        result = (sha256.hexdigest(), sha1.hexdigest())
        with LocalHub._hashes_lock:
            LocalHub._hashes[key] = result
        return result

    def _snapshot(self, folder: Path) -> _Snapshot:
        files: dict[str, _FileInfo] = {}
        for dirpath, dirnames, filenames in os.walk(folder):
            dirnames[:] = sorted(d for d in dirnames if d != ".git")
            for fn in sorted(filenames):
                path = Path(dirpath) / fn
                try:
                    st = path.stat()
                except OSError:
                    continue
                rel = path.relative_to(folder).as_posix()
                sha256, git_sha1 = self._hash_file(path, st)
                lfs = rel.lower().endswith(_LFS_SUFFIXES) or st.st_size >= self.lfs_threshold
                files[rel] = _FileInfo(path, rel, st.st_size, sha256, git_sha1, lfs)
        return _Snapshot(folder, files)

    def _resolve(self, repo_id: str, revision: str) -> _Snapshot:
        folder = self._repo_dir(repo_id)
        if folder is None:
            raise _HubError(401, "RepoNotFound", "Repository not found")
        with self._lock:
            extra = dict(self._revisions.get(repo_id, {}))
        if revision == "main":
            return self._snapshot(folder)
        if revision in extra:
            alt = extra[revision]
            return self._snapshot(alt if alt is not None else folder)
        if _SHA1_RE.match(revision):
            for candidate in [folder, *(p for p in extra.values() if p is not None)]:
                snap = self._snapshot(candidate)
                if snap.sha == revision:
                    return snap
        raise _HubError(404, "RevisionNotFound", f"Invalid rev id: {revision}")

    def _check_gated(self, repo_id: str, authorization: str | None) -> None:
        with self._lock:
            token = self._gated.get(repo_id)
        if token is None:
            return
        if not authorization:
            raise _HubError(
                401,
                "GatedRepo",
                f"Access to model {repo_id} is restricted. You must have access to it and be authenticated"
                " to access it. Please log in.",
            )
        if authorization.strip() != f"Bearer {token}":
            raise _HubError(
                403,
                "GatedRepo",
                f"Access to model {repo_id} is restricted and you are not in the authorized list.",
            )

    def _take_fault(self, repo_id: str, filename: str, method: str) -> str | None:
        with self._lock:
            for fault in self._faults:
                if fault.repo_id != repo_id or fault.filename not in (filename, "*"):
                    continue
                applies = (
                    fault.kind in _ANY_FAULTS
                    or (method == "GET" and fault.kind in _GET_FAULTS)
                    or (method == "HEAD" and fault.kind in _HEAD_FAULTS)
                )
                if not applies:
                    continue
                fault.remaining -= 1
                if fault.remaining <= 0:
                    self._faults.remove(fault)
                return fault.kind
        return None

    def _log(self, method: str, path: str, headers: Any) -> None:
        selected = {name: headers[name] for name in _LOGGED_HEADERS if headers.get(name) is not None}
        with self._lock:
            self.requests.append((method, path, selected))

    def _model_info(self, repo_id: str, snap: _Snapshot, blobs: bool) -> dict[str, Any]:
        with self._lock:
            gated = repo_id in self._gated
        mtime = max((f.path.stat().st_mtime for f in snap.files.values()), default=time.time())
        stamp = datetime.fromtimestamp(mtime, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.000Z")
        info: dict[str, Any] = {
            "_id": hashlib.sha1(repo_id.encode()).hexdigest()[:24],
            "id": repo_id,
            "modelId": repo_id,
            "author": repo_id.split("/")[0],
            "sha": snap.sha,
            "lastModified": stamp,
            "createdAt": stamp,
            "private": False,
            "gated": "manual" if gated else False,
            "disabled": False,
            "downloads": 0,
            "likes": 0,
            "tags": [],
            "siblings": [snap.files[name].sibling(blobs) for name in sorted(snap.files)],
        }
        if blobs:
            info["usedStorage"] = sum(f.size for f in snap.files.values())
        return info

    def _tree(self, snap: _Snapshot, prefix: str, recursive: bool) -> list[dict[str, Any]]:
        prefix = prefix.strip("/")
        base = prefix + "/" if prefix else ""
        if prefix and not any(name.startswith(base) for name in snap.files):
            raise _HubError(404, "EntryNotFound", f"{prefix} does not exist on \"{snap.sha}\"", snap.sha)
        entries: list[dict[str, Any]] = []
        seen_dirs: set[str] = set()
        for name in sorted(snap.files):
            if not name.startswith(base):
                continue
            rest = name[len(base):]
            parts = rest.split("/")
            for i in range(1, len(parts)):
                d = base + "/".join(parts[:i])
                if d not in seen_dirs and (recursive or i == 1):
                    seen_dirs.add(d)
                    oid = hashlib.sha1(f"tree\x00{snap.sha}\x00{d}".encode()).hexdigest()
                    entries.append({"type": "directory", "oid": oid, "size": 0, "path": d})
            if len(parts) > 1 and not recursive:
                continue
            f = snap.files[name]
            entry: dict[str, Any] = {"type": "file", "oid": f.blob_id, "size": f.size, "path": name}
            if f.lfs:
                entry["lfs"] = {"oid": f.sha256, "size": f.size, "pointerSize": f.pointer_size}
            entries.append(entry)
        return entries


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"
    server_version = "LocalHub/1.0"
    timeout = 60  # idle keep-alive connections are dropped after this

    # ------------------------------------------------------------------ plumbing
    def setup(self) -> None:
        super().setup()
        hub = self.server.hub
        with hub._lock:
            hub._conns.add(self.connection)

    def finish(self) -> None:
        hub = self.server.hub
        with hub._lock:
            hub._conns.discard(self.connection)
        try:
            super().finish()
        except OSError:
            pass

    def handle(self) -> None:
        try:
            super().handle()
        except (ConnectionError, TimeoutError, OSError):
            self.close_connection = True

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        return

    def do_HEAD(self) -> None:
        self._dispatch("HEAD")

    def do_GET(self) -> None:
        self._dispatch("GET")

    def _dispatch(self, method: str) -> None:
        hub = self.server.hub
        hub._log(method, self.path, self.headers)
        url = urlsplit(self.path)
        segments = [unquote(s) for s in url.path.split("/")[1:]]
        query = {k: v[-1] for k, v in parse_qs(url.query, keep_blank_values=True).items()}
        try:
            if len(segments) >= 5 and segments[2] == "resolve":
                repo_id = f"{segments[0]}/{segments[1]}"
                self._serve_file(method, repo_id, segments[3], "/".join(segments[4:]))
            elif len(segments) >= 4 and segments[0] == "api" and segments[1] == "models":
                self._serve_api(method, segments[2:], query)
            else:
                raise _HubError(404, None, "Not Found")
        except _HubError as err:
            self._send_error(err)

    # ------------------------------------------------------------------- helpers
    def _common_headers(self) -> None:
        self.send_header("X-Request-Id", f"Root={uuid.uuid4()}")

    def _send_error(self, err: _HubError) -> None:
        body = json.dumps({"error": err.message}).encode()
        self.send_response(err.status)
        self._common_headers()
        if err.code:
            self.send_header("X-Error-Code", err.code)
        self.send_header("X-Error-Message", err.message)
        if err.commit:
            self.send_header("X-Repo-Commit", err.commit)
        if err.status == 429:
            self.send_header("Retry-After", "1")
        self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _send_json(self, method: str, payload: Any) -> None:
        body = json.dumps(payload).encode()
        self.send_response(200)
        self._common_headers()
        self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if method != "HEAD":
            self.wfile.write(body)

    # ----------------------------------------------------------------------- API
    def _serve_api(self, method: str, rest: list[str], query: dict[str, str]) -> None:
        hub = self.server.hub
        if len(rest) < 2:
            raise _HubError(404, None, "Not Found")
        repo_id = f"{rest[0]}/{rest[1]}"
        tail = rest[2:]
        blobs = query.get("blobs", "").lower() in ("1", "true")
        if not tail:
            snap = hub._resolve(repo_id, "main")
            return self._send_json(method, hub._model_info(repo_id, snap, blobs))
        if tail[0] == "revision" and len(tail) >= 2:
            # A revision like "refs/pr/1" arrives with %2F, i.e. one segment; tolerate raw slashes too.
            snap = hub._resolve(repo_id, "/".join(tail[1:]))
            return self._send_json(method, hub._model_info(repo_id, snap, blobs))
        if tail[0] == "tree" and len(tail) >= 2:
            snap = hub._resolve(repo_id, tail[1])
            recursive = query.get("recursive", "").lower() in ("1", "true")
            return self._send_json(method, hub._tree(snap, "/".join(tail[2:]), recursive))
        raise _HubError(404, None, "Not Found")

    # --------------------------------------------------------------------- files
    def _serve_file(self, method: str, repo_id: str, revision: str, filename: str) -> None:
        hub = self.server.hub
        if hub._repo_dir(repo_id) is None:
            raise _HubError(401, "RepoNotFound", "Repository not found")
        hub._check_gated(repo_id, self.headers.get("Authorization"))
        snap = hub._resolve(repo_id, revision)
        info = snap.files.get(filename)
        if info is None:
            raise _HubError(404, "EntryNotFound", f"{filename} does not exist on \"{revision}\"", snap.sha)

        fault = hub._take_fault(repo_id, filename, method)
        if fault in ("500", "head500"):
            raise _HubError(500, None, "Internal Error - We're working hard to fix this as soon as possible!")
        if fault == "429":
            raise _HubError(429, None, "Too Many Requests")

        size = info.size
        start, end = 0, size - 1
        status = 200
        rng = self.headers.get("Range")
        if rng and method == "GET":
            m = re.fullmatch(r"\s*bytes=(\d*)-(\d*)\s*", rng)
            if m and (m.group(1) or m.group(2)):
                if m.group(1):
                    start = int(m.group(1))
                    end = min(int(m.group(2)), size - 1) if m.group(2) else size - 1
                else:  # suffix range: last N bytes
                    start = max(size - int(m.group(2)), 0)
                if start >= size or start > end:
                    self.send_response(416)
                    self._common_headers()
                    self.send_header("Content-Range", f"bytes */{size}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                status = 206
        length = end - start + 1 if size else 0

        self.send_response(status)
        self._common_headers()
        self.send_header("X-Repo-Commit", snap.sha)
        self.send_header("ETag", f'"{info.etag}"')
        if info.lfs:
            self.send_header("X-Linked-Etag", f'"{info.sha256}"')
            self.send_header("X-Linked-Size", str(size))
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Type", "application/octet-stream")
        base = filename.rsplit("/", 1)[-1]
        self.send_header("Content-Disposition", f"inline; filename*=UTF-8''{quote(base)}; filename=\"{base}\";")
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self.send_header("Content-Length", str(length))
        self.end_headers()
        if method == "HEAD" or length == 0:
            return
        self._send_body(info.path, start, length, fault)

    @staticmethod
    def _iter_file(path: Path, start: int, length: int, chunk: int) -> Iterator[bytes]:
        with open(path, "rb") as f:
            f.seek(start)
            left = length
            while left > 0:
                block = f.read(min(chunk, left))
                if not block:
                    break
                yield block
                left -= len(block)

    def _link_pause(self, sent: int, started: float) -> float:
        """How long to wait so that the body so far left at the link's rate (0 without a link)."""
        rate = self.server.hub.link_bytes_per_s
        return sent / rate - (time.monotonic() - started) if rate else 0.0

    def _send_body(self, path: Path, start: int, length: int, fault: str | None) -> None:
        hub = self.server.hub
        limit = length // 2 if fault == "cut" else length
        chunk = hub.slow_chunk if fault == "slow" else _CHUNK
        sent = 0
        started = time.monotonic()
        try:
            for block in self._iter_file(path, start, limit, chunk):
                if fault == "corrupt":
                    block = bytes([block[0] ^ 0xFF]) + block[1:]
                self.wfile.write(block)
                sent += len(block)
                pause = hub.slow_delay if fault == "slow" else self._link_pause(sent, started)
                if pause > 0 and hub._stopping.wait(pause):
                    raise ConnectionAbortedError("server stopping")
        except OSError:
            self.close_connection = True
            return
        if sent < length:
            # Truncated body: close the connection so the client sees it end early.
            self.close_connection = True
            try:
                self.wfile.flush()
                self.connection.shutdown(socket.SHUT_WR)
            except OSError:
                pass


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python tests/hub_server.py",
        description="Serve folders ROOT/<org>/<name>/ as Hugging Face Hub model repos.",
    )
    parser.add_argument("root", type=Path, help="folder holding <org>/<name>/ repos")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument(
        "--gated", action="append", default=[], metavar="REPO=TOKEN", help="require a token for REPO (repeatable)"
    )
    args = parser.parse_args(argv)
    if not args.root.is_dir():
        parser.error(f"{args.root} is not a directory")
    hub = LocalHub(args.root, host=args.host, port=args.port)
    for item in args.gated:
        repo, sep, token = item.partition("=")
        if not sep or not repo or not token:
            parser.error(f"--gated expects REPO=TOKEN, got {item!r}")
        hub.set_gated(repo, token)
    hub.start()
    print(hub.endpoint, flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        hub.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
