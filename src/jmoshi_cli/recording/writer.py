"""Alignment. The server consumes the user's audio in whole frames and makes one generator step per
frame. Step ``s`` of a conversation puts the user's frame ``s`` at position ``s`` of the model's
timeline and returns the tokens of position ``s + 1 - max_delay`` (None before that), which
``mimi.decode`` turns into J-Moshi's 80 ms for that position. The tap numbers user frames by their
``encode`` call and J-Moshi's frames by the step that produced their tokens, and the writer puts
both on that timeline (:class:`Aligner`): sample ``n`` of every file is the same instant for the
model. Positions with nothing from J-Moshi (position 0, whose tokens are the initial ones) are
silence, so the two channels never slide against each other.

The frame loop never waits on a disk. The event loop only copies each frame (1920 float32 samples)
and puts it in a bounded queue (:data:`QUEUE_ITEMS`); a writer thread per conversation
(:class:`SessionWriter`) does every file operation, the folder's creation included, and streams
audio to disk as it comes, so memory stays flat however long the conversation. If the queue is full
(a disk slower than real time) the frame is dropped, counted, and written as silence so that
alignment holds. A write that fails (a full disk) stops that recording with one line on the
console; the conversation goes on.

Nothing corrupt. WAV headers are brought up to date every second, after the data they count. J-Moshi's
text goes to a journal, a JSON line a piece, flushed every second; transcript.json is made from it when
the conversation ends. meta.json is replaced in one step. A server killed outright leaves WAVs whose
headers lag by at most a second and a journal, which jmoshi's :func:`jmoshi_cli.recording.store.settle`
then turns into complete files.
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, TextIO

import numpy as np

from ..audio_io import FRAME_S, FRAME_SIZE, to_pcm16
from ..transcript import SKIPPED_TEXT_IDS
from . import format as recording_format
from .format import Ended

QUEUE_ITEMS = 256  # two items per frame: ~10 s of audio, ~2 MB, before frames are dropped


SYNC_EVERY_S = 1.0  # WAV headers and the text journal brought up to date


PREFIX = "jmoshi recorder: "
MB = 1024 * 1024


Notify = Callable[[str], None]


@dataclass(frozen=True)
class UserFrame:
    """80 ms of the user's audio as the model consumed it: the server's frame `frame` of this conversation."""

    frame: int
    pcm: np.ndarray


@dataclass(frozen=True)
class ModelFrame:
    """80 ms of J-Moshi's voice for timeline position `position`, and the text token sampled with it."""

    position: int
    pcm: np.ndarray
    text_id: int


@dataclass
class Column:
    """One frame position: the user's 1920 samples and J-Moshi's (None: nothing there, silence)."""

    position: int
    user: np.ndarray | None
    model: np.ndarray | None


class Aligner:
    """Puts the user's frames and J-Moshi's on the model's timeline, in order, as they arrive.

    J-Moshi's frame for position p is produced while the server handles the user's frame
    p + max_delay - 1, so once the user's frame p + max_delay has arrived, position p is complete
    (whatever did not come by then never will: position 0, or a frame dropped on a full queue).
    Holds at most max_delay + 1 frames.
    """

    def __init__(self, max_delay: int):
        self.max_delay = max_delay
        self.user: dict[int, np.ndarray] = {}
        self.model: dict[int, np.ndarray] = {}
        self.last_user = -1
        self.next = 0

    def add_user(self, frame: int, pcm: np.ndarray) -> list[Column]:
        self.user[frame] = pcm
        self.last_user = max(self.last_user, frame)
        return self._ready()

    def add_model(self, position: int, pcm: np.ndarray) -> list[Column]:
        if position >= self.next:
            self.model[position] = pcm
        return self._ready()

    def _ready(self) -> list[Column]:
        out: list[Column] = []
        while True:
            q = self.next
            user_done = q in self.user or self.last_user > q
            model_done = q in self.model or self.last_user >= q + self.max_delay
            if not (user_done and model_done):
                return out
            out.append(self._take(q))

    def _take(self, q: int) -> Column:
        self.next = q + 1
        return Column(q, self.user.pop(q, None), self.model.pop(q, None))

    def flush(self) -> list[Column]:
        """The end: every position up to the last frame seen, silence where nothing came."""
        last = max([self.last_user, *self.model], default=-1)
        return [self._take(q) for q in range(self.next, last + 1)]


