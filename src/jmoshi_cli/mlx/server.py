"""The MLX backend's server child: moshi.server's /api/chat and web UI on moshi_mlx and rustymimi.

Run by jmoshi as ``python -m jmoshi_cli.mlx.server --lm-config ... --moshi-weight ... --mimi-weight ...
--tokenizer ... [--host H] [--port P] [--static DIR|none] [--ssl DIR] [--seed N] [--temp ...]``, with its
contract (backends/contract.py) in the environment. Why not ``moshi_mlx.local_web``: as shipped it
never resets the generator or Mimi between conversations (the second continues the first), stops for
good after ~5 minutes of conversation over its whole life and then hangs, leaves its two
multiprocessing children behind on SIGTERM, and offline without --static it hangs. Here:

- one process; the model runs in one worker thread, the event loop does the network;
- every conversation starts fresh: a new generator (its KV cache included) and Mimi reset; with
  --seed, the random generator is seeded again at each conversation's start (without it, once at
  start, as moshi.server does);
- one conversation at a time: a second connection waits on the lock, silent, as on moshi.server;
- no length or count limit (model.Generator keeps only the last few frames' tokens);
- it binds --host only, needs no network, and dies with jmoshi (the contract's parent pid);
- its console lines are moshi.server's (``[Info] accepted connection``, ``[Info] frame handled in
  N.Nms``, ``[Info] connection closed``, ``[Info] done with connection``, ``[Info] text token '...'``),
  without colours, so that server_log relays the same things for both backends;
- the text sent is joined by jmoshi's rule (transcript.PieceJoiner), not with a space for every ``▁``.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from .model import Sampling

SAMPLE_RATE = 24000
FRAME_SIZE = 1920  # 80 ms: one Mimi frame
UPSTREAM_SEED = 42424242  # what moshi.server seeds at start
WARMUP_FRAMES = 4
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


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m jmoshi_cli.mlx.server")
    parser.add_argument("--lm-config", required=True, type=Path, help="the moshi LM kwargs the converter wrote")
    parser.add_argument("--moshi-weight", required=True, type=Path, help="MLX weights (bf16, int8 or int4)")
    parser.add_argument("--mimi-weight", required=True, type=Path, help="Mimi with legacy attention names")
    parser.add_argument("--tokenizer", required=True, type=Path)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", default=8998, type=int)
    parser.add_argument("--static", default="none", help="the web UI folder, or none")
    parser.add_argument("--ssl", type=Path, help="a folder with cert.pem and key.pem: serve https")
    parser.add_argument("--cpu", action="store_true", help="run MLX on the CPU (on a Mac: instead of its GPU)")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--temp", type=float)
    parser.add_argument("--temp-text", type=float)
    parser.add_argument("--top-k", type=int)
    parser.add_argument("--top-k-text", type=int)
    return parser.parse_args(argv)


@dataclass(frozen=True)
class Settings:
    seed: int | None
    sampling: Sampling


def settings_from(args: argparse.Namespace, contract) -> Settings:
    """Flags first, then what jmoshi put in the contract, then moshi's defaults."""
    from .model import Sampling

    given = dict(contract.sampling or {})
    for key in ("temp", "temp_text", "top_k", "top_k_text"):
        if getattr(args, key) is not None:
            given[key] = getattr(args, key)
    known = {k: v for k, v in given.items() if k in Sampling.__dataclass_fields__}
    return Settings(args.seed if args.seed is not None else contract.seed, Sampling(**known))


# --- the model, used from one worker thread only ---------------------------------------------------------------


