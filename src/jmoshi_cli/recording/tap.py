"""`serve --record` and `serve --seed` inside the server's process: the listener of the conversation tap.

The bootstrap attaches a :class:`Recorder` to moshi.server's app (upstream/moshi_server.py finds the
``ServerState`` and wraps its model objects; this module only listens). An aiohttp middleware around
/api/chat tells which conversation the calls belong to and how it ended, and a SIGTERM/SIGINT handler
(see :meth:`Recorder.on_startup`) closes the recording when the server is asked to stop. Nothing
here touches the Opus reader and writer, the part of the server that differs between sphn 0.1 and
0.2: the tap sees PCM exactly as the model consumed and produced it, whatever carried it.
The files themselves are written by :mod:`.writer`, off the event loop.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from ..audio_io import FRAME_S, SAMPLE_RATE
from ..backends.contract import ChildContract
from ..sampling import UPSTREAM_SEED, seed_all
from . import format as recording_format
from .format import Ended
from .writer import PREFIX, ModelFrame, Notify, SessionWriter, UserFrame

SHUTDOWN_WAIT_S = 5.0  # on SIGTERM, how long the server waits for its writers (jmoshi waits 10 s)


# The conversation whose request is being handled: set by the middleware in the request's task, read
# by the calls the model side makes from that task (several conversations may talk at once).
CURRENT: contextvars.ContextVar[Conversation | None] = contextvars.ContextVar("jmoshi_conversation", default=None)


@dataclass(frozen=True)
class ModelFacts:
    """What the recorder needs of the running model, from whichever backend runs it."""

    tokenizer: Any  # sentencepiece: the transcript's pieces
    max_delay: int  # the generator's delay, in frames (alignment)
    sampling: dict  # the generator's sampling as it runs
    device: str | None = None
    dtype: str | None = None  # the compute dtype (float32, bfloat16...)


@dataclass(frozen=True)
class Settings:
    """What jmoshi (the parent) asked for, from the child's contract."""

    record_dir: Path | None = None
    facts: dict = field(default_factory=dict)  # variant, repo, revision, commit, precision...: what only jmoshi knows
    seed: int | None = None
    sampling: dict = field(default_factory=dict)  # the values jmoshi put in the LM config's lm_gen_config
    replica: str | None = None
    min_free_mb: int = 0  # below this free space no recording starts, and a running one stops
    consent: bool = False  # browsers agreed on the consent page before talking (gate.py)

    @classmethod
    def from_contract(cls, contract: ChildContract) -> Settings:
        facts = dict(contract.record.facts) if contract.record is not None else {}
        return cls(contract.record_dir, facts, contract.seed, dict(contract.sampling), contract.replica,
                   contract.limits.min_free_mb, contract.access.consent is not None)

    @property
    def min_free_bytes(self) -> int:
        return self.min_free_mb * 1024 * 1024

    @property
    def wanted(self) -> bool:
        return self.record_dir is not None or self.seed is not None or bool(self.sampling)


def _cpu_copy(frame) -> np.ndarray:
    """A frame's samples as float32 on the host, copied (a GPU or graph buffer gets reused)."""
    if hasattr(frame, "detach"):  # a torch tensor
        import torch

        return frame.detach().to(device="cpu", dtype=torch.float32, copy=True).numpy().reshape(-1)
    return np.array(frame, dtype=np.float32).reshape(-1)


def _runtime() -> dict:
    from ..runtime import versions

    return versions(("moshi", "torch", "sphn", "aiohttp", "jmoshi"))


