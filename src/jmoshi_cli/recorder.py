"""`serve --record` and `serve --seed` inside the server's process: a tap on moshi.server's model calls.

The bootstrap (:mod:`jmoshi_cli._moshi_entry`) calls :func:`install` before moshi.server runs.

Where it taps. moshi.server (0.2.2, and 0.2.12+ which moved to the sphn 0.2 API) handles a
conversation in ``ServerState.handle_chat``: under a lock it resets Mimi and the generator
(``lm_gen.reset_streaming()``) and sends the handshake; then for each 80 ms frame of the user's
audio it calls ``mimi.encode(frame)`` and ``lm_gen.step(codes)``, and when the step returns tokens
``mimi.decode(audio tokens)`` (J-Moshi's voice) and sends the text token's piece. When moshi.server
calls ``web.run_app``, the tap finds that ``ServerState`` through the /api/chat route and wraps its
``mimi`` and ``lm_gen`` in thin proxies (:class:`TappedMimi`, :class:`TappedLMGen`); an aiohttp
middleware around /api/chat tells which conversation the calls belong to and how it ended, and a
SIGTERM/SIGINT handler (see :meth:`Recorder.on_startup`) closes the recording when the server is
asked to stop. Nothing here touches the
Opus reader and writer, the part of the server that differs between sphn 0.1 and 0.2: the tap sees
PCM exactly as the model consumed and produced it, whatever carried it over the network.

Alignment. The server consumes the user's audio in whole frames and makes one generator step per
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
headers lag by at most a second and a journal, which jmoshi's :func:`jmoshi_cli.recordings.settle`
then turns into complete files.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import json
import queue
import random
import signal
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Mapping, TextIO

import numpy as np

from . import recordings
from .audio_io import FRAME_S, FRAME_SIZE, SAMPLE_RATE, to_pcm16
from .recordings import Ended
from .transcript import SKIPPED_TEXT_IDS

CHAT_PATH = "/api/chat"
UPSTREAM_SEED = 42424242  # what moshi.server seeds at start
SAMPLING_KEYS = ("temp", "temp_text", "top_k", "top_k_text")
QUEUE_ITEMS = 256  # two items per frame: ~10 s of audio, ~2 MB, before frames are dropped
SYNC_EVERY_S = 1.0  # WAV headers and the text journal brought up to date
SHUTDOWN_WAIT_S = 5.0  # on SIGTERM, how long the server waits for its writers (jmoshi waits 10 s)
PREFIX = "jmoshi recorder: "

Notify = Callable[[str], None]

# The conversation whose request is being handled: set by the middleware in the request's task, read
# when the handler resets the generator (it then holds the server's lock, so it is the one talking).
CURRENT: contextvars.ContextVar[Conversation | None] = contextvars.ContextVar("jmoshi_conversation", default=None)


@dataclass(frozen=True)
class Settings:
    """What jmoshi (the parent) asked for, from the child's environment."""

    record_dir: Path | None = None
    facts: dict = field(default_factory=dict)  # variant, repo, revision, commit...: what only jmoshi knows
    seed: int | None = None
    sampling: dict = field(default_factory=dict)  # the values jmoshi put in the LM config's lm_gen_config
    replica: str | None = None

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Settings:
        record = json.loads(env["JMOSHI_RECORD"]) if env.get("JMOSHI_RECORD") else {}
        directory = record.pop("dir", None)
        seed = env.get("JMOSHI_SEED")
        sampling = json.loads(env["JMOSHI_SAMPLING"]) if env.get("JMOSHI_SAMPLING") else {}
        return cls(Path(directory) if directory else None, record, int(seed) if seed else None, sampling,
                   env.get("JMOSHI_REPLICA") or None)

    @property
    def wanted(self) -> bool:
        return self.record_dir is not None or self.seed is not None or bool(self.sampling)


def install(settings: Settings, notify: Notify) -> None:
    """Arrange the seed and the tap; moshi.server runs after this, unchanged otherwise."""
    if settings.seed is not None:
        _seed_at_start(settings.seed)
    if settings.wanted:
        _attach_at_run_app(Recorder(settings, notify))


def seed_all(seed: int) -> None:
    """Seed like moshi.server's own seed_all: torch (and CUDA), random, numpy."""
    import torch

    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)
    random.seed(seed)
    np.random.seed(seed)


def _seed_at_start(seed: int) -> None:
    """Seed with `seed` where moshi.server seeds 42424242.

    The server seeds, then reads the checkpoint; nothing draws a random number in between, so
    seeding again on the way into CheckpointInfo.from_hf_repo replaces its seed.
    """
    from moshi.models import loaders

    from_hf_repo = loaders.CheckpointInfo.from_hf_repo

    @functools.wraps(from_hf_repo)
    def seeded(*args, **kwargs):
        seed_all(seed)
        return from_hf_repo(*args, **kwargs)

    loaders.CheckpointInfo.from_hf_repo = staticmethod(seeded)


