"""One /api/chat request from its arrival to its end, inside a server child: who it is, whether it talks
yet, when it last sent audio, and why it ended. The gate (gate.py) makes a `Visit` per request and
keeps it in a context variable; the model side tells it what happens through a `Listener` (the same
calls the recorder gets), and a watchdog ends a conversation that sends no audio (`Limits.idle_s`: a
browser streams even in silence, so none means a dead or idle client) or runs past `Limits.max_s`.

A dead peer that never closes (a dropped Wi-Fi link: half-open TCP) is found by the kernel's keepalive
probes, set on every chat connection, whether it talks or waits; aiohttp's websocket heartbeat would
not do for the waiting ones (it closes a connection whose handler is not reading, and a waiting one is not).
"""

from __future__ import annotations

import asyncio
import contextvars
import socket
import time
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Callable

# What writing to a client that has left raises, whichever way its socket was found closed: the peer's reset,
# a write after the peer closed (EPIPE), or aiohttp's "Cannot write to closing transport" (a
# ConnectionResetError). A hang-up, not a server error.
CLIENT_LEFT = (ConnectionResetError, BrokenPipeError, ConnectionAbortedError)
KEEPALIVE = {"TCP_KEEPIDLE": 10, "TCP_KEEPINTVL": 5, "TCP_KEEPCNT": 3}  # a dead peer is dropped within ~25 s
WATCH_S = 0.5


class Client(Enum):
    BROWSER = "browser"  # sent an Origin header (browsers always do on a websocket)
    PROGRAM = "program"  # no Origin: selftest, scripts, the operator's own tools


class End(Enum):
    """Why a conversation ended, for the console and the recording."""

    HUNG_UP = "the client hung up"
    IDLE = "no audio from the client"
    TIME_LIMIT = "the time limit (--max-minutes)"
    DISK_LOW = "the recording disk is nearly full"
    SERVER_STOP = "the server is stopping"


# Websocket close codes in the application range (4000-4999), so that a client can tell why.
CLOSE_CODES = {End.IDLE: 4001, End.TIME_LIMIT: 4002, End.DISK_LOW: 4003, End.SERVER_STOP: 1001}


@dataclass(eq=False)  # one per request: compared and hashed by identity
class Visit:
    client: Client
    consent_utc: str | None = None  # when this browser agreed to be recorded (None: not asked)
    started: float | None = None  # monotonic: the conversation began (the handshake)
    last_audio: float = 0.0
    ended: End | None = None
    slot: int | None = None  # on a server with several conversations at once: the engine's slot it talks in
    ws: Any = None  # the request's websocket, once the handler made it
    transport: Any = None  # the connection: closing once the client is gone, even while it waits
    loop: asyncio.AbstractEventLoop | None = None
    on_end: list[Callable[[End], None]] = field(default_factory=list)

    def conversation_starts(self) -> None:
        self.started = self.last_audio = time.monotonic()

    def heard(self) -> None:
        self.last_audio = time.monotonic()

    def end(self, why: End) -> None:
        """End the conversation from any thread: the websocket is closed with a code saying why."""
        if self.ended is not None:
            return
        self.ended = why
        for hook in self.on_end:
            hook(why)
        if self.loop is not None:
            self.loop.call_soon_threadsafe(lambda: asyncio.ensure_future(self._close(why)))

    async def _close(self, why: End) -> None:
        ws = self.ws
        if ws is None or ws.closed:
            return
        await ws.close(code=CLOSE_CODES.get(why, 1000), message=why.value.encode()[:120])

    @property
    def gone(self) -> bool:
        return self.transport is None or self.transport.is_closing()

    def overdue(self, now: float, idle_s: float, max_s: float | None) -> End | None:
        if self.started is None:
            return None  # waiting for the slot: not yet talking
        if now - self.last_audio > idle_s:
            return End.IDLE
        if max_s is not None and now - self.started > max_s:
            return End.TIME_LIMIT
        return None


CURRENT: contextvars.ContextVar[Visit | None] = contextvars.ContextVar("jmoshi_visit", default=None)


def current() -> Visit | None:
    return CURRENT.get()


def adopt(ws: Any) -> Any:
    """Make `ws` the current visit's websocket, so that the watchdog can close it."""
    visit = CURRENT.get()
    if visit is not None:
        visit.ws = ws
    return ws


async def watch(visit: Visit, idle_s: float, max_s: float | None) -> None:
    while visit.ended is None:
        await asyncio.sleep(WATCH_S)
        why = visit.overdue(time.monotonic(), idle_s, max_s)
        if why is not None:
            visit.end(why)


def keepalive(transport: Any) -> None:
    """Ask the kernel to probe an idle connection, so that a peer that vanished is noticed."""
    sock = transport.get_extra_info("socket") if transport is not None else None
    if sock is None:
        return
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        for name, value in KEEPALIVE.items():
            if hasattr(socket, name):  # Linux names; macOS has TCP_KEEPALIVE for the idle time
                sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, name), value)
    except OSError:
        pass  # not a TCP socket (a unix socket in tests): nothing to probe


class Listener:
    """The model's calls (the tap's, or the MLX server's) told to the current visit."""

    def conversation_starts(self) -> None:
        visit = CURRENT.get()
        if visit is not None:
            visit.conversation_starts()

    def heard(self, x: Any) -> None:
        visit = CURRENT.get()
        if visit is not None:
            visit.heard()

    def stepped(self, tokens: Any) -> None:
        pass

    def said(self, pcm: Any) -> None:
        pass
