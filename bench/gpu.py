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


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def run(frames: int, device: str, half: bool, int8: bool = False, layers: int | None = None) -> dict:
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
        mimi.streaming_forever(1)
        lm_gen.streaming_forever(1)
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
        "peak_vram_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if cuda else None,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=250, help="80 ms frames to time (250 = 20 s)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--half", action="store_true", help="float16 instead of bfloat16 (pre-Ampere GPUs)")
    parser.add_argument("--quantize", choices=("bf16", "int8"), default="bf16")
    parser.add_argument("--layers", type=int, help="fewer LM layers than J-Moshi's 32 (smoke runs only)")
    parser.add_argument("--json", help="also write the result here")
    args = parser.parse_args(argv)
    result = run(args.frames, args.device, args.half, args.quantize == "int8", args.layers)
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
