"""The MLX backend's server child: moshi.server's /api/chat and web UI on moshi_mlx and rustymimi.

Run by jmoshi as ``python -m jmoshi_cli.mlx.server --lm-config ... --moshi-weight ... --mimi-weight ...
--tokenizer ... [--host H] [--port P] [--static DIR|none] [--ssl DIR] [--seed N] [--temp ...]``, with its
contract (backends/contract.py) in the environment. Why not ``moshi_mlx.local_web``: as shipped it
never resets the generator or Mimi between conversations (the second continues the first), stops for
good after ~5 minutes of conversation over its whole life and then hangs, leaves its two
multiprocessing children behind on SIGTERM, and offline without --static it hangs.

This module holds the model (`Engine`: LM, Mimi and tokenizer loaded once; `Session`: one conversation)
and the child's `main`; the web side is jmoshi's conversation server (conversations/server.py, the same
as torch's `serve --conversations N`) over a one-slot engine (engine/mlx_engine.py). Here:

- one process; the model runs in one worker thread, the event loop does the network;
- every conversation starts fresh: a new generator (its KV cache included) and a new Mimi; with
  --seed, the random generator is seeded again at each conversation's start (without it, once at
  start, as moshi.server does);
- one conversation at a time: a second connection waits for the slot, silent, as on moshi.server;
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
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..audio_io import FRAME_SIZE
from ..conversations.server import say

if TYPE_CHECKING:  # pragma: no cover
    from .model import Sampling

UPSTREAM_SEED = 42424242  # what moshi.server seeds at start
WARMUP_FRAMES = 4


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
        quantization = self.quantization = weights_quantization(args.moshi_weight, lm_kwargs)
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


def main(argv: list[str] | None = None) -> None:
    from ..backends.contract import ChildContract
    from ..conversations.server import Site, serve
    from ..engine.mlx_engine import MlxEngine
    from ..errors import JMoshiError

    contract = ChildContract.from_env(os.environ)
    if contract.parent_pid:  # first thing: from here on the kernel kills this process when jmoshi dies
        from ..serving.lifetime import die_with_parent

        die_with_parent(contract.parent_pid, signal.SIGKILL)
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.static != "none" and not Path(args.static, "index.html").is_file():
        say("error", f"--static {args.static}: no index.html there (the web UI folder, or none)")
        sys.exit(2)
    site = Site(contract.bind_host or args.host, args.port, None if args.static == "none" else args.static, args.ssl)
    if args.cpu:
        import mlx.core as mx

        mx.set_default_device(mx.cpu)
    # One worker thread runs every MLX and Mimi call: loading, warm-up and frames stay on one thread.
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="mlx-model")
    try:
        model = pool.submit(Engine, args, settings_from(args, contract)).result()
        say("info", "warming up the model")
        pool.submit(model.warmup).result()
    except JMoshiError as exc:
        say("error", f"{exc.message}" + (f" ({exc.hint})" if exc.hint else ""))
        sys.exit(exc.exit_code)
    engine = pool.submit(MlxEngine, model, "cpu" if args.cpu else "gpu").result()
    # The recorder, when there is one, is built with seeds=False (conversations.server.recorder_for):
    # Engine.start seeds MLX itself at each conversation's start.
    asyncio.run(serve(site, engine, pool, contract))
    pool.shutdown(wait=False, cancel_futures=True)


if __name__ == "__main__":
    main()