def _attach_at_run_app(recorder: Recorder) -> None:
    from aiohttp import web

    run_app = web.run_app

    @functools.wraps(run_app)
    def run_app_recording(app, *args, **kwargs):
        recorder.attach(app)
        return run_app(app, *args, **kwargs)

    web.run_app = run_app_recording


def _server_state(app) -> Any:
    """The ServerState whose handle_chat serves /api/chat (the route holds its bound method)."""
    for route in app.router.routes():
        resource = route.resource
        if route.method == "GET" and resource is not None and resource.canonical == CHAT_PATH:
            state = getattr(route.handler, "__self__", None)
            if all(hasattr(state, name) for name in ("mimi", "lm_gen", "text_tokenizer")):
                return state
    raise RuntimeError(f"jmoshi: this moshi.server has no {CHAT_PATH} handler with mimi, lm_gen and "
                       "text_tokenizer; --record and --seed cannot attach to it")


def _cpu_copy(tensor) -> np.ndarray:
    """A frame's samples as float32 on the host, copied (a GPU or graph buffer gets reused)."""
    import torch

    return tensor.detach().to(device="cpu", dtype=torch.float32, copy=True).numpy().reshape(-1)


def _precision(lm, parameter) -> str | None:
    """The LM's dtype, and whether its Linear weights are int8 (moshi's QLinear: `serve --quantize int8`)."""
    if parameter is None:
        return None
    dtype = str(parameter.dtype).removeprefix("torch.")
    from moshi.utils import quantize

    qlinear = getattr(quantize, "QLinear", None)  # moshi 0.2.13; 0.2.2 has another int8 scheme, unused
    if qlinear is not None and any(isinstance(module, qlinear) for module in lm.modules()):
        return f"int8 weights (bitsandbytes), {dtype} elsewhere"
    return dtype


