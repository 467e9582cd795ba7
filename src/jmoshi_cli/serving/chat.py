"""A small client for moshi.server's ``/api/chat`` websocket.

Protocol (binary messages, first byte = kind):

- server -> client ``0x00``: handshake, sent once the server takes the (single) conversation;
- client -> server ``0x01`` + Ogg/Opus bytes (24 kHz mono);
- server -> client ``0x01`` + Ogg/Opus bytes, ``0x02`` + one UTF-8 text piece.

The client streams PCM in 80 ms frames (Mimi's, see :mod:`jmoshi_cli.audio_io`), optionally paced in
real time, keeps listening ``tail_s`` seconds after its last frame (the server may run slower than
real time) and closes. sphn (through opus.py) and aiohttp are imported inside the functions.
One :class:`Conversation` holds a conversation's state; :func:`chat` drives one from start to end.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import typing as tp
from dataclasses import dataclass, field

import numpy as np

from .. import audio_io
from ..audio_io import FRAME_S, FRAME_SIZE, SAMPLE_RATE
from ..errors import JMoshiError

if tp.TYPE_CHECKING:
    from ssl import SSLContext

KIND_HANDSHAKE = 0
KIND_AUDIO = 1
KIND_TEXT = 2
REFUSALS = {401: "(no valid token: pass the one in the server's URL)", 403: "(not from its own page, or no consent)",
            503: "(busy: every slot taken and the waiting line full; or it cannot record now)"}


class ChatError(JMoshiError):
    """The conversation with the server failed; ``result`` holds what was received so far."""

    def __init__(self, message: str, result: "ChatResult | None" = None):
        super().__init__(message)
        self.result = result


class ChatRefused(ChatError):
    """The server answered the websocket upgrade with an HTTP status instead (401 token, 403 origin or consent,
    503 busy)."""

    def __init__(self, message: str, status: int):
        super().__init__(message)
        self.status = status


def _shown(url: str) -> str:
    """The URL as messages show it: never with a token in its query."""
    return url.split("?", 1)[0]


@dataclass
class ChatResult:
    handshake_s: float  # seconds from connect to 0x00
    audio_samples: int  # decoded PCM samples received
    audio: np.ndarray  # concatenated decoded float32 PCM at 24 kHz
    text_pieces: list[str] = field(default_factory=list)
    messages: dict[int, int] = field(default_factory=dict)  # count per kind byte
    sent_frames: int = 0

    @property
    def text(self) -> str:
        return "".join(self.text_pieces)

    @property
    def audio_s(self) -> float:
        return self.audio_samples / SAMPLE_RATE


def prepare_pcm(pcm: tp.Any, sample_rate: int) -> np.ndarray:
    """1-D float32 PCM at 24 kHz (first channel if several), padded to whole 80 ms frames."""
    data = np.asarray(pcm)
    if data.ndim == 2:
        # (channels, samples) as sphn.read returns, or (samples, channels) as soundfile does.
        data = data[0] if data.shape[0] <= data.shape[1] else data[:, 0]
    elif data.ndim != 1:
        raise ValueError(f"pcm must be 1-D or 2-D, got shape {data.shape}")
    if np.issubdtype(data.dtype, np.integer):
        data = data.astype(np.float32) / float(np.iinfo(data.dtype).max)
    data = np.ascontiguousarray(data, dtype=np.float32)
    if sample_rate != SAMPLE_RATE:
        data = audio_io.resample(data, sample_rate, SAMPLE_RATE)
    rest = data.shape[0] % FRAME_SIZE
    if rest:
        data = np.concatenate([data, np.zeros(FRAME_SIZE - rest, dtype=np.float32)])
    return data


def _ssl_arg(ssl: SSLContext | bool | None) -> SSLContext | bool:
    # aiohttp: True = default verification, False = no verification, or an SSLContext/Fingerprint.
    return True if ssl is None else ssl


def _ends(kind: tp.Any) -> bool:
    """An aiohttp message type that ends the conversation (aiohttp is imported when a chat runs)."""
    import aiohttp

    return kind in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSING, aiohttp.WSMsgType.CLOSED,
                    aiohttp.WSMsgType.ERROR)


class Conversation:
    """One conversation over /api/chat: the handshake, the frames sent, what came back (audio decoded as
    it arrives, text pieces), and the result. :func:`chat` drives it."""

    def __init__(self, url: str, on_audio: tp.Callable[[], None] | None = None, token: str | None = None):
        from .opus import OpusStream

        self.url = url
        self.token = token  # sent as `Authorization: Bearer`, as programs do (browsers use the cookie)
        self.on_audio = on_audio
        self.opus = OpusStream(SAMPLE_RATE)
        self.received: list[np.ndarray] = []
        self.text_pieces: list[str] = []
        self.messages: dict[int, int] = {}
        self.sent_frames = 0
        self.handshake_s = float("nan")
        self.closed_early: list[str] = []  # why the server ended it before the client did

    def result(self) -> ChatResult:
        late = self.opus.drain()
        if late.shape[0]:
            self.received.append(late)
        audio = np.concatenate(self.received) if self.received else np.zeros(0, dtype=np.float32)
        return ChatResult(handshake_s=self.handshake_s, audio_samples=int(audio.shape[0]), audio=audio,
                          text_pieces=list(self.text_pieces), messages=dict(self.messages),
                          sent_frames=self.sent_frames)

    def handle(self, data: bytes) -> None:
        """One binary message from the server."""
        if not data:
            return
        kind = data[0]
        self.messages[kind] = self.messages.get(kind, 0) + 1
        if kind == KIND_AUDIO:
            samples = self.opus.decode(data[1:])
            if samples.shape[0]:
                self.received.append(samples)
            if self.on_audio is not None and self.messages[kind] == 1:
                self.on_audio()
        elif kind == KIND_TEXT:
            self.text_pieces.append(data[1:].decode("utf-8", errors="replace"))

    async def connect(self, session: tp.Any, ssl: SSLContext | bool | None, timeout_s: float) -> tp.Any:
        import aiohttp

        headers = {"Authorization": f"Bearer {self.token}"} if self.token else None
        try:
            return await asyncio.wait_for(
                session.ws_connect(self.url, ssl=_ssl_arg(ssl), max_msg_size=0, autoclose=True, headers=headers),
                timeout=timeout_s)
        except asyncio.TimeoutError as exc:
            raise ChatError(f"could not connect to {_shown(self.url)} within {timeout_s:g} s") from exc
        except aiohttp.WSServerHandshakeError as exc:
            raise ChatRefused(f"{_shown(self.url)} refused the conversation: HTTP {exc.status} "
                              f"{REFUSALS.get(exc.status, exc.message)}", exc.status) from exc
        except (aiohttp.ClientError, OSError) as exc:
            raise ChatError(f"could not connect to {_shown(self.url)}: {exc}") from exc

    async def handshake(self, ws: tp.Any, started: float, timeout_s: float,
                        on_handshake: tp.Callable[[], None] | None) -> None:
        """Until the server's 0x00 (it takes the conversation), up to `timeout_s` after `started`."""
        import aiohttp

        deadline = started + timeout_s
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ChatError(f"no handshake from {_shown(self.url)} within {timeout_s:g} s "
                                "(is another conversation holding the server?)", self.result())
            try:
                msg = await ws.receive(timeout=remaining)
            except asyncio.TimeoutError:
                continue
            if msg.type == aiohttp.WSMsgType.BINARY:
                self.handle(msg.data)
                if msg.data[:1] == bytes([KIND_HANDSHAKE]):
                    self.handshake_s = time.monotonic() - started
                    if on_handshake is not None:
                        on_handshake()
                    return
            elif _ends(msg.type):
                raise ChatError(f"connection closed before the handshake ({msg.type.name}, "
                                f"{ws.exception() or msg.extra})", self.result())
            # text/ping messages before the handshake are ignored

    async def receive(self, ws: tp.Any, done: asyncio.Event) -> None:
        """Everything the server sends, until it closes (early, unless `done` is set)."""
        import aiohttp

        while True:
            msg = await ws.receive()
            if msg.type == aiohttp.WSMsgType.BINARY:
                self.handle(msg.data)
            elif _ends(msg.type):
                if not done.is_set():
                    self.closed_early.append(f"{msg.type.name} {ws.exception() or msg.extra or ''}".strip())
                return

    async def send(self, ws: tp.Any, frames: np.ndarray, realtime: bool) -> None:
        """Every 80 ms frame as Ogg/Opus, paced in real time if asked; then what the Ogg writer still holds."""
        start = time.monotonic()
        for i in range(frames.shape[0] // FRAME_SIZE):
            if self.closed_early:
                return
            if realtime:
                delay = start + i * FRAME_S - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
            payload = self.opus.encode(frames[i * FRAME_SIZE:(i + 1) * FRAME_SIZE])
            if len(payload) > 0:
                await ws.send_bytes(b"\x01" + payload)
            self.sent_frames += 1
            if not realtime:
                await asyncio.sleep(0)
        payload = self.opus.flush()
        if len(payload) > 0:
            await ws.send_bytes(b"\x01" + payload)

    async def exchange(self, ws: tp.Any, frames: np.ndarray, realtime: bool, tail_s: float,
                       until: tp.Callable[[ChatResult], bool] | None) -> None:
        """Send every frame while receiving, then listen (see :func:`chat`); ChatError if the server ended it."""
        import aiohttp

        done = asyncio.Event()
        recv_task = asyncio.create_task(self.receive(ws, done))
        try:
            try:
                await self.send(ws, frames, realtime)
            except (ConnectionError, aiohttp.ClientError) as exc:
                if not self.closed_early:
                    self.closed_early.append(f"send failed: {exc}")
            if not self.closed_early:
                await _listen(recv_task, tail_s, None if until is None else lambda: until(self.result()))
        finally:
            done.set()
            if not recv_task.done():
                recv_task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await recv_task
        if self.closed_early:
            raise ChatError(f"server closed the connection early after {self.sent_frames}/"
                            f"{frames.shape[0] // FRAME_SIZE} frames ({self.closed_early[0]})", self.result())


async def chat(
    url: str,
    pcm: np.ndarray,
    *,
    sample_rate: int = SAMPLE_RATE,
    realtime: bool = True,
    tail_s: float = 3.0,
    timeout_s: float = 60.0,
    ssl: SSLContext | bool | None = None,
    until: tp.Callable[[ChatResult], bool] | None = None,
    on_handshake: tp.Callable[[], None] | None = None,
    on_audio: tp.Callable[[], None] | None = None,
    token: str | None = None,
) -> ChatResult:
    """Talk to a moshi.server at ``url`` (ws:// or wss://.../api/chat) with ``pcm``; ``token``: the server's
    access token (it may also ride in ``url`` as ``?token=``).

    After the last frame the client listens up to ``tail_s`` seconds, or, with ``until``, until
    ``until(what came back so far)`` holds within those seconds: a server slower than real time is
    waited for, a fast one is not. ``on_handshake`` is called when the server takes the
    conversation, ``on_audio`` once, when J-Moshi's voice first arrives.

    ``ssl``: None for default certificate checks, False to skip them (self-signed test
    certificates), or an ``ssl.SSLContext``. ``timeout_s`` bounds the connection and the wait for
    the handshake (the server serves one conversation at a time and says nothing while busy).
    Raises ChatError on connection failure, no handshake in time, or the server closing early.
    """
    import aiohttp

    frames = prepare_pcm(pcm, sample_rate)
    talk = Conversation(url, on_audio, token)
    started = time.monotonic()
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None, sock_connect=timeout_s)) as session:
        async with await talk.connect(session, ssl, timeout_s) as ws:
            await talk.handshake(ws, started, timeout_s, on_handshake)
            await talk.exchange(ws, frames, realtime, tail_s, until)
    return talk.result()


async def _listen(recv_task: asyncio.Task, tail_s: float, enough: tp.Callable[[], bool] | None) -> None:
    """Keep receiving after the last frame (the server lags behind when slower than real time): up to
    tail_s, or until `enough()` says what came back is all the caller waits for."""
    if enough is None:
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(asyncio.shield(recv_task), timeout=max(tail_s, 0.0))
        return
    deadline = time.monotonic() + max(tail_s, 0.0)
    while not recv_task.done() and time.monotonic() < deadline and not enough():
        await asyncio.sleep(0.05)


def chat_sync(*args: tp.Any, **kwargs: tp.Any) -> ChatResult:
    """:func:`chat` run to completion in a new event loop (same arguments)."""
    return asyncio.run(chat(*args, **kwargs))


__all__ = ["ChatError", "ChatRefused", "ChatResult", "Conversation", "chat", "chat_sync"]