class Recorder:
    """The process's tap: knows the server, the conversation being recorded, and every writer."""

    def __init__(self, settings: Settings, notify: Notify, seeds: bool = True):
        self.settings = settings
        self.notify = notify
        self.seeds = seeds  # seed torch at each conversation's start (--seed); a backend that seeds itself: False
        self.active: set[Conversation] = set()  # recording now
        self.writers: list[SessionWriter] = []
        self.base_meta: dict = {}
        self.tokenizer: Any = None
        self.max_delay = 1

    def attach(self, app, model: ModelFacts, runtime: dict | None = None) -> None:
        """Listen to the app's conversations; the calls come from the tap on the model (heard, stepped...)."""
        from aiohttp import web

        self.tokenizer = model.tokenizer
        self.max_delay = model.max_delay
        self.base_meta = self._base_meta(model, runtime if runtime is not None else _runtime())

        @web.middleware
        async def record_chat(request, handler):
            if request.path != "/api/chat":
                return await handler(request)
            return await self.around_chat(request, handler)

        app.middlewares.append(record_chat)
        app.on_startup.append(self.on_startup)
        app.on_shutdown.append(self.on_shutdown)
        self._announce(model.sampling)

    def _base_meta(self, model: ModelFacts, runtime: dict) -> dict:
        settings = self.settings
        return {"format": recording_format.FORMAT, **settings.facts, "replica": settings.replica, "runtime": runtime,
                "device": model.device, "dtype": model.dtype,
                "sampling": model.sampling, "seed": UPSTREAM_SEED if settings.seed is None else settings.seed,
                "seeded": "at server start" if settings.seed is None else "at the start of each conversation",
                "sample_rate": SAMPLE_RATE, "frame_s": FRAME_S, "alignment": recording_format.ALIGNMENT,
                "server": recording_format.server_identity()}

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
        if self._disk_low():
            from ..serving import gate, pages

            self.notify(f"{PREFIX}a conversation was turned away: less than {self.settings.min_free_mb} MB free in "
                        f"{self.settings.record_dir} (--min-free-mb)")
            return gate.html_response(503, pages.DISK_FULL, **{"Retry-After": "300"})
        from ..serving.visits import CLIENT_LEFT

        conversation = Conversation()
        token = CURRENT.set(conversation)
        ended, error = Ended.HANG_UP, None
        try:
            return await handler(request)
        except asyncio.CancelledError:
            ended = Ended.SERVER_STOP
            raise
        except CLIENT_LEFT:
            raise  # the client left while the server was sending: a hang-up
        except Exception as exc:
            ended, error = Ended.ERROR, f"{type(exc).__name__}: {exc}"
            raise
        finally:
            CURRENT.reset(token)
            self.end(conversation, _ended_by_server() or ended, error)

    def _disk_low(self) -> bool:
        folder = self.settings.record_dir
        return folder is not None and recording_format.below_floor(folder, self.settings.min_free_bytes)

    def conversation_starts(self) -> None:
        """The handler reset the generator (moshi.server, under its lock) or opened a slot (jmoshi's conversation
        server), in the request's task: its conversation begins."""
        if self.seeds and self.settings.seed is not None:
            seed_all(self.settings.seed)
        conversation = CURRENT.get()
        if conversation is None or self.settings.record_dir is None:
            return
        self.writers = [w for w in self.writers if w.is_alive()]
        from ..serving import visits

        visit = visits.current()
        meta = dict(self.base_meta, consent=self._consent(visit))
        if visit is not None and visit.slot is not None:
            meta["slot"] = visit.slot  # which of the server's conversations at once this was
        writer = SessionWriter(self.settings.record_dir, meta, self.tokenizer, self.max_delay, self.notify,
                               self.settings.min_free_bytes,
                               None if visit is None else lambda: visit.end(visits.End.DISK_LOW))
        try:
            conversation.start(writer, self.max_delay)
        except RuntimeError as exc:  # no thread to be had: talk without recording rather than not at all
            self.notify(f"{PREFIX}cannot record this conversation: {exc}")
            return
        self.writers.append(writer)
        self.active.add(conversation)

    def _consent(self, visit) -> dict:
        """What meta.json says of consent: who talked, and when a browser agreed to be recorded."""
        from ..serving.visits import Client

        if visit is None:
            return {"asked": False, "client": None, "given_utc": None}
        if visit.client is Client.PROGRAM:
            return {"asked": False, "client": "program", "given_utc": None,
                    "note": "a program with the server's token (no Origin): the operator's own client"}
        return {"asked": self.settings.consent, "client": "browser", "given_utc": visit.consent_utc}

    def end(self, conversation: Conversation, ended: Ended, error: str | None) -> None:
        conversation.end(ended, error)
        self.active.discard(conversation)

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
        for active in list(self.active):
            self.end(active, Ended.SERVER_STOP, None)

    # --- calls from the proxies, on the event loop: copy, enqueue, never wait --------------------

    def heard(self, x) -> None:
        self._forward(Conversation.heard, x)

    def stepped(self, tokens) -> None:
        self._forward(Conversation.stepped, tokens)

    def said(self, pcm) -> None:
        self._forward(Conversation.said, pcm)

    def _forward(self, method: Callable[[Conversation, Any], None], value: Any) -> None:
        conversation = CURRENT.get()
        if conversation is None and len(self.active) == 1:  # a call from outside the request's context
            conversation = next(iter(self.active))
        if conversation is None or not conversation.recording:
            return
        try:
            method(conversation, value)
        except Exception as exc:  # noqa: BLE001 - a fault in the tap must not end the conversation
            conversation.give_up(f"{type(exc).__name__}: {exc}")


def _ended_by_server() -> Ended | None:
    """How the server itself ended the current conversation (gate.py's watchdog, the disk), if it did."""
    from ..serving import visits

    visit = visits.current()
    why = visit.ended if visit is not None else None
    return {visits.End.IDLE: Ended.IDLE, visits.End.TIME_LIMIT: Ended.TIME_LIMIT,
            visits.End.DISK_LOW: Ended.DISK_LOW}.get(why) if why is not None else None


def _join_all(writers: Sequence[threading.Thread], timeout_s: float) -> None:
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
        assert self.writer is not None  # the recorder forwards only while recording
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
        assert self.writer is not None  # the recorder forwards only while recording
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
