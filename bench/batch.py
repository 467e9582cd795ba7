"""The batched engine (jmoshi_cli/engine/torch_batched.py): per-step time at N conversations on one loaded
model, against N models stepped one after the other (what N separate servers sharing the device cost per
80 ms tick), in the same run.

    python bench/batch.py [--slots 1 2 4 8] [--steps 40] [--device cpu|cuda] [--dtype float32|bfloat16] [--json F]

The tiny model (tests' random checkpoint) by default; `--repo DIR` with moshi weights, Mimi and a
config.json measures another checkpoint. Reported per N: step p50/p95 ms, conversations' frames per
second, and the frame budget (80 ms) met or not.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from _common import emit_json  # noqa: E402

FRAME = 1920


def load(repo: Path, device: str, dtype: str):
    import torch
    from moshi.models import loaders

    info = loaders.CheckpointInfo.from_hf_repo(
        "bench/batch", repo / "model.safetensors", repo / "tokenizer-e351c8d8-checkpoint125.safetensors",
        repo / "tokenizer_spm_32k_3.model", config_path=repo / "config.json")
    return info.get_mimi(device=device), info.get_moshi(device=device, dtype=getattr(torch, dtype))


def batched_steps(mimi, lm, slots: int, steps: int, pcm: np.ndarray) -> list[float]:
    from jmoshi_cli.engine.torch_batched import BatchedEngine

    times = []
    with BatchedEngine(mimi, lm, slots=slots, use_sampling=False) as engine:
        opened = [engine.open() for _ in range(slots)]
        for i in range(steps):
            for slot in opened:
                engine.feed(slot, pcm[(i % (len(pcm) // FRAME)) * FRAME:][:FRAME])
            began = time.perf_counter()
            engine.step()
            times.append(1000 * (time.perf_counter() - began))
    return times[3:]  # the first steps warm up allocators


def summary(times: list[float], slots: int) -> dict:
    p95 = sorted(times)[int(0.95 * (len(times) - 1))]
    p50 = statistics.median(times)
    return {"slots": slots, "step_p50_ms": round(p50, 1), "step_p95_ms": round(p95, 1),
            "frames_per_s": round(slots * 1000 / p50, 1), "real_time": p95 <= 80.0}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--slots", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--repo", type=Path, help="a folder with the tiny model's file names (default: the tiny model)")
    parser.add_argument("--json", dest="json_path")
    args = parser.parse_args()
    import torch

    from jmoshi_cli.selftest import speech_like
    from jmoshi_cli.tiny_model import cached_tiny_repo

    torch.set_num_threads(1 if args.device == "cpu" else torch.get_num_threads())
    mimi, lm = load(args.repo or cached_tiny_repo(), args.device, args.dtype)
    pcm = speech_like(4.0)
    rows = []
    for slots in args.slots:
        batched = summary(batched_steps(mimi, lm, slots, args.steps, pcm), slots)
        one = summary(batched_steps(mimi, lm, 1, args.steps, pcm), 1)
        # N separate models stepped in turn on the same device: N one-slot steps per tick.
        batched["separate_step_p50_ms"] = round(one["step_p50_ms"] * slots, 1)
        batched["speedup"] = round(batched["separate_step_p50_ms"] / batched["step_p50_ms"], 2)
        rows.append(batched)
        print(f"N={slots}: step p50 {batched['step_p50_ms']} ms, p95 {batched['step_p95_ms']} ms "
              f"({batched['frames_per_s']} conversation frames/s); N separate: {batched['separate_step_p50_ms']} ms "
              f"per tick; {batched['speedup']}x", file=sys.stderr)
    emit_json({"device": args.device, "dtype": args.dtype, "rows": rows}, args.json_path)


if __name__ == "__main__":
    main()
