"""The torch backend's server child for `serve --conversations N` (N > 1): J-Moshi loaded once, N
conversations stepped together in the slots of engine/torch_batched.py, served by server.py.

Run by jmoshi as ``python -m jmoshi_cli.conversations.torch_child --conversations N`` with the flags
moshi.server takes (--host --port --hf-repo --moshi-weight --mimi-weight --tokenizer --static
--device [--half] [--lora-weight] [--ssl]) and its contract (backends/contract.py) in the
environment. The model is loaded the way moshi.server loads it (CheckpointInfo, the resolved
config.json, LoRA fused, jmoshi's int8 scales); with N = 1, jmoshi runs moshi.server itself.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import os
import signal
import sys
from pathlib import Path
from typing import Any

import numpy as np

from .. import runtime
from ..audio_io import FRAME_SIZE
from ..backends.contract import ChildContract
from ..model.precision import Precision
from .server import Site, say, serve


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m jmoshi_cli.conversations.torch_child")
    parser.add_argument("--conversations", type=int, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", default=8998, type=int)
    parser.add_argument("--hf-repo", required=True)
    parser.add_argument("--moshi-weight", required=True)
    parser.add_argument("--mimi-weight", required=True)
    parser.add_argument("--tokenizer", required=True)
    parser.add_argument("--lora-weight")
    parser.add_argument("--static", default="none")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--half", action="store_true")
    parser.add_argument("--ssl", type=Path)
    return parser.parse_args(argv)


def load(args: argparse.Namespace, contract: ChildContract) -> Any:
    """The engine over moshi's model, loaded as moshi.server loads it (on the model thread)."""
    import torch
    from moshi.models import loaders

    from ..engine.torch_batched import BatchedEngine
    from ..sampling import UPSTREAM_SEED, seed_all
    from ..upstream import moshi_server

    seed_all(UPSTREAM_SEED)
    moshi_server.apply(moshi_server.Patches(int8_scales=contract.precision is Precision.INT8))
    say("info", "retrieving checkpoint")
    info = loaders.CheckpointInfo.from_hf_repo(args.hf_repo, args.moshi_weight, args.mimi_weight, args.tokenizer,
                                               lora_weights=args.lora_weight, config_path=contract.config_path)
    say("info", "loading mimi")
    mimi = info.get_mimi(device=args.device)
    say("info", "mimi loaded")
    tokenizer = info.get_text_tokenizer()
    say("info", "loading moshi")
    lm = info.get_moshi(device=args.device, dtype=torch.float16 if args.half else torch.bfloat16, fuse_lora=True)
    say("info", "moshi loaded")
    say("info", f"holding {args.conversations} conversations at once")
    return BatchedEngine(mimi, lm, args.conversations, seed=contract.seed, tokenizer=tokenizer, **info.lm_gen_config)


def warmup(engine: Any) -> None:
    """A few steps of silence in every slot: kernels chosen (and CUDA graphs captured) at the full batch."""
    slots = [engine.open() for _ in range(engine.slots)]
    for _ in range(engine.facts.max_delay + 2):
        for slot in slots:
            engine.feed(slot, np.zeros(FRAME_SIZE, dtype=np.float32))
        engine.step()
    for slot in slots:
        engine.close(slot)


def main(argv: list[str] | None = None) -> None:
    contract = ChildContract.from_env(os.environ)
    if contract.parent_pid:  # first thing: from here on the kernel kills this process when jmoshi dies
        from ..serving.lifetime import die_with_parent

        die_with_parent(contract.parent_pid, signal.SIGKILL)
    runtime.limit_threads(contract.threads)
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if contract.seed is not None and args.device.startswith("cuda"):
        # A CUDA graph replays its kernels without the per-conversation generators (upstream/moshi_sampling.py).
        os.environ["NO_CUDA_GRAPH"] = "1"
    host = contract.bind_host or args.host
    static = None if args.static == "none" else args.static
    # One model thread runs every torch call: loading, warm-up, slots and steps stay on one thread.
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="model")
    engine = pool.submit(load, args, contract).result()
    say("info", "warming up the model")
    pool.submit(warmup, engine).result()
    asyncio.run(serve(Site(host, args.port, static, args.ssl), engine, pool, contract))
    pool.shutdown(wait=False, cancel_futures=True)


if __name__ == "__main__":
    main()