def _runtime() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in ("moshi", "torch", "sphn", "aiohttp", "jmoshi"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = None
    return found


# --- the tap on the event loop ---------------------------------------------------------------------


class _Proxy:
    """Forwards everything to the wrapped object except the calls a subclass taps."""

    def __init__(self, inner: Any, recorder: Recorder):
        self._inner = inner
        self._recorder = recorder

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


class TappedMimi(_Proxy):
    def encode(self, x, *args, **kwargs):
        self._recorder.heard(x)
        return self._inner.encode(x, *args, **kwargs)

    def decode(self, codes, *args, **kwargs):
        pcm = self._inner.decode(codes, *args, **kwargs)
        self._recorder.said(pcm)
        return pcm


class TappedLMGen(_Proxy):
    def step(self, *args, **kwargs):
        tokens = self._inner.step(*args, **kwargs)
        self._recorder.stepped(tokens)
        return tokens

    def reset_streaming(self, *args, **kwargs):
        done = self._inner.reset_streaming(*args, **kwargs)
        self._recorder.conversation_starts()
        return done


class Recorder:
    """The process's tap: knows the server, the conversation being recorded, and every writer."""

    def __init__(self, settings: Settings, notify: Notify):
        self.settings = settings
        self.notify = notify
        self.active: Conversation | None = None
        self.writers: list[SessionWriter] = []
        self.base_meta: dict = {}
        self.tokenizer: Any = None
        self.max_delay = 1

    def attach(self, app) -> None:
        from aiohttp import web

        state = _server_state(app)
        self.tokenizer = state.text_tokenizer
        self.max_delay = int(getattr(state.lm_gen, "max_delay", 1))
        sampling = {key: getattr(state.lm_gen, key, None) for key in SAMPLING_KEYS}
        self.base_meta = self._base_meta(state, sampling)
        state.mimi = TappedMimi(state.mimi, self)
        state.lm_gen = TappedLMGen(state.lm_gen, self)

        @web.middleware
        async def record_chat(request, handler):
            if request.path != CHAT_PATH:
                return await handler(request)
            return await self.around_chat(request, handler)

        app.middlewares.append(record_chat)
        app.on_startup.append(self.on_startup)
        app.on_shutdown.append(self.on_shutdown)
        self._announce(sampling)

    def _base_meta(self, state, sampling: dict) -> dict:
        parameter = next(iter(state.lm_gen.lm_model.parameters()), None)
        settings = self.settings
        return {"format": recordings.FORMAT, **settings.facts, "replica": settings.replica, "runtime": _runtime(),
                "device": str(parameter.device) if parameter is not None else None,
                "precision": _precision(state.lm_gen.lm_model, parameter),
                "sampling": sampling, "seed": UPSTREAM_SEED if settings.seed is None else settings.seed,
                "seeded": "at server start" if settings.seed is None else "at the start of each conversation",
                "sample_rate": SAMPLE_RATE, "frame_s": FRAME_S, "alignment": recordings.ALIGNMENT,
                "server": recordings.server_identity()}

    def _announce(self, sampling: dict) -> None:
        settings = self.settings
        seed = (f"seed {UPSTREAM_SEED} at server start" if settings.seed is None
                else f"seed {settings.seed} at the start of each conversation")
        values = ", ".join(f"{key} {value}" for key, value in sampling.items())
        self.notify(f"jmoshi: the generator samples with {values}; {seed}")
        for key, asked in settings.sampling.items():
            if sampling.get(key) != asked:
                self.notify(f"jmoshi: warning: {key} {asked} was asked for but the generator uses {sampling.get(key)}")

    # --- one conversation: the middleware sees it from the request to the end -------------------

    async def around_chat(self, request, handler):
        conversation = Conversation()
        token = CURRENT.set(conversation)
        ended, error = Ended.HANG_UP, None
        try:
            return await handler(request)
        except asyncio.CancelledError:
            ended = Ended.SERVER_STOP
            raise
        except ConnectionResetError:
            raise  # the client left while the server was sending: a hang-up
        except Exception as exc:
            ended, error = Ended.ERROR, f"{type(exc).__name__}: {exc}"
            raise
        finally:
            CURRENT.reset(token)
            self.end(conversation, ended, error)

    def conversation_starts(self) -> None:
        """The handler reset the generator under the server's lock: its conversation begins."""
        if self.settings.seed is not None:
            seed_all(self.settings.seed)
        conversation = CURRENT.get()
        if conversation is None or self.settings.record_dir is None:
            return
        self.writers = [w for w in self.writers if w.is_alive()]
        writer = SessionWriter(self.settings.record_dir, self.base_meta, self.tokenizer, self.max_delay, self.notify)
        try:
            conversation.start(writer, self.max_delay)
        except RuntimeError as exc:  # no thread to be had: talk without recording rather than not at all
            self.notify(f"{PREFIX}cannot record this conversation: {exc}")
            return
        self.writers.append(writer)
        self.active = conversation

    def end(self, conversation: Conversation, ended: Ended, error: str | None) -> None:
        conversation.end(ended, error)
        if self.active is conversation:
            self.active = None

    async def on_startup(self, _app) -> None:
        """Close the recording as soon as SIGTERM/SIGINT arrives, even when the event loop is busy.

        aiohttp stops on these signals through the event loop, which a server slower than real time
        may not reach for a long while: moshi 0.2.12+ handles every frame already received before it
        awaits anything, and jmoshi sends SIGKILL 10 s after SIGTERM. A Python-level handler runs in
        the main thread between two bytecodes instead. The loop still learns of the signal: asyncio
        reads it from the wakeup fd, whichever Python handler is installed. aiohttp sets up its
        handlers before on_startup, so this one goes on top of them.
        """
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, functools.partial(self._on_stop_signal, signal.getsignal(signum)))

    def _on_stop_signal(self, previous, signum, frame) -> None:
        # No waiting here: the signal may have interrupted this thread inside the writer's queue, whose
        # lock the writer then needs. The writer closes the files on its own thread.
        self._end_active()
        if callable(previous):
            previous(signum, frame)

    async def on_shutdown(self, _app) -> None:
        """The server stops: close the recording now; aiohttp may let the handler run on for a while."""
        self._end_active()
        writers = [w for w in self.writers if w.is_alive()]
        await asyncio.get_running_loop().run_in_executor(None, _join_all, writers, SHUTDOWN_WAIT_S)

    def _end_active(self) -> None:
        active = self.active
        if active is not None:
            self.end(active, Ended.SERVER_STOP, None)

    # --- calls from the proxies, on the event loop: copy, enqueue, never wait --------------------

    def heard(self, x) -> None:
        self._forward(Conversation.heard, x)

    def stepped(self, tokens) -> None:
        self._forward(Conversation.stepped, tokens)

    def said(self, pcm) -> None:
        self._forward(Conversation.said, pcm)

    def _forward(self, method: Callable[[Conversation, Any], None], value: Any) -> None:
        conversation = self.active
        if conversation is None or not conversation.recording:
            return
        try:
            method(conversation, value)
        except Exception as exc:  # noqa: BLE001 - a fault in the tap must not end the conversation
            conversation.give_up(f"{type(exc).__name__}: {exc}")


