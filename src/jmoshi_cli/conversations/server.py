"""jmoshi's conversation server: moshi.server's /api/chat and web UI over an engine's slots.

One process; the engine runs on one model thread, the event loop does the network. Each connection
waits for a free slot (silent, as on moshi.server), then gets a fresh slot state, the handshake byte,
and per 80 ms frame of its audio J-Moshi's voice (0x01, Opus) and text (0x02, joined by
transcript.PieceJoiner). Several conversations talk at once when the engine has several slots; their
frames are stepped together (ticks.py). The HTTP seam (serving/gate.py: token, origin, consent,
waiting line, limits) and the recorder (recording/tap.py) are the same as on the torch child.

Console lines are moshi.server's (``[Info] accepted connection``, ``[Info] frame handled in N.Nms``
once per tick, ``[Info] connection closed``, ``[Info] done with connection``), so that
serving/server_log.py reads both the same way.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..audio_io import FRAME_SIZE, SAMPLE_RATE
from ..backends.contract import ChildContract
from ..engine.base import Engine, Said
from ..serving.visits import CLIENT_LEFT
from .ticks import Tick, Ticker

SHUTDOWN_S = 3.0  # asked to stop, how long the server waits for its handlers after hanging up (jmoshi waits 10 s)


def say(level: str, message: str) -> None:
    """One console line as moshi.server writes it (client_utils.make_log), without the colours."""
    prefix = {"info": "[Info]", "warning": "[Warn]", "error": "[Err ]"}[level]
    sys.stdout.write(f"{prefix} {message}\n")  # one write: a line stays whole between threads
    sys.stdout.flush()


def notify(line: str) -> None:
    """One of jmoshi's own lines (the recorder's, the gate's), as they are on the torch child: no level prefix."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


@dataclass(frozen=True)
class Site:
    host: str
    port: int
    static: str | None  # the web UI folder
    ssl: Path | None  # a folder with cert.pem and key.pem


class ChatServer:
    def __init__(self, engine: Engine, ticker: Ticker, recorder: Any = None):
        from ..serving.visits import Listener

        self.engine, self.ticker = engine, ticker
        # The gate's view of each conversation (visits.py), then the recorder when asked for.
        self.listeners = [Listener(), *([recorder] if recorder is not None else [])]
        self.free = asyncio.Semaphore(engine.slots)
        self.open: set = set()  # the websockets of the talking and the waiting conversations
        self.talking = 0

    async def handle_chat(self, request: Any) -> Any:
        from aiohttp import web

        from ..serving.visits import adopt

        ws = adopt(web.WebSocketResponse())
        await ws.prepare(request)
        say("info", "accepted connection")
        self.open.add(ws)
        try:
            self._tell_waiting()
            async with self.free:
                if not ws.closed:
                    self.talking += 1
                    try:
                        await self.converse(ws)
                    finally:
                        self.talking -= 1
        finally:
            self.open.discard(ws)
        say("info", "done with connection")
        return ws

    def _tell_waiting(self) -> None:
        waiting = len(self.open) - self.talking
        if self.engine.slots > 1 and waiting > 0 and self.free.locked():
            notify(f"jmoshi: {self.talking} conversations talking, {waiting} waiting for a slot")

    async def close_all(self) -> None:
        """Hang up on every browser: asked to stop, the server does not wait for conversations to end."""
        from aiohttp import WSCloseCode

        for ws in list(self.open):
            await ws.close(code=WSCloseCode.GOING_AWAY, message=b"server stopping")

    async def converse(self, ws: Any) -> None:
        import sphn

        from ..serving import visits

        slot = await self.ticker.open()
        visit = visits.current()
        if visit is not None:
            visit.slot = slot
        for listener in self.listeners:  # in the request's task: the recorder knows which conversation
            listener.conversation_starts()
        try:
            await ws.send_bytes(b"\x00")
            conversation = _Conversation(ws, slot, sphn.OpusStreamWriter(SAMPLE_RATE), self.engine.facts.tokenizer,
                                         self.listeners, self.ticker)
            async for pcm in _user_audio(ws, sphn.OpusStreamReader(SAMPLE_RATE)):
                if not await conversation.feed(pcm):
                    break
        except CLIENT_LEFT:  # the browser left while the server was sending
            pass
        finally:
            await self.ticker.close(slot)
            say("info", "connection closed")


async def _user_audio(ws: Any, reader: Any):
    """The user's PCM as it arrives (moshi.server's receive loop: Opus pages in 0x01 messages)."""
    import aiohttp

    async for message in ws:
        if message.type == aiohttp.WSMsgType.ERROR:
            say("error", f"{ws.exception()}")
            return
        if message.type != aiohttp.WSMsgType.BINARY:
            say("error", f"unexpected message type {message.type}")
            continue
        data = message.data
        if not data:
            say("warning", "empty message")
            continue
        if data[0] != 1:
            say("warning", f"unknown message kind {data[0]}")
            continue
        pcm = reader.append_bytes(data[1:])
        if pcm.shape[-1]:
            yield pcm


