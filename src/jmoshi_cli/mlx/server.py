"""The MLX backend's server child: moshi.server's /api/chat and web UI on moshi_mlx and rustymimi.

Run by jmoshi as ``python -m jmoshi_cli.mlx.server --lm-config ... --moshi-weight ... --mimi-weight ...
--tokenizer ... [--host H] [--port P] [--static DIR|none] [--ssl DIR] [--seed N] [--temp ...]``, with its
contract (backends/contract.py) in the environment. Why not ``moshi_mlx.local_web``: as shipped it
never resets the generator or Mimi between conversations (the second continues the first), stops for
good after ~5 minutes of conversation over its whole life and then hangs, leaves its two
multiprocessing children behind on SIGTERM, and offline without --static it hangs.

This module is the child's `main`; the model is session.py's (`Engine`: LM, Mimi and tokenizer loaded
once; `Session`: one conversation); the web side is jmoshi's conversation server (conversations/server.py, the same
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
from pathlib import Path

from ..conversations.server import say
from .session import Engine, settings_from


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
