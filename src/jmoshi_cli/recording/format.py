"""The recording format on disk (`jmoshi serve --record DIR`): what the writer in the server and
jmoshi's store both rely on.

Each conversation is one folder ``DIR/<UTC start>-<short id>/`` (e.g. ``20261125T153012Z-3fa9c1``):

- ``dialogue.wav``: 24 kHz stereo 16-bit PCM, the user (what the model heard) on the left and J-Moshi
  on the right, sample-aligned on the model's timeline (the layout `jmoshi infer` writes);
- ``user.wav`` and ``jmoshi.wav``: the same two channels as mono files;
- ``transcript.json``: J-Moshi's text pieces with their frame and start time, and the joined text;
- ``meta.json``: model, runtime, precision, sampling, seed, replica, start and end, and how it ended.

A WAV's header is brought up to date every second while it grows, after its data: a server killed
with SIGKILL leaves a header that claims at most what the file holds, which every reader accepts.
J-Moshi's text streams to a journal (``.transcript.jsonl``) that becomes transcript.json when the
conversation ends. The process that writes a folder is named in meta.json ("server"), so that the
store can tell a conversation still running from one whose server died.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import struct
import uuid
from datetime import datetime, timezone
from enum import Enum
from pathlib import Path

from ..audio_io import FRAME_S, SAMPLE_RATE
from ..fsutil import atomic_write
from ..transcript import join_pieces

FORMAT = 1


# Participants' voices are personal data: readable by the account that records them only, whatever the
# umask (files made by `infer` and `analyze` follow it as usual).
PRIVATE_FILE, PRIVATE_DIR = 0o600, 0o700


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
    IDLE = "idle"  # the client sent no audio for the idle timeout (--idle-timeout): the server ended it
    TIME_LIMIT = "time-limit"  # it reached --max-minutes
    DISK_LOW = "disk-low"  # the disk went below --min-free-mb: the recording stopped and the conversation ended
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
    atomic_write(path, (json.dumps(data, ensure_ascii=False, indent=2) + "\n").encode("utf-8"), mode=PRIVATE_FILE)


def private_open(path: Path, mode: str, encoding: str | None = None):
    """A recording's file opened for writing (`mode` "wb" or "w"), readable by its owner only."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, PRIVATE_FILE)
    os.fchmod(fd, PRIVATE_FILE)  # an existing file keeps its mode through O_CREAT
    return os.fdopen(fd, mode, encoding=encoding)


def below_floor(folder: Path, floor_bytes: int) -> bool:
    """Whether the disk holding `folder` has less than `floor_bytes` free (--min-free-mb; 0: no floor). A disk
    that cannot be asked counts as above it: the writer says so when a write fails."""
    if not floor_bytes:
        return False
    try:
        return shutil.disk_usage(folder).free < floor_bytes
    except OSError:
        return False


def private_folder(path: Path) -> None:
    """mkdir for a recording's folder: FileExistsError as mkdir, 0700 whatever the umask."""
    path.mkdir(mode=PRIVATE_DIR)
    os.chmod(path, PRIVATE_DIR)


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


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def start_ticks(pid: int) -> int | None:
    """When a process started (clock ticks since boot): tells a reused pid from the original."""
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def server_identity() -> dict:
    """This process, as meta.json records it, so that a later reader can tell whether it still runs."""
    pid = os.getpid()
    return {"host": socket.gethostname(), "boot_id": _boot_id(), "pid": pid, "start_ticks": start_ticks(pid)}


def server_gone(identity: dict) -> bool:
    """True when the recorded process is known to have ended; False when it runs or cannot be checked here."""
    if identity.get("host") != socket.gethostname():
        return False  # another machine's server: nothing to check it against
    if identity.get("boot_id") != _boot_id():
        return True
    from .. import scratch

    pid, ticks = identity.get("pid"), identity.get("start_ticks")
    if not isinstance(pid, int):
        return True
    # A server that recorded no start (no /proc: macOS) is judged by its pid alone.
    return not scratch.is_running(pid, scratch.ticks_stamp(ticks) if isinstance(ticks, int) else None)