class Engine:
    """The LM, Mimi and tokenizer, loaded once; `start` begins a conversation from a fresh state."""

    def __init__(self, args: argparse.Namespace, settings: Settings):
        import rustymimi
        import sentencepiece

        from .model import load_lm, read_lm_kwargs

        self.settings = settings
        say("info", f"loading the text tokenizer {args.tokenizer}")
        self.tokenizer = sentencepiece.SentencePieceProcessor(str(args.tokenizer))  # type: ignore[call-arg]
        lm_kwargs = self.lm_kwargs = read_lm_kwargs(args.lm_config)
        quantization = weights_quantization(args.moshi_weight, lm_kwargs)
        say("info", f"loading moshi ({describe(quantization)}) from {args.moshi_weight}")
        self.lm = load_lm(lm_kwargs, args.moshi_weight, quantization)
        say("info", "moshi loaded")
        say("info", f"loading mimi from {args.mimi_weight}")
        self.mimi_file = str(args.mimi_weight)
        self.mimi = rustymimi.Tokenizer(self.mimi_file, num_codebooks=self.lm.cfg.depformer.num_slices)
        say("info", "mimi loaded")
        if settings.seed is None:
            import mlx.core as mx

            mx.random.seed(UPSTREAM_SEED)

    def warmup(self) -> None:
        import numpy as np

        session = self.start()
        for _ in range(WARMUP_FRAMES + session.generator.max_delay):
            session.frame(np.zeros(FRAME_SIZE, dtype=np.float32))

    def start(self, reset_encoder: bool = True) -> Session:
        """A conversation from a fresh state. reset_encoder: reset Mimi's encoder after the first frame, as
        moshi.server does (a live conversation); `jmoshi infer` runs the encoder over the input unbroken."""
        import rustymimi

        from .model import Generator, reset

        if self.settings.seed is not None:
            import mlx.core as mx

            mx.random.seed(self.settings.seed)
        reset(self.lm)
        # A new Mimi rather than reset(): rustymimi 0.4.1's reset leaves its downsampling convolution's state.
        self.mimi = rustymimi.Tokenizer(self.mimi_file, num_codebooks=self.lm.cfg.depformer.num_slices)
        return Session(self.lm, self.mimi, Generator(self.lm, self.settings.sampling), reset_encoder)


class Session:
    """One conversation: a frame of the user's PCM in, J-Moshi's PCM (or None yet) and text id out."""

    def __init__(self, lm, mimi, generator, reset_encoder: bool = True):
        self.lm, self.mimi, self.generator = lm, mimi, generator
        self.first = reset_encoder  # the first frame is still to come, and the encoder is reset after it

    def frame(self, pcm):
        """(J-Moshi's PCM, its text id) for the frame that became complete with this one; (None, None) yet."""
        import mlx.core as mx
        import numpy as np

        codes = self.mimi.encode_step(pcm[None, None].astype(np.float32))  # (1, codebooks, 1)
        if self.first:
            # As moshi.server: the first frame's codes carry the encoder's left padding; its state is reset
            # so that the next frame gets that padding again (the frame itself still reaches the LM).
            self.mimi.reset()
            self.first = False
        user = mx.array(codes).transpose(0, 2, 1)[0, :, : self.generator.main]
        self.generator.step(user)
        # Text and voice of the same frame together, `max_delay` steps on, as moshi.server sends them.
        audio = self.generator.last_audio_tokens()
        if audio is None:
            return None, None
        out = self.mimi.decode_step(np.array(audio).astype(np.uint32)[:, :, None])
        return np.asarray(out, dtype=np.float32).reshape(-1), self.generator.last_text_token()


