"""The recordings jmoshi keeps (`jmoshi recordings`, `serve --record`): check the folder before a
server starts (:func:`check_dir`), list sessions (:func:`list_sessions`), and close the files of a
conversation whose server died mid-way (:func:`settle`): headers that count every whole sample in the
file, transcript.json from the journal, meta.json saying "interrupted".
"""

from __future__ import annotations

import contextlib
import json
import os
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from ..audio_io import FRAME_SIZE, SAMPLE_RATE
from ..errors import UsageError
from .format import (
    DIALOGUE,
    FORMAT,
    HEADER_BYTES,
    META,
    PRIVATE_DIR,
    SAMPLE_BYTES,
    TEXT_JOURNAL,
    WAV_CHANNELS,
    Ended,
    iso,
    server_gone,
    wav_header,
    write_json,
    write_transcript,
)


@dataclass(frozen=True)
class Session:
    """One recorded conversation: its folder, its meta.json, and how it ended as far as can be told."""

    path: Path
    meta: dict
    ended: Ended
    problem: str = ""  # why meta.json could not be read (ended is UNREADABLE)

    @property
    def start_utc(self) -> str:
        return str(self.meta.get("start_utc") or "")

    @property
    def duration_s(self) -> float:
        return float(self.meta.get("duration_s") or 0.0)

    @property
    def variant(self) -> str:
        return str(self.meta.get("variant") or "")

    @property
    def replica(self) -> str:
        return str(self.meta.get("replica") or "")

    def summary(self) -> dict:
        """What `jmoshi recordings --json` prints for it."""
        meta = self.meta
        return {"id": self.path.name, "path": str(self.path), "start_utc": meta.get("start_utc"),
                "end_utc": meta.get("end_utc"), "duration_s": meta.get("duration_s"), "frames": meta.get("frames"),
                "variant": meta.get("variant"), "repo": meta.get("repo"), "commit": meta.get("commit"),
                "replica": meta.get("replica"), "precision": meta.get("precision"), "sampling": meta.get("sampling"),
                "seed": meta.get("seed"),
                "ended": self.ended.value, "error": meta.get("error") or self.problem or None}


def read_session(folder: Path) -> Session:
    try:
        meta = json.loads((folder / META).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        return Session(folder, {}, Ended.UNREADABLE, f"{META}: {getattr(exc, 'strerror', None) or exc}")
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        return Session(folder, {}, Ended.UNREADABLE, f"{META} is not a jmoshi recording (format {FORMAT})")
    try:
        ended = Ended(meta.get("ended"))
    except ValueError:
        return Session(folder, meta, Ended.UNREADABLE, f"{META}: unknown ended {meta.get('ended')!r}")
    if ended is Ended.RUNNING and server_gone(meta.get("server") or {}):
        ended = Ended.INTERRUPTED
    return Session(folder, meta, ended)


def list_sessions(root: Path) -> list[Session]:
    """Every recorded conversation directly under ``root``, oldest first."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise UsageError(f"{root}: no such folder", "give the folder passed to `jmoshi serve --record`")
    try:
        folders = sorted(p for p in root.iterdir() if p.is_dir() and (p / META).exists())
    except OSError as exc:
        raise UsageError(f"cannot read {root}: {exc.strerror or exc}") from exc
    return [read_session(folder) for folder in folders]


def check_dir(root: Path) -> Path:
    """Create DIR if needed and prove a file can be written there (seconds, before any model load).

    A folder that cannot be written is a wrong argument, as for `infer --out`: UsageError (exit 2).
    """
    root = Path(root).expanduser().absolute()
    hint = "choose a folder you can write to with --record"
    try:
        root.mkdir(mode=PRIVATE_DIR, parents=True, exist_ok=True)  # a new study folder: private (its parents not)
    except OSError as exc:
        raise UsageError(f"--record {root}: cannot create the folder: {exc.strerror or exc}", hint) from exc
    probe = root / f".jmoshi-write-test-{uuid.uuid4().hex[:8]}"
    try:
        probe.write_bytes(b"RIFF")
    except OSError as exc:
        raise UsageError(f"--record {root}: cannot write there: {exc.strerror or exc}", hint) from exc
    finally:
        with contextlib.suppress(OSError):
            probe.unlink()
    return root


def repair_wav(path: Path, channels: int) -> int:
    """Make a WAV's header count every whole sample frame in the file; returns the frames it holds."""
    block = channels * SAMPLE_BYTES
    with open(path, "r+b") as stream:
        size = stream.seek(0, os.SEEK_END)
        data = max(size - HEADER_BYTES, 0) // block * block
        stream.truncate(HEADER_BYTES + data)
        stream.seek(0)
        stream.write(wav_header(channels, data))
    return data // block


def settle(root: Path) -> list[Session]:
    """Close the sessions under ``root`` whose server died mid-conversation: headers, then meta.json.

    Returns the sessions it settled. Sessions of servers that still run are left alone, so this is
    safe while other servers record into the same folder.
    """
    if not Path(root).is_dir():
        return []  # removed while the server ran: nothing left to settle
    settled = []
    for session in list_sessions(root):
        if session.ended is not Ended.INTERRUPTED or session.meta.get("ended") != Ended.RUNNING.value:
            continue
        with contextlib.suppress(OSError):
            settled.append(_settle_one(session))
    return settled


def _settle_one(session: Session) -> Session:
    frames = {name: repair_wav(session.path / name, channels)
              for name, channels in WAV_CHANNELS.items() if (session.path / name).exists()}
    if (session.path / TEXT_JOURNAL).exists():
        write_transcript(session.path)
    samples = frames.get(DIALOGUE, max(frames.values(), default=0))
    last_write = max((p.stat().st_mtime for p in session.path.glob("*.wav")), default=None)
    meta = dict(session.meta, ended=Ended.INTERRUPTED.value, frames=samples // FRAME_SIZE,
                duration_s=round(samples / SAMPLE_RATE, 3),
                end_utc=iso(datetime.fromtimestamp(last_write, timezone.utc)) if last_write else None,
                error="the server process ended mid-conversation; the files hold what was written until then")
    write_json(session.path / META, meta)
    return Session(session.path, meta, Ended.INTERRUPTED)
