"""The token that lets a person or a program talk to a server jmoshi starts (on by default, as Jupyter's).

One token is made the first time and kept in jmoshi's data folder (0600), like the TLS certificate,
so that bookmarks and QR codes survive restarts. `--token VALUE` / `JMOSHI_TOKEN` set it for one run,
`--new-token` replaces the kept one, `--no-token` turns the check off. Every server of one run (the
replicas, the front) checks the same token: one token for the user, whatever the topology.

The browser keeps it in a cookie whose name carries a digest of the token, so that two servers with
different tokens on one host do not overwrite each other's cookie (cookies ignore ports). Standard
library only: the server children import it.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

from ..errors import CacheError, UsageError

ENV = "JMOSHI_TOKEN"
FILE = "token"
QUERY = "token"  # ?token=... on any URL
COOKIE_PREFIX = "jmoshi-token-"
# What a token may hold: it travels in URLs, cookies, headers and haproxy.cfg without quoting.
ALLOWED = re.compile(r"[A-Za-z0-9_\-.~]{16,256}")


class Source(Enum):
    KEPT = "kept"  # the one in jmoshi's data folder
    NEW = "new"  # made now (first run, or --new-token) and kept
    GIVEN = "given"  # --token or JMOSHI_TOKEN, for this run only
    NONE = "none"  # --no-token


@dataclass(frozen=True)
class Choice:
    value: str | None
    source: Source


def cookie_name(token: str) -> str:
    return COOKIE_PREFIX + hashlib.sha256(token.encode()).hexdigest()[:12]


def same(presented: str | None, token: str) -> bool:
    """Whether `presented` is the token, in time that does not depend on where they differ."""
    return presented is not None and hmac.compare_digest(presented.encode(), token.encode())


def check(value: str, origin: str) -> str:
    if not ALLOWED.fullmatch(value):
        raise UsageError(f"{origin}: a token is 16 to 256 letters, digits or -_.~",
                         "leave it out and jmoshi makes one, or e.g. `--token $(openssl rand -hex 16)`")
    return value


def choose(folder: Path, given: str | None = None, new: bool = False, off: bool = False) -> Choice:
    """The token of this run, from the flags, the environment and the kept file, in that order."""
    if off:
        if given or new:
            raise UsageError("--no-token with --token or --new-token", "choose one")
        return Choice(None, Source.NONE)
    if given is not None:
        return Choice(check(given, f"--token (or {ENV})"), Source.GIVEN)
    from_env = os.environ.get(ENV)
    if from_env and not new:
        return Choice(check(from_env, ENV), Source.GIVEN)
    path = folder / FILE
    if not new:
        kept = _read(path)
        if kept is not None:
            return Choice(kept, Source.KEPT)
    return Choice(_make(path), Source.NEW)


def _read(path: Path) -> str | None:
    try:
        value = path.read_text(encoding="ascii").strip()
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        raise CacheError(f"cannot read the kept token {path}: {getattr(exc, 'strerror', None) or exc}",
                         "remove the file, or start with --new-token") from None
    if not ALLOWED.fullmatch(value):
        return None  # damaged: a new one replaces it
    if path.stat().st_mode & 0o077:
        os.chmod(path, 0o600)  # a copy restored with the umask's bits must not stay readable by others
    return value


def _make(path: Path) -> str:
    """A new token, written whole (a temp file renamed over the old) and readable by its owner only."""
    value = secrets.token_urlsafe(18)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        temp = path.with_name(f".{FILE}.{os.getpid()}")
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="ascii") as out:
            out.write(value + "\n")
        os.replace(temp, path)
    except OSError as exc:
        raise CacheError(f"cannot keep the token in {path}: {exc.strerror or exc}",
                         "make jmoshi's data folder writable (JMOSHI_HOME), or pass --token") from None
    return value