def weights_quantization(weight: Path, lm_kwargs: dict):
    """How the weights file is quantized, read from its own shapes (so a file cannot be loaded as another)."""
    from .convert import Reader
    from .model import Quantization

    reader = Reader(weight)
    if "text_linear.scales" not in reader.entries:
        return None
    dim = lm_kwargs["dim"]
    packed, groups = reader.shape("text_linear.weight")[1], reader.shape("text_linear.scales")[1]
    return Quantization(bits=packed * 32 // dim, group_size=dim // groups)


def describe(quantization) -> str:
    return "bf16" if quantization is None else f"{quantization.bits}-bit, groups of {quantization.group_size}"


# --- the web side ------------------------------------------------------------------------------------------------


class ChatServer:
    def __init__(self, engine: Engine, pool: concurrent.futures.ThreadPoolExecutor, recorder=None):
        from ..serving.visits import Listener

        self.engine, self.pool = engine, pool
        # The gate's view of each conversation (visits.py), then the recorder when asked for.
        self.listener = _Fanout([Listener(), *([recorder] if recorder is not None else [])])
        self.lock = asyncio.Lock()
        self.open: set = set()  # the websockets of this and the waiting conversations

    async def handle_chat(self, request):
        from aiohttp import web

        from ..serving.visits import adopt

        ws = adopt(web.WebSocketResponse())
        await ws.prepare(request)
        say("info", "accepted connection")
        self.open.add(ws)
        try:
            async with self.lock:
                if not ws.closed:
                    await self.converse(ws)
        finally:
            self.open.discard(ws)
        say("info", "done with connection")
        return ws

    async def close_all(self) -> None:
        """Hang up on every browser: asked to stop, the server does not wait for conversations to end."""
        from aiohttp import WSCloseCode

        for ws in list(self.open):
            await ws.close(code=WSCloseCode.GOING_AWAY, message=b"server stopping")

    async def converse(self, ws) -> None:
        import sphn

        from ..transcript import PieceJoiner

        loop = asyncio.get_running_loop()
        session = await loop.run_in_executor(self.pool, self.engine.start)
        self.listener.conversation_starts()  # in the request's task: the recorder knows which conversation
        conversation = _Conversation(ws, session, sphn.OpusStreamWriter(SAMPLE_RATE), PieceJoiner(),
                                     self.engine.tokenizer, self.listener)
        reader = sphn.OpusStreamReader(SAMPLE_RATE)
        try:
            await ws.send_bytes(b"\x00")
        except ConnectionResetError:  # the browser left while it waited for the conversation before
            return
        try:
            async for pcm in _user_audio(ws, reader):
                if not await conversation.feed(pcm, loop, self.pool):
                    break
        finally:
            say("info", "connection closed")


async def _user_audio(ws, reader):
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
    """Cuts the user's audio into 80 ms frames, runs each through the model, sends what comes out."""

    def __init__(self, ws, session: Session, writer, joiner, tokenizer, listener):
        import numpy as np

        from ..transcript import SKIPPED_TEXT_IDS

        self.ws, self.session, self.writer, self.joiner, self.tokenizer = ws, session, writer, joiner, tokenizer
        self.listener = listener  # the recorder (recording/tap.py) or nobody: what the model heard and said
        self.skipped = SKIPPED_TEXT_IDS
        self.pending: Any = np.zeros(0, dtype=np.float32)  # the user's samples not yet a whole frame

    async def feed(self, pcm, loop, pool) -> bool:
        """Handle every whole frame; False once the browser has gone (nothing more can be sent)."""
        import numpy as np

        self.pending = np.concatenate((self.pending, pcm))
        while self.pending.shape[-1] >= FRAME_SIZE:
            began = time.monotonic()
            chunk, self.pending = self.pending[:FRAME_SIZE], self.pending[FRAME_SIZE:]
            out, text_id = await loop.run_in_executor(pool, self.session.frame, chunk)
            self._tell(chunk, out, text_id)
            try:
                await self._send(out, text_id)
            except ConnectionResetError:  # aiohttp's "Cannot write to closing transport": the browser left
                return False
            say("info", f"frame handled in {1000 * (time.monotonic() - began):.1f}ms")
        return True

    def _tell(self, heard, out, text_id: int | None) -> None:
        """The recorder's view of one frame, as the torch tap gives it: heard, stepped, then said."""
        import numpy as np

        self.listener.heard(heard)
        # Tokens come back from the step that first has audio, as from moshi's LMGen; the text id rides along.
        self.listener.stepped(None if out is None else np.full((1, 1, 1), text_id))
        if out is not None:
            self.listener.said(out)

    async def _send(self, out, text_id: int | None) -> None:
        if out is not None:
            opus = self.writer.append_pcm(out)
            if len(opus) > 0:
                await self.ws.send_bytes(b"\x01" + opus)
        if text_id is None or text_id in self.skipped or not 0 <= text_id < self.tokenizer.get_piece_size() \
                or self.tokenizer.is_control(text_id):
            return
        text = self.joiner.feed(self.tokenizer.id_to_piece(text_id))
        if text:
            say("info", f"text token '{text}'")
            await self.ws.send_bytes(b"\x02" + text.encode("utf-8"))


class _Fanout:
    """Every listener hears every call, in order."""

    def __init__(self, listeners: list):
        self.listeners = listeners

    def conversation_starts(self) -> None:
        for listener in self.listeners:
            listener.conversation_starts()

    def heard(self, x) -> None:
        for listener in self.listeners:
            listener.heard(x)

    def stepped(self, tokens) -> None:
        for listener in self.listeners:
            listener.stepped(tokens)

    def said(self, pcm) -> None:
        for listener in self.listeners:
            listener.said(pcm)


def _recorder(contract, engine: Engine, args: argparse.Namespace):
    """`serve --record`: the same recorder as on torch (recording/tap.py), listening to this server's frames."""
    if contract.record is None:
        return None
    from ..recording.tap import Recorder, Settings

    return Recorder(Settings.from_contract(contract), notify, seeds=False)  # Engine.start seeds MLX itself


def _model_facts(engine: Engine, args: argparse.Namespace):
    from dataclasses import asdict

    from ..recording.tap import ModelFacts

    quantization = weights_quantization(args.moshi_weight, engine.lm_kwargs)
    max_delay = max(engine.lm.cfg.audio_delays) if engine.lm.cfg.audio_delays else 0
    return ModelFacts(engine.tokenizer, max_delay, asdict(engine.settings.sampling), "cpu" if args.cpu else "gpu",
                      "bfloat16" if quantization is None else f"bfloat16, {describe(quantization)} weights")


def _runtime() -> dict:
    from ..runtime import versions

    return versions(("mlx", "moshi_mlx", "rustymimi", "sphn", "aiohttp", "jmoshi"))


def make_app(chat: ChatServer, static: str, contract=None):
    from aiohttp import web

    from ..backends.contract import ChildContract
    from ..serving import gate

    contract = contract if contract is not None else ChildContract()
    app = web.Application()
    gate.install(app, contract.access, contract.limits, notify)
    app.router.add_get("/api/chat", chat.handle_chat)
    if static != "none":
        index = os.path.join(static, "index.html")

        async def handle_root(_):
            return web.FileResponse(index)

        say("info", f"serving static content from {static}")
        app.router.add_get("/", handle_root)
        app.router.add_static("/", path=static, follow_symlinks=True, name="static")
    return app


def ssl_context(folder: Path | None):
    if folder is None:
        return None
    import ssl

    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(certfile=str(folder / "cert.pem"), keyfile=str(folder / "key.pem"))
    return context


async def serve(args: argparse.Namespace, engine: Engine, pool, recorder=None, contract=None) -> None:
    from aiohttp import web

    chat = ChatServer(engine, pool, recorder)
    app = make_app(chat, args.static, contract)
    if recorder is not None:
        recorder.attach(app, _model_facts(engine, args), _runtime())
    runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=SHUTDOWN_S)
    await runner.setup()
    context = ssl_context(args.ssl)
    site = web.TCPSite(runner, args.host, args.port, ssl_context=context)
    await site.start()
    scheme = "https" if context else "http"
    say("info", f"Access the Web UI directly at {scheme}://{args.host}:{args.port}")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    say("info", "stopping")
    await chat.close_all()
    await runner.cleanup()


