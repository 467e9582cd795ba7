"""J-Moshi on a GPU without a download: time to ready, ms per 80 ms frame (p50/p95), peak VRAM.

The LM is built with J-Moshi's exact architecture (moshi's built-in Moshi-7B kwargs, which J-Moshi's
repositories use: they hold no config.json), randomly initialised on the GPU in bfloat16 (or float16
with --half); Mimi has its fixed architecture, random weights. Each frame does what moshi.server does
per 80 ms of audio: Mimi encode, LMGen.step, Mimi decode, on the installed runtime (see runtime.py), with
moshi's own torch.compile and CUDA graphs as upstream runs them (NO_TORCH_COMPILE / NO_CUDA_GRAPH turn
them off). Random weights: the timings and memory are the real model's, the speech is noise.

    .venv/bin/python bench/gpu.py --frames 250 --json results/gpu-current.json
    .venv/bin/python bench/gpu.py --frames 250 --quantize int8 --json results/gpu-current-int8.json
    .venv-022/bin/python bench/gpu.py --frames 250 --json results/gpu-022.json

--quantize int8 builds the LM as moshi builds a config with "quantize": every Linear a QLinear
(bitsandbytes int8), layer by layer, which is what `jmoshi serve --quantize int8` loads (current runtime
only). `peak_vram_gib` counts from the start, so with int8 it includes the bf16 layer being quantized.
`--device cpu --layers 2` is a smoke run of the same code (no VRAM figures; far from real time).

--conversations 1,4,8,16,32 adds the table of `serve --conversations N` on the same model: N conversations
in the slots of jmoshi's BatchedEngine (engine/torch_batched.py: Mimi encode, LMGen.step with exec masks,
Mimi decode, as the server's ticks step them), every slot fed each step. Per N: step p50/p95 ms (one step
answers N conversations' 80 ms frames) against the 80 ms budget, conversation frames per second, and GPU
memory: the N slots' streaming state (memory_allocated after opening them, less before; per conversation
against engine/memory.py's per_conversation_bytes) and the peak (max_memory_allocated during the steps,
weights included). An N that runs out of GPU memory is reported as such and ends the table.

    .venv/bin/python bench/gpu.py --frames 100 --conversations 1,4,8,16,32 --json results/gpu-batch-bf16.json
    .venv/bin/python bench/gpu.py --frames 100 --conversations 1,4,8,16,32 --quantize int8 \
        --json results/gpu-batch-int8.json
    .venv/bin/python bench/gpu.py --device cpu --layers 2 --frames 3 --conversations 1,2 --conversation-steps 3

(the last: the CPU smoke run of the whole path, no GPU figures).

Not run in this project's CI (no GPU there).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))


BUDGET_MS = 80.0  # one Mimi frame: a step slower than this falls behind the conversations it serves


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def run(frames: int, device: str, half: bool, int8: bool = False, layers: int | None = None,
        conversations: list[int] | None = None, conversation_steps: int = 100) -> dict:
    import torch
    from moshi.models import LMGen, loaders
    from moshi.models.lm import LMModel

    from jmoshi_cli import runtime, tiny_model

    cuda = device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: this benchmark needs a GPU (or --device cpu --layers 2 for a smoke run)")
    if int8 and not runtime.detect().has_int8:
        raise SystemExit(f"int8 needs the current runtime (moshi 0.2.13); this is moshi {runtime.detect().moshi}")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    dtype = torch.float16 if half else torch.bfloat16
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    with torch.no_grad():
        kwargs = dict(loaders._lm_kwargs)
        kwargs.pop("depformer_causal", None)  # 0.2.2 still lists it; 0.2.13's loader drops it too
        if layers:
            kwargs["num_layers"] = layers
        if int8:
            kwargs["quantize"] = True
        lm = LMModel(device=device, dtype=dtype, **kwargs).eval()
        model_gib = torch.cuda.memory_allocated(device) / 2**30 if cuda else None
        mimi = tiny_model._build_mimi_module(device)
        mimi.set_num_codebooks(lm.dep_q)
        lm_gen = LMGen(lm)
        # moshi.server holds these states forever; here they end with the run, so that the batched
        # engine (--conversations) can stream the same modules afterwards.
        with mimi.streaming(1), lm_gen.streaming(1):
            frame = int(mimi.sample_rate / mimi.frame_rate)
            silence = torch.zeros(1, 1, frame, device=device)
            for _ in range(4):  # the server's warm-up
                tokens = lm_gen.step(mimi.encode(silence))
                if tokens is not None:
                    mimi.decode(tokens[:, 1:])
            sync()
            ready_s = time.perf_counter() - started
            times = []
            chunk = torch.randn(1, 1, frame, device=device) * 0.1
            for _ in range(frames):
                begin = time.perf_counter()
                tokens = lm_gen.step(mimi.encode(chunk))
                if tokens is not None:
                    mimi.decode(tokens[:, 1:])
                sync()
                times.append((time.perf_counter() - begin) * 1000)
        del lm_gen
        peak_gib = torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None  # before the table resets it
        table = conversations_table(mimi, lm, kwargs, conversations, conversation_steps) if conversations else None
    versions = runtime.installed_versions()
    params = sum(p.numel() for p in lm.parameters())
    return {
        "runtime": runtime.detect().label, "versions": versions,
        "gpu": torch.cuda.get_device_name(device) if cuda else "cpu",
        "dtype": str(dtype).removeprefix("torch."), "weights": "int8" if int8 else "float",
        "lm_layers": kwargs["num_layers"], "lm_parameters": params, "ready_s": round(ready_s, 1),
        "frames": frames, "frame_ms_p50": round(statistics.median(times), 2),
        "frame_ms_p95": round(_percentile(times, 0.95), 2),
        "real_time_factor_p50": round(statistics.median(times) / 80, 3),
        "lm_vram_gib": round(model_gib, 2) if cuda else None,
        "peak_vram_gib": round(peak_gib, 2) if cuda else None,
        **({"conversations": table} if table is not None else {}),
    }


def conversations_table(mimi, lm, kwargs: dict, counts: list[int], steps: int) -> dict:
    """`serve --conversations N` at each N: BatchedEngine's step times and the GPU memory of N slots."""
    import gc

    import numpy as np
    import torch

    from jmoshi_cli.engine.memory import per_conversation_bytes
    from jmoshi_cli.engine.torch_batched import BatchedEngine

    device = next(iter(lm.parameters())).device
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    gib = 2**30
    rng = np.random.default_rng(0)
    voice = (rng.standard_normal((max(counts), 1920 * 8)) * 0.1).astype(np.float32)  # 8 frames per slot, cycled
    rows = []
    for n in counts:
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device) if cuda else 0
        try:
            with BatchedEngine(mimi, lm, slots=n) as engine:
                slots = [engine.open() for _ in range(n)]
                sync()
                state = torch.cuda.memory_allocated(device) - before if cuda else None
                times = []
                warmup = engine.facts.max_delay + 4  # as the server's warm-up: compile, CUDA graphs at this N
                for i in range(warmup + steps):
                    for slot in slots:
                        engine.feed(slot, voice[slot, (i % 8) * 1920:(i % 8 + 1) * 1920])
                    begin = time.perf_counter()
                    engine.step()
                    sync()
                    if i >= warmup:
                        times.append((time.perf_counter() - begin) * 1000)
                peak = torch.cuda.max_memory_allocated(device) if cuda else None
        except torch.cuda.OutOfMemoryError as exc:
            rows.append({"conversations": n, "out_of_memory": str(exc).splitlines()[0]})
            break
        p50, p95 = statistics.median(times), _percentile(times, 0.95)
        rows.append({
            "conversations": n, "steps": len(times), "step_ms_p50": round(p50, 2), "step_ms_p95": round(p95, 2),
            "real_time": p95 <= BUDGET_MS, "conversation_frames_per_s": round(n * 1000 / p50, 1),
            "state_gib": round(state / gib, 3) if cuda else None,
            "state_gib_per_conversation": round(state / gib / n, 3) if cuda else None,
            "allocated_gib": round((before + state) / gib, 2) if cuda else None,
            "peak_gib": round(peak / gib, 2) if cuda else None,
        })
    return {"budget_ms": BUDGET_MS, "formula_gib_per_conversation": round(per_conversation_bytes(kwargs) / gib, 3),
            "rows": rows}


