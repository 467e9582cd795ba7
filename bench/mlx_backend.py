"""The MLX backend's numbers: conversion at full size, ms per frame against torch, and a Mac report.

    .venv-mlx/bin/python bench/mlx_backend.py convert [--precision int4] [--layers 32]
        A random bf16 checkpoint of J-Moshi's shapes (moshi's built-in Moshi-7B kwargs, the legacy attention
        names J-Moshi's files have; 15.4 GB at 32 layers) is written to a temporary folder and converted by
        jmoshi_cli.mlx.convert in a fresh process: wall time and peak RSS against the source's size. The
        folder is deleted afterwards.

    .venv-mlx/bin/python bench/mlx_backend.py frames [--seconds 6]
        ms per 80 ms frame on this machine for the tiny test model, same input, one run each: the torch path
        (Mimi encode, LMGen step, Mimi decode, as moshi.server does per frame, in a child set up as jmoshi's
        torch backend sets up its CPU server), the MLX path (the MLX server's Session: rustymimi and moshi_mlx)
        in process, and the MLX server itself, from its own "frame handled" lines over /api/chat (Opus and
        the network included). The first 5 frames of each are left out (one-off setup).

    python bench/mlx_backend.py mac --repo DIR [--precisions bf16,int8,int4] [--seconds 30]
        For a Mac owner (nobody working on jmoshi has one): converts J-Moshi from a folder holding
        model.safetensors, tokenizer_spm_32k_3.model and tokenizer-e351c8d8-checkpoint125.safetensors (for
        example the Hugging Face snapshot `jmoshi download` fetched) at each precision, runs that many seconds
        of audio through it frame by frame, and prints ms per frame (median, p95), the real-time factor
        (80 ms / median), the peak MLX memory and the peak RSS (each precision in a process of its own), as
        JSON. The converted weights go to a temporary folder deleted at the end, or to --home (kept).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from _common import emit_json  # noqa: E402

FRAME = 1920
SAMPLE_RATE = 24000
BLOCK = 64 * 2**20  # random bf16 bytes written over and over: the values do not matter to the conversion

CONVERT = """
import json, sys
from pathlib import Path
from jmoshi_cli.mlx import convert
from jmoshi_cli.model.precision import Precision
source, out, kwargs, precision = Path(sys.argv[1]), Path(sys.argv[2]), json.loads(sys.argv[3]), Precision(sys.argv[4])
made = convert.convert_lm(source, out, "0" * 64, kwargs, precision)
print(json.dumps({"size": made.size}))
"""


TORCH_FRAMES = """
import json, sys, time
from pathlib import Path
import numpy as np, torch
from moshi.models import LMGen, loaders
repo, pcm = Path(sys.argv[1]), np.load(sys.argv[2])
kwargs = json.loads((repo / "config.json").read_text())
mimi = loaders.get_mimi(repo / "tokenizer-e351c8d8-checkpoint125.safetensors", device="cpu")
lm = loaders.get_moshi_lm(repo / "model.safetensors", lm_kwargs=kwargs, device="cpu", dtype=torch.bfloat16)
gen = LMGen(lm)
mimi.streaming_forever(1)
gen.streaming_forever(1)
times = []
with torch.no_grad():
    for i in range(len(pcm) // 1920):
        began = time.perf_counter()
        codes = mimi.encode(torch.from_numpy(pcm[i * 1920: (i + 1) * 1920])[None, None])
        tokens = gen.step(codes)
        if tokens is not None:
            mimi.decode(tokens[:, 1:])
        times.append(1000 * (time.perf_counter() - began))
print(json.dumps(times))
"""


# --- conversion at full size ---------------------------------------------------------------------------------------


def make_source(path: Path, layers: int) -> dict:
    """A random bf16 checkpoint of J-Moshi's shapes and names, written tensor by tensor."""
    import numpy as np
    from moshi.models import loaders

    from jmoshi_cli.model.lm_config import lm_kwargs
    from jmoshi_cli.tiny_model import legacy_key_names

    kwargs = dict(lm_kwargs(None), num_layers=layers)
    model = loaders.get_moshi_lm(None, lm_kwargs=kwargs, device="meta")
    shapes = {name: tuple(t.shape) for name, t in legacy_key_names(model.state_dict()).items()}
    normal = np.random.default_rng(0).standard_normal(BLOCK // 2, dtype=np.float32) * 0.02
    block = (normal.view(np.uint32) >> 16).astype(np.uint16).tobytes()  # bf16: the top half of a float32
    entries, offset = {}, 0
    for name, shape in shapes.items():
        size = 2 * int(np.prod(shape))
        entries[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    header = json.dumps(entries).encode()
    header += b" " * (-len(header) % 8)
    with open(path, "wb") as f:
        f.write(len(header).to_bytes(8, "little") + header)
        for at, (begin, end) in enumerate(e["data_offsets"] for e in entries.values()):
            left, start = end - begin, (at * 4099 * 2) % BLOCK
            while left:
                chunk = block[start: start + left]
                f.write(chunk)
                left -= len(chunk)
                start = 0
    return kwargs


def convert_bench(args) -> dict:
    with tempfile.TemporaryDirectory(prefix="jmoshi-bench-mlx-", dir=args.tmp) as tmp:
        folder = Path(tmp)
        source = folder / "model.safetensors"
        started = time.monotonic()
        kwargs = make_source(source, args.layers)
        size = source.stat().st_size
        result = {"layers": args.layers, "precision": args.precision, "source_gb": round(size / 1e9, 2),
                  "source_written_s": round(time.monotonic() - started, 1)}
        (folder / "out").mkdir()
        started = time.monotonic()
        process = subprocess.Popen([sys.executable, "-c", CONVERT, str(source), str(folder / "out"),
                                    json.dumps(kwargs), args.precision],
                                   env={**os.environ, "PYTHONPATH": str(ROOT / "src")}, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True)
        _, status, usage = os.wait4(process.pid, 0)
        seconds = time.monotonic() - started
        stdout, stderr = process.stdout.read(), process.stderr.read()
        result.update(seconds=round(seconds, 1), peak_rss_gib=round(usage.ru_maxrss / 2**20, 2),
                      peak_rss_over_source=round(usage.ru_maxrss * 1024 / size, 3))
        if os.waitstatus_to_exitcode(status) != 0:
            result["error"] = stderr.strip().splitlines()[-1] if stderr.strip() else f"status {status}"
        else:
            result["output_gb"] = round(json.loads(stdout.strip().splitlines()[-1])["size"] / 1e9, 2)
    return result


# --- ms per frame -------------------------------------------------------------------------------------------------


def user_audio(seconds: float):
    import numpy as np

    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    pitch = 180 + 40 * np.sin(2 * np.pi * 0.7 * t)
    loudness = 0.5 + 0.5 * np.sin(2 * np.pi * 4 * t) ** 2
    return (0.3 * loudness * np.sin(2 * np.pi * np.cumsum(pitch) / SAMPLE_RATE)).astype(np.float32)


def summary(times: list[float]) -> dict:
    ordered = sorted(times)
    median = statistics.median(ordered)
    return {"frames": len(ordered), "median_ms": round(median, 1),
            "p95_ms": round(ordered[max(int(0.95 * len(ordered)) - 1, 0)], 1),
            "real_time_factor": round(80 / median, 2)}


def torch_frames(repo: Path, pcm) -> dict:
    """What moshi.server does per frame, in a child set up as jmoshi's torch backend sets up its server on the CPU
    (NO_TORCH_COMPILE=1, one core left free: backends.cpu_threads): Mimi encode, LMGen step, Mimi decode."""
    import numpy as np

    from jmoshi_cli.backends import cpu_threads

    threads = str(cpu_threads())
    with tempfile.TemporaryDirectory(prefix="jmoshi-bench-mlx-") as tmp:
        np.save(Path(tmp) / "pcm.npy", pcm)
        env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "NO_TORCH_COMPILE": "1", "OMP_NUM_THREADS": threads,
               "MKL_NUM_THREADS": threads}
        done = subprocess.run([sys.executable, "-c", TORCH_FRAMES, str(repo), str(Path(tmp) / "pcm.npy")], env=env,
                              capture_output=True, text=True, check=True)
    return {**summary(json.loads(done.stdout.strip().splitlines()[-1])[5:]), "torch_threads": int(threads)}


def mlx_engine(lm_config: Path, weight: Path, mimi: Path, tokenizer: Path):
    from jmoshi_cli.backends.contract import ChildContract
    from jmoshi_cli.mlx import server, session

    args = server.parse_args(["--lm-config", str(lm_config), "--moshi-weight", str(weight), "--mimi-weight",
                              str(mimi), "--tokenizer", str(tokenizer)])
    return session.Engine(args, session.settings_from(args, ChildContract(seed=0)))


def mlx_frames(engine, pcm) -> dict:
    engine.warmup()
    session = engine.start()
    times = []
    for i in range(len(pcm) // FRAME):
        began = time.perf_counter()
        session.frame(pcm[i * FRAME: (i + 1) * FRAME])
        times.append(1000 * (time.perf_counter() - began))
    return summary(times[5:])


def served_frames(lm_config: Path, weight: Path, mimi: Path, tokenizer: Path, pcm) -> dict:
    """The MLX server as a child, one conversation over /api/chat: its own "frame handled" lines."""
    import socket

    from jmoshi_cli.serving.chat import chat_sync
    from jmoshi_cli.serving.server_log import frame_ms

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    child = subprocess.Popen([sys.executable, "-m", "jmoshi_cli.mlx.server", "--lm-config", str(lm_config),
                              "--moshi-weight", str(weight), "--mimi-weight", str(mimi), "--tokenizer", str(tokenizer),
                              "--port", str(port)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    try:
        for line in child.stdout:
            if "Access the Web UI" in line:
                break
        chat_sync(f"ws://127.0.0.1:{port}/api/chat", pcm, realtime=True, tail_s=len(pcm) / SAMPLE_RATE)
    finally:
        child.terminate()
        rest = child.communicate(timeout=60)[0]
    times = [ms for ms in (frame_ms(line) for line in rest.splitlines()) if ms is not None]
    return summary(times[5:])


def frames_bench(args) -> dict:
    from jmoshi_cli.mlx import convert
    from jmoshi_cli.model.precision import Precision
    from jmoshi_cli.tiny_model import cached_tiny_repo

    repo = cached_tiny_repo()
    pcm = user_audio(args.seconds)
    with tempfile.TemporaryDirectory(prefix="jmoshi-bench-mlx-") as home:
        made = convert.ensure_mlx(Path(home), repo / "model.safetensors", None, repo / "config.json", Precision.BF16)
        files = (made.config, made.weight, repo / "tokenizer-e351c8d8-checkpoint125.safetensors",
                 repo / "tokenizer_spm_32k_3.model")
        return {"model": "tiny (tiny_model.py defaults), bf16", "seconds_of_audio": args.seconds,
                "cpu_count": os.cpu_count(), "torch_child": torch_frames(repo, pcm),
                "mlx_in_process": mlx_frames(mlx_engine(*files), pcm),
                "mlx_server": served_frames(*files, pcm)}


# --- the Mac report ---------------------------------------------------------------------------------------------------


def mac_bench(args) -> dict:
    """Each precision in a process of its own (its peak RSS its own), converted weights kept in --home or a
    temporary folder deleted at the end."""
    import shutil

    names = args.precisions.split(",")
    if len(names) == 1 and args.home:
        return mac_one(args, names[0])
    home = Path(args.home) if args.home else Path(tempfile.mkdtemp(prefix="jmoshi-bench-mlx-"))
    result: dict = {}
    try:
        for name in names:
            argv = [sys.executable, __file__, "mac", "--repo", args.repo, "--precisions", name,
                    "--seconds", str(args.seconds), "--home", str(home)]
            done = subprocess.run(argv, capture_output=True, text=True)
            if done.returncode != 0:
                result.setdefault("precisions", {})[name] = {"error": done.stderr.strip().splitlines()[-1:]}
                continue
            one = json.loads(done.stdout[done.stdout.index("{"):])
            result = {**one, "precisions": {**result.get("precisions", {}), **one["precisions"]}}
    finally:
        if not args.home:
            shutil.rmtree(home, ignore_errors=True)
    return result


def mac_one(args, name: str) -> dict:
    import platform

    import mlx.core as mx

    from jmoshi_cli.mlx import convert
    from jmoshi_cli.model.precision import Precision

    repo, data = Path(args.repo), Path(args.home)
    mimi = convert.ensure_mimi(data, repo / "tokenizer-e351c8d8-checkpoint125.safetensors", None)
    config = repo / "config.json" if (repo / "config.json").is_file() else None
    started = time.monotonic()
    made = convert.ensure_mlx(data, repo / "model.safetensors", None, config, Precision(name))
    converted_s = time.monotonic() - started
    mx.reset_peak_memory()
    engine = mlx_engine(made.config, made.weight, mimi, repo / "tokenizer_spm_32k_3.model")
    frames = mlx_frames(engine, user_audio(args.seconds))
    return {"machine": platform.platform(), "processor": platform.processor(), "mlx": mx.__version__,
            "device": str(mx.default_device()), "seconds_of_audio": args.seconds,
            "precisions": {name: {**frames, "converted_s": round(converted_s, 1),
                                  "weights_gb": round(made.size / 1e9, 2),
                                  "peak_mlx_memory_gb": round(mx.get_peak_memory() / 1e9, 2),
                                  "peak_rss_gb": round(_peak_rss() / 1e9, 2)}}}


def _peak_rss() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB on Linux


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="mode", required=True)
    conv = sub.add_parser("convert", help="conversion at full size: wall time and peak RSS")
    conv.add_argument("--precision", default="int4", choices=["bf16", "int8", "int4"])
    conv.add_argument("--layers", type=int, default=32, help="transformer layers (J-Moshi has 32)")
    conv.add_argument("--tmp", help="where to write the ~15 GB source (default: the system's temp folder)")
    frames = sub.add_parser("frames", help="ms per frame of the tiny model: torch against MLX")
    frames.add_argument("--seconds", type=float, default=6.0)
    mac = sub.add_parser("mac", help="real-time factor, memory and ms per frame at each precision (Apple Silicon)")
    mac.add_argument("--repo", required=True, help="a folder with J-Moshi's three files")
    mac.add_argument("--precisions", default="int4,int8,bf16")
    mac.add_argument("--seconds", type=float, default=30.0)
    mac.add_argument("--home", help="where to keep the converted weights (default: a new temporary folder)")
    for each in (conv, frames, mac):
        each.add_argument("--json", help="also write the result here")
    args = parser.parse_args(argv)
    result = {"convert": convert_bench, "frames": frames_bench, "mac": mac_bench}[args.mode](args)
    emit_json(result, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