def _join_all(writers: list[threading.Thread], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    for writer in writers:
        writer.join(max(deadline - time.monotonic(), 0.0))


class Conversation:
    """The event loop's side of one conversation: frame numbering and the hand-off to its writer."""

    def __init__(self) -> None:
        self.writer: SessionWriter | None = None
        self.max_delay = 1
        self.frames_in = 0  # user frames encoded
        self.steps = 0  # generator steps
        self.pending: tuple[int, Any] | None = None  # (position, tokens) of the last step that returned some
        self.finished = False

    @property
    def recording(self) -> bool:
        writer = self.writer
        return writer is not None and not self.finished and writer.failed is None

    def start(self, writer: SessionWriter, max_delay: int) -> None:
        self.writer, self.max_delay = writer, max_delay
        writer.start()

    def heard(self, x) -> None:
        self.writer.put(UserFrame(self.frames_in, _cpu_copy(x)))
        self.frames_in += 1

    def stepped(self, tokens) -> None:
        position = self.steps + 1 - self.max_delay
        self.steps += 1
        if tokens is not None:
            self.pending = (position, tokens)

    def said(self, pcm) -> None:
        if self.pending is None:
            return
        position, tokens = self.pending
        self.pending = None
        samples = _cpu_copy(pcm)  # on a GPU this waits for the decode, as the server's own .cpu() does
        self.writer.put(ModelFrame(position, samples, int(tokens[0, 0, 0])))

    def give_up(self, reason: str) -> None:
        if self.writer is not None:
            self.writer.stop_recording(reason)

    def end(self, ended: Ended, error: str | None) -> None:
        if self.finished:
            return
        self.finished = True
        if self.writer is not None:
            self.writer.close(ended, error)


# --- the writer thread -----------------------------------------------------------------------------


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
        out = []
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
        self.file = open(path, "wb")  # kept open for the whole conversation
        self.file.write(recordings.wav_header(channels, 0))

    def write(self, samples: np.ndarray) -> None:
        data = samples.tobytes()
        self.file.write(data)
        self.data_bytes += len(data)

    def sync(self) -> None:
        # Data first: whenever the process dies, the header claims no more than the file holds.
        self.file.flush()
        self.file.seek(0)
        self.file.write(recordings.wav_header(self.channels, self.data_bytes))
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

    def __init__(self, root: Path, base_meta: dict, tokenizer: Any, max_delay: int, notify: Notify):
        self.start_at = recordings.utc_now()
        self.folder = root / recordings.folder_name(self.start_at)
        super().__init__(name=f"jmoshi recorder {self.folder.name}")
        self.meta = dict(base_meta, id=self.folder.name, start_utc=recordings.iso(self.start_at), end_utc=None,
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
        self.end_info = _End(ended, error, recordings.utc_now())
        self.ending.set()

    def stop_recording(self, reason: str) -> None:
        if self.failed is None:
            self.failed = reason
            self.notify(f"{PREFIX}recording stopped in {self.folder}: {reason}; the conversation goes on")

    # --- the thread -------------------------------------------------------------------------------

    def run(self) -> None:
        self._guarded(self._open)
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
                last_sync = time.monotonic()
        self._guarded(self._finish)
        self._close_quietly()
        self._guarded(self._write_transcript)
        self._guarded(self._write_meta)
        if self.failed is None:
            self.notify(f"{PREFIX}saved {self.folder} ({self.meta['duration_s']:.1f} s, {self.meta['ended']})")

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
                self.folder.mkdir()
                break
            except FileExistsError:
                self.folder = self.folder.parent / recordings.folder_name(self.start_at)
        self.meta["id"] = self.folder.name
        self._write_meta()
        recordings.write_transcript(self.folder)  # an empty one: every file is there from the start
        self.journal = open(self.folder / recordings.TEXT_JOURNAL, "w", encoding="utf-8")
        for name, channels in recordings.WAV_CHANNELS.items():
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
        self.journal.write(recordings.piece_line(position, text_id, self._piece(text_id)))

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
            self.wavs[recordings.USER].write(user)
            self.wavs[recordings.JMOSHI].write(model)
            self.wavs[recordings.DIALOGUE].write(np.stack([user, model], axis=1))
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
        if (self.folder / recordings.TEXT_JOURNAL).exists():
            recordings.write_transcript(self.folder)

    def _write_meta(self) -> None:
        end = self.end_info
        if end is not None and self.ending.is_set():
            self.meta.update(ended=end.ended.value, error=end.error, end_utc=recordings.iso(end.at))
        self.meta.update(duration_s=round(self.meta["frames"] * FRAME_S, 3), dropped_frames=self.dropped,
                         recording_stopped=self.failed)
        recordings.write_json(self.folder / recordings.META, self.meta)
