"""What `serve` and `front` were asked about access (the token, origins, consent, limits), checked and
turned into what the servers enforce: the contract's `Access` and `Limits` (gate.py, visits.py)."""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from pathlib import Path

from ..backends.contract import Access, Limits
from ..errors import UsageError
from . import token

CONSENT_MAX_BYTES = 64 * 1024


@dataclass(frozen=True)
class AccessOptions:
    token: str | None = None  # --token
    new_token: bool = False
    no_token: bool = False
    allow_origins: tuple[str, ...] = ()
    consent_file: Path | None = None  # --consent: the operator's own text on the consent page
    idle_s: float = Limits.idle_s
    max_minutes: float | None = None
    max_waiting: int = Limits.max_waiting
    min_free_mb: int = Limits.min_free_mb


@dataclass(frozen=True)
class Decided:
    access: Access
    limits: Limits
    token: token.Choice = field(default_factory=lambda: token.Choice(None, token.Source.NONE))


def decide(options: AccessOptions, data_dir: Path, record: bool) -> Decided:
    """Check the flags (seconds, before any download) and settle the token of this run."""
    limits = _limits(options)
    origins = tuple(_origin(value) for value in options.allow_origins)
    if options.consent_file is not None and not record:
        raise UsageError("--consent without --record", "the consent page is shown only when conversations are recorded")
    consent = _consent_text(options.consent_file) if record else None
    choice = token.choose(data_dir, options.token, options.new_token, options.no_token)
    access = Access(choice.value, origins, consent, secrets.token_hex(16))
    return Decided(access, limits, choice)


def _limits(options: AccessOptions) -> Limits:
    if not options.idle_s >= 5:
        raise UsageError(f"--idle-timeout {options.idle_s:g} must be 5 seconds or more",
                         "a browser sends audio every 80 ms; e.g. --idle-timeout 30")
    if options.max_minutes is not None and not options.max_minutes > 0:
        raise UsageError(f"--max-minutes {options.max_minutes:g} must be more than 0", "e.g. --max-minutes 10")
    if options.max_waiting < 0:
        raise UsageError(f"--max-waiting {options.max_waiting} must be 0 or more", "e.g. --max-waiting 8")
    if options.min_free_mb < 0:
        raise UsageError(f"--min-free-mb {options.min_free_mb} must be 0 or more", "e.g. --min-free-mb 1024")
    max_s = options.max_minutes * 60 if options.max_minutes is not None else None
    return Limits(options.idle_s, max_s, options.max_waiting, options.min_free_mb)


def _origin(value: str) -> str:
    from urllib.parse import urlsplit

    if value == "*":
        return value
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.netloc or parts.path not in ("", "/") or parts.query:
        raise UsageError(f"--allow-origin {value!r} is not an origin", "e.g. --allow-origin https://lab.example.org")
    return f"{parts.scheme}://{parts.netloc.lower()}"


def _consent_text(path: Path | None) -> str:
    if path is None:
        return ""
    try:
        data = Path(path).expanduser().read_bytes()
    except OSError as exc:
        raise UsageError(f"--consent {path}: {exc.strerror or exc}", "a UTF-8 text file with your study's words") \
            from None
    if len(data) > CONSENT_MAX_BYTES:
        raise UsageError(f"--consent {path} is {len(data)} bytes", f"keep it under {CONSENT_MAX_BYTES // 1024} KB")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise UsageError(f"--consent {path} is not UTF-8 text", "save it as UTF-8") from None