def print_table(result: dict) -> None:
    table = result["conversations"]
    out = sys.stderr
    print(f"\n{result['gpu']}, {result['dtype']} ({result['weights']} weights), {result['lm_layers']} LM layers: "
          f"N conversations through BatchedEngine, budget {table['budget_ms']:g} ms a step; formula "
          f"{table['formula_gib_per_conversation']} GiB a conversation", file=out)
    print(f"{'N':>3} {'p50 ms':>8} {'p95 ms':>8} {'<=80ms':>7} {'conv fr/s':>10} {'state GiB':>10} {'GiB/conv':>9} "
          f"{'alloc GiB':>10} {'peak GiB':>9}", file=out)

    def gib(value) -> str:
        return "-" if value is None else f"{value:.2f}"

    for row in table["rows"]:
        if "out_of_memory" in row:
            print(f"{row['conversations']:>3} out of GPU memory", file=out)
            continue
        print(f"{row['conversations']:>3} {row['step_ms_p50']:>8.1f} {row['step_ms_p95']:>8.1f} "
              f"{'yes' if row['real_time'] else 'no':>7} {row['conversation_frames_per_s']:>10.1f} "
              f"{gib(row['state_gib']):>10} {gib(row['state_gib_per_conversation']):>9} "
              f"{gib(row['allocated_gib']):>10} {gib(row['peak_gib']):>9}", file=out)


def _counts(text: str) -> list[int]:
    counts = [int(part) for part in text.split(",") if part.strip()]
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give conversation counts like 1,4,8")
    return counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=250, help="80 ms frames to time (250 = 20 s)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--half", action="store_true", help="float16 instead of bfloat16 (pre-Ampere GPUs)")
    parser.add_argument("--quantize", choices=("bf16", "int8"), default="bf16")
    parser.add_argument("--layers", type=int, help="fewer LM layers than J-Moshi's 32 (smoke runs only)")
    parser.add_argument("--conversations", type=_counts, metavar="N,N,...",
                        help="also time `serve --conversations N` at each N (e.g. 1,4,8,16,32)")
    parser.add_argument("--conversation-steps", type=int, default=100, help="steps timed at each N (default 100)")
    parser.add_argument("--json", help="also write the result here")
    args = parser.parse_args(argv)
    result = run(args.frames, args.device, args.half, args.quantize == "int8", args.layers, args.conversations,
                 args.conversation_steps)
    text = json.dumps(result, indent=2)
    if "conversations" in result:
        print_table(result)
    print(text)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