class WavStream:
    """A 16-bit PCM WAV written as it grows; sync() brings its header up to date, after the data."""

    def __init__(self, path: Path, channels: int):
        self.channels = channels
        self.data_bytes = 0
        self.file = recording_format.private_open(path, "wb")  # kept open for the whole conversation
        self.file.write(recording_format.wav_header(channels, 0))

    def write(self, samples: np.ndarray) -> None:
        data = samples.tobytes()
        self.file.write(data)
        self.data_bytes += len(data)

    def sync(self) -> None:
        # Data first: whenever the process dies, the header claims no more than the file holds.
        self.file.flush()
        self.file.seek(0)
        self.file.write(recording_format.wav_header(self.channels, self.data_bytes))
        self.file.flush()
        self.file.seek(0, 2)

    def close(self) -> None:
        try:
            self.sync()
        finally:
            self.file.close()


@dataclass
class _End:
    ended: Ended
    error: str | None
    at: datetime


class SessionWriter(threading.Thread):
    """One conversation's files, written by its own thread from a bounded queue.

    Not a daemon: when the server exits normally the interpreter waits for the files to be closed.
    """

    def __init__(self, root: Path, base_meta: dict, tokenizer: Any, max_delay: int, notify: Notify,
                 min_free_bytes: int = 0, on_low_disk: Callable[[], None] | None = None):
        self.start_at = recording_format.utc_now()
        self.root = root
        self.min_free_bytes = min_free_bytes  # below this free space the recording stops and says why
        self.on_low_disk = on_low_disk  # ...and the conversation ends: the participant is told, not left unrecorded
        self.folder = root / recording_format.folder_name(self.start_at)
        super().__init__(name=f"jmoshi recorder {self.folder.name}")
        self.meta = dict(base_meta, id=self.folder.name, start_utc=recording_format.iso(self.start_at), end_utc=None,
                         duration_s=0.0, frames=0, ended=Ended.RUNNING.value, error=None, dropped_frames=0,
                         recording_stopped=None)
        self.tokenizer = tokenizer
        self.notify = notify
        self.items: queue.Queue = queue.Queue(maxsize=QUEUE_ITEMS)
        self.aligner = Aligner(max_delay)
        self.ending = threading.Event()
        self.end_info: _End | None = None
        self.failed: str | None = None  # why recording stopped early; read by the event loop
        self.dropped = 0  # counted on the event loop, read here once the conversation has ended
        self.wavs: dict[str, WavStream] = {}
        self.journal: TextIO | None = None
        self.pieces: dict[int, str] = {}  # token id -> piece, bounded by the vocabulary

    # --- called from the event loop ---------------------------------------------------------------

    def put(self, item: UserFrame | ModelFrame) -> None:
        try:
            self.items.put_nowait(item)
        except queue.Full:
            self.dropped += 1  # the aligner fills its place with silence

    def close(self, ended: Ended, error: str | None) -> None:
        self.end_info = _End(ended, error, recording_format.utc_now())
        self.ending.set()

    def stop_recording(self, reason: str) -> None:
        if self.failed is None:
            self.failed = reason
            self.notify(f"{PREFIX}recording stopped in {self.folder}: {reason}; the conversation goes on")

    # --- the thread -------------------------------------------------------------------------------

    def run(self) -> None:
        first = self._first_item()
        if first is None:
            return  # the client sent no audio: no folder, nothing kept
        self._guarded(self._open)
        self._guarded(self._take, first)
        last_sync = time.monotonic()
        while not (self.ending.is_set() and self.items.empty()):
            try:
                item = self.items.get(timeout=0.2)
            except queue.Empty:
                item = None
            if item is not None and self.failed is None:
                self._guarded(self._take, item)
            if time.monotonic() - last_sync >= SYNC_EVERY_S:
                self._guarded(self._sync)
                self._check_space()
                last_sync = time.monotonic()
        self._guarded(self._finish)
        self._close_quietly()
        self._guarded(self._write_transcript)
        self._guarded(self._write_meta)
        if self.failed is None:
            self.notify(f"{PREFIX}saved {self.folder} ({self.meta['duration_s']:.1f} s, {self.meta['ended']})")

    def _first_item(self) -> UserFrame | ModelFrame | None:
        """The first frame, or None when the conversation ends before any."""
        while True:
            try:
                return self.items.get(timeout=0.2)
            except queue.Empty:
                if self.ending.is_set() and self.items.empty():
                    return None

    def _check_space(self) -> None:
        if self.failed is None and recording_format.below_floor(self.root, self.min_free_bytes):
            self.stop_recording(f"less than {self.min_free_bytes // MB} MB free on the disk (--min-free-mb)")
            if self.on_low_disk is not None:
                self.on_low_disk()

    def _guarded(self, step: Callable, *args) -> None:
        # After a failure only the closing steps are tried: what was written should still be usable.
        if self.failed is not None and step not in (self._write_meta, self._write_transcript):
            return
        try:
            step(*args)
        except OSError as exc:
            self.stop_recording(f"{exc.strerror or exc}")
            self._close_quietly()

    def _open(self) -> None:
        for _ in range(5):
            try:
                recording_format.private_folder(self.folder)
                break
            except FileExistsError:
                self.folder = self.folder.parent / recording_format.folder_name(self.start_at)
        self.meta["id"] = self.folder.name
        self._write_meta()
        recording_format.write_transcript(self.folder)  # an empty one: every file is there from the start
        self.journal = recording_format.private_open(self.folder / recording_format.TEXT_JOURNAL, "w", "utf-8")
        for name, channels in recording_format.WAV_CHANNELS.items():
            self.wavs[name] = WavStream(self.folder / name, channels)

    def _take(self, item: UserFrame | ModelFrame) -> None:
        if isinstance(item, UserFrame):
            columns = self.aligner.add_user(item.frame, item.pcm)
        else:
            self._text(item.position, item.text_id)
            columns = self.aligner.add_model(item.position, item.pcm)
        self._write(columns)

    def _text(self, position: int, text_id: int) -> None:
        if text_id in SKIPPED_TEXT_IDS:  # never sent by the server either
            return
        assert self.journal is not None  # opened by _open; after a failure (journal closed) nothing is taken
        self.journal.write(recording_format.piece_line(position, text_id, self._piece(text_id)))

    def _piece(self, text_id: int) -> str:
        piece = self.pieces.get(text_id)
        if piece is None:
            piece = self.pieces[text_id] = self.tokenizer.id_to_piece(text_id)
        return piece

    def _write(self, columns: list[Column]) -> None:
        silence = np.zeros(FRAME_SIZE, dtype="<i2")
        for column in columns:
            user = silence if column.user is None else to_pcm16(column.user)
            model = silence if column.model is None else to_pcm16(column.model)
            self.wavs[recording_format.USER].write(user)
            self.wavs[recording_format.JMOSHI].write(model)
            self.wavs[recording_format.DIALOGUE].write(np.stack([user, model], axis=1))
        self.meta["frames"] += len(columns)

    def _sync(self) -> None:
        for wav in self.wavs.values():
            wav.sync()
        if self.journal is not None:
            self.journal.flush()

    def _finish(self) -> None:
        self._write(self.aligner.flush())
        wavs, self.wavs = self.wavs, {}
        for wav in wavs.values():
            wav.close()

    def _close_quietly(self) -> None:
        files: list = [*self.wavs.values(), *([self.journal] if self.journal is not None else [])]
        self.wavs, self.journal = {}, None
        for file in files:
            try:
                file.close()
            except OSError:
                pass  # the disk refused the rest too; the header still claims only what was written

    def _write_transcript(self) -> None:
        if (self.folder / recording_format.TEXT_JOURNAL).exists():
            recording_format.write_transcript(self.folder)

    def _write_meta(self) -> None:
        end = self.end_info
        if end is not None and self.ending.is_set():
            self.meta.update(ended=end.ended.value, error=end.error, end_utc=recording_format.iso(end.at))
        self.meta.update(duration_s=round(self.meta["frames"] * FRAME_S, 3), dropped_frames=self.dropped,
                         recording_stopped=self.failed)
        recording_format.write_json(self.folder / recording_format.META, self.meta)