def main(argv: list[str] | None = None) -> None:
    from ..backends.contract import ChildContract
    from ..errors import JMoshiError

    contract = ChildContract.from_env(os.environ)
    if contract.parent_pid:  # first thing: from here on the kernel kills this process when jmoshi dies
        from ..serving.lifetime import die_with_parent

        die_with_parent(contract.parent_pid, signal.SIGKILL)
    args = parse_args(sys.argv[1:] if argv is None else argv)
    args.host = contract.bind_host or args.host
    if args.static != "none" and not Path(args.static, "index.html").is_file():
        say("error", f"--static {args.static}: no index.html there (the web UI folder, or none)")
        sys.exit(2)
    if args.cpu:
        import mlx.core as mx

        mx.set_default_device(mx.cpu)
    # One worker thread runs every MLX and Mimi call: loading, warm-up and frames stay on one thread.
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="mlx-model")
    try:
        engine = pool.submit(Engine, args, settings_from(args, contract)).result()
        say("info", "warming up the model")
        pool.submit(engine.warmup).result()
    except JMoshiError as exc:
        say("error", f"{exc.message}" + (f" ({exc.hint})" if exc.hint else ""))
        sys.exit(exc.exit_code)
    asyncio.run(serve(args, engine, pool, _recorder(contract, engine, args), contract))
    pool.shutdown(wait=False, cancel_futures=True)


if __name__ == "__main__":
    main()
