"""Recorded conversations on disk (`jmoshi serve --record DIR`): the folder format, listing, repair.

Each conversation is one folder ``DIR/<UTC start>-<short id>/`` (e.g. ``20261125T153012Z-3fa9c1``):

- ``dialogue.wav``: 24 kHz stereo 16-bit PCM, the user (what the model heard) on the left and J-Moshi
  on the right, sample-aligned on the model's timeline (the layout `jmoshi infer` writes);
- ``user.wav`` and ``jmoshi.wav``: the same two channels as mono files;
- ``transcript.json``: J-Moshi's text pieces with their frame and start time, and the joined text;
- ``meta.json``: model, runtime, sampling, seed, replica, start and end, and how it ended.

The writer lives in the server's process (:mod:`jmoshi_cli.recorder`); this module holds what both
sides share (file names, :class:`Ended`, the WAV header) and what jmoshi itself does with the
folders: check DIR before a server starts (:func:`check_dir`), list sessions (:func:`list_sessions`),
and close the files of a conversation whose server died mid-way (:func:`settle`).

A WAV's header is brought up to date every second while it grows, after its data: a server killed
with SIGKILL leaves a header that claims at most what the file holds, which every reader accepts.
J-Moshi's text streams to a journal (``.transcript.jsonl``) that becomes transcript.json when the
conversation ends. :func:`settle` finishes both for a server that died: headers that count every whole
sample in the file, transcript.json from the journal, meta.json saying "interrupted".
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import struct
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from enum import Enum
from pathlib import Path

from .audio_io import FRAME_S, FRAME_SIZE, SAMPLE_RATE
from .errors import UsageError
from .fsutil import atomic_write_text
from .transcript import join_pieces

FORMAT = 1
DIALOGUE, USER, JMOSHI = "dialogue.wav", "user.wav", "jmoshi.wav"
TRANSCRIPT, META = "transcript.json", "meta.json"
# J-Moshi's text as it comes, one JSON line a piece; made into transcript.json when the conversation
# ends (or by settle), then removed.
TEXT_JOURNAL = ".transcript.jsonl"
WAV_CHANNELS = {DIALOGUE: 2, USER: 1, JMOSHI: 1}
HEADER_BYTES = 44
SAMPLE_BYTES = 2  # 16-bit PCM
BYTES_PER_MINUTE = sum(WAV_CHANNELS.values()) * SAMPLE_BYTES * SAMPLE_RATE * 60

ALIGNMENT = ("sample n of every wav is the same instant on the model's timeline: frame t (80 ms) on the left is "
             "the user's audio the model consumed as its frame t, on the right what J-Moshi produced for that same "
             "frame (the model drops the user's frame 0 and has nothing to say at frame 0, as upstream "
             "moshi.server). A live user hears J-Moshi's frame t at least one frame later, plus compute and "
             "network time.")


class Ended(str, Enum):
    """How a recorded conversation ended (``meta.json`` "ended")."""

    RUNNING = "running"  # still going, or its server died before it could say (see Session.ended)
    HANG_UP = "hang-up"  # the client closed the conversation
    SERVER_STOP = "server-stop"  # the server was asked to stop (SIGTERM, SIGINT) mid-conversation
    ERROR = "error"  # the conversation handler failed (meta "error" says how)
    INTERRUPTED = "interrupted"  # the server process died mid-conversation (killed, crashed)
    UNREADABLE = "unreadable"  # listing only: meta.json is missing or not what jmoshi writes


def utc_now() -> datetime:
    return datetime.now(timezone.utc)


def iso(moment: datetime) -> str:
    return moment.astimezone(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def folder_name(start: datetime) -> str:
    """``<UTC start>-<short id>``: sorts by time; the random part keeps replicas' folders apart."""
    return f"{start.astimezone(timezone.utc):%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:6]}"


def wav_header(channels: int, data_bytes: int, sample_rate: int = SAMPLE_RATE) -> bytes:
    """The 44-byte header of a 16-bit PCM WAV holding ``data_bytes`` of samples."""
    block = channels * SAMPLE_BYTES
    return struct.pack("<4sI4s4sIHHIIHH4sI", b"RIFF", 36 + data_bytes, b"WAVE", b"fmt ", 16, 1, channels,
                       sample_rate, sample_rate * block, block, 8 * SAMPLE_BYTES, b"data", data_bytes)


def write_json(path: Path, data: dict) -> None:
    atomic_write_text(path, json.dumps(data, ensure_ascii=False, indent=2) + "\n")


def piece_line(frame: int, text_id: int, piece: str) -> str:
    """One piece of J-Moshi's text as a journal line: its frame, start time (s), token id and piece."""
    return json.dumps({"frame": frame, "time_s": round(frame * FRAME_S, 3), "id": text_id, "piece": piece},
                      ensure_ascii=False) + "\n"


def write_transcript(folder: Path) -> None:
    """transcript.json from the text journal (none: no text), then the journal goes.

    A line cut short by a killed server is left out.
    """
    journal = folder / TEXT_JOURNAL
    pieces = []
    with contextlib.suppress(FileNotFoundError), open(journal, encoding="utf-8") as lines:
        for line in lines:
            with contextlib.suppress(ValueError):
                pieces.append(json.loads(line))
    write_json(folder / TRANSCRIPT, {"sample_rate": SAMPLE_RATE, "frame_s": FRAME_S, "alignment": ALIGNMENT,
                                     "pieces": pieces, "text": join_pieces(p["piece"] for p in pieces)})
    journal.unlink(missing_ok=True)


# --- is the server that writes a session still there? --------------------------------------------


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def _start_ticks(pid: int) -> int | None:
    """When a process started (clock ticks since boot): tells a reused pid from the original."""
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def server_identity() -> dict:
    """This process, as meta.json records it, so that a later reader can tell whether it still runs."""
    pid = os.getpid()
    return {"host": socket.gethostname(), "boot_id": _boot_id(), "pid": pid, "start_ticks": _start_ticks(pid)}


def server_gone(identity: dict) -> bool:
    """True when the recorded process is known to have ended; False when it runs or cannot be checked here."""
    if identity.get("host") != socket.gethostname():
        return False  # another machine's server: nothing to check it against
    if identity.get("boot_id") != _boot_id():
        return True
    pid = identity.get("pid")
    return not isinstance(pid, int) or _start_ticks(pid) != identity.get("start_ticks")


# --- sessions ------------------------------------------------------------------------------------


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
                "replica": meta.get("replica"), "sampling": meta.get("sampling"), "seed": meta.get("seed"),
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


# --- before a server starts, and after it stops --------------------------------------------------


def check_dir(root: Path) -> Path:
    """Create DIR if needed and prove a file can be written there (seconds, before any model load).

    A folder that cannot be written is a wrong argument, as for `infer --out`: UsageError (exit 2).
    """
    root = Path(root).expanduser().absolute()
    hint = "choose a folder you can write to with --record"
    try:
        root.mkdir(parents=True, exist_ok=True)
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