class _Conversation:
    """Cuts the user's audio into 80 ms frames, has each stepped in its slot, sends what comes out."""

    def __init__(self, ws: Any, slot: int, writer: Any, tokenizer: Any, listeners: list, ticker: Ticker):
        from ..transcript import SKIPPED_TEXT_IDS, PieceJoiner

        self.ws, self.slot, self.writer, self.tokenizer = ws, slot, writer, tokenizer
        self.listeners, self.ticker = listeners, ticker
        self.joiner = PieceJoiner()
        self.skipped = SKIPPED_TEXT_IDS
        self.pending: Any = np.zeros(0, dtype=np.float32)  # the user's samples not yet a whole frame

    async def feed(self, pcm: np.ndarray) -> bool:
        """Handle every whole frame; False once the browser has gone (nothing more can be sent)."""
        self.pending = np.concatenate((self.pending, np.asarray(pcm, dtype=np.float32).reshape(-1)))
        while self.pending.shape[-1] >= FRAME_SIZE:
            chunk, self.pending = self.pending[:FRAME_SIZE], self.pending[FRAME_SIZE:]
            said = await self.ticker.step(self.slot, chunk)
            self._tell(chunk, said)
            try:
                await self._send(said)
            except CLIENT_LEFT:  # the browser left (aiohttp: "Cannot write to closing transport", or EPIPE)
                return False
        return True

    def _tell(self, heard: np.ndarray, said: Said) -> None:
        """The recorder's view of one frame, as the torch tap gives it: heard, stepped, then said."""
        tokens = None if said.pcm is None else np.full((1, 1, 1), said.text_id)
        for listener in self.listeners:
            listener.heard(heard)
            listener.stepped(tokens)
            if said.pcm is not None:
                listener.said(said.pcm)

    async def _send(self, said: Said) -> None:
        """The frame's text piece first, then its voice (as moshi.server 0.2.2 does; 0.2.13 sends the voice
        first): a client that has heard a frame's voice has its words too, so one that hangs up once it has
        heard every frame has read every word."""
        text = self._text(said.text_id)
        if text:
            say("info", f"text token '{text}'")
            await self.ws.send_bytes(b"\x02" + text.encode("utf-8"))
        if said.pcm is not None:
            opus = self.writer.append_pcm(said.pcm)
            if len(opus) > 0:
                await self.ws.send_bytes(b"\x01" + opus)

    def _text(self, text_id: int | None) -> str:
        if text_id is None or text_id in self.skipped or not 0 <= text_id < self.tokenizer.get_piece_size() \
                or self.tokenizer.is_control(text_id):
            return ""
        return self.joiner.feed(self.tokenizer.id_to_piece(text_id))


def make_app(chat: ChatServer, static: str | None, contract: ChildContract) -> Any:
    from aiohttp import web

    from ..serving import gate

    app = web.Application()
    gate.install(app, contract.access, contract.limits, notify, slots=chat.engine.slots)
    app.router.add_get("/api/chat", chat.handle_chat)
    if static is not None:
        index = os.path.join(static, "index.html")

        async def handle_root(_):
            return web.FileResponse(index)

        say("info", f"serving static content from {static}")
        app.router.add_get("/", handle_root)
        app.router.add_static("/", path=static, follow_symlinks=True, name="static")
    return app


def ssl_context(folder: Path | None) -> Any:
    if folder is None:
        return None
    import ssl

    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(certfile=str(folder / "cert.pem"), keyfile=str(folder / "key.pem"))
    return context


def recorder_for(contract: ChildContract) -> Any:
    """`serve --record` (and --seed, for meta.json): the torch child's recorder; the engine seeds itself."""
    from ..recording.tap import Recorder, Settings

    settings = Settings.from_contract(contract)
    return Recorder(settings, notify, seeds=False) if settings.wanted else None


def _model_facts(engine: Engine) -> Any:
    from ..recording.tap import ModelFacts

    facts = engine.facts
    return ModelFacts(facts.tokenizer, facts.max_delay, dict(facts.sampling), facts.device, facts.dtype)


def _frame_line(tick: Tick) -> None:
    say("info", f"frame handled in {tick.step_ms:.1f}ms")


async def serve(site: Site, engine: Engine, pool: Any, contract: ChildContract) -> None:
    from aiohttp import web

    recorder = recorder_for(contract)
    ticker = Ticker(engine, pool, _frame_line)
    chat = ChatServer(engine, ticker, recorder)
    app = make_app(chat, site.static, contract)
    if recorder is not None:
        recorder.attach(app, _model_facts(engine), engine.facts.runtime)
    runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=SHUTDOWN_S)
    await runner.setup()
    context = ssl_context(site.ssl)
    await web.TCPSite(runner, site.host, site.port, ssl_context=context).start()
    ticker.start()
    scheme = "https" if context else "http"
    say("info", f"Access the Web UI directly at {scheme}://{site.host}:{site.port}")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    say("info", "stopping")
    await chat.close_all()
    await runner.cleanup()
    await ticker.stop()
