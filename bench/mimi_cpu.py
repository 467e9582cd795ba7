"""Mimi on the CPU, one frame at a time on one core: upstream's Mimi as moshi loads it against the same Mimi
with jmoshi's transposed convolutions (upstream.torch_cpu), in one run, and whether they decode the same audio.
Mimi has moshi's architecture whatever its weights: the tiny model's random Mimi measures the real one's cost.

    .venv/bin/python bench/mimi_cpu.py [--frames 40] [--repeat 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

from jmoshi_cli.audio_io import FRAME_SIZE

os.environ.setdefault("NO_TORCH_COMPILE", "1")  # as jmoshi runs moshi on the CPU


def per_frame(mimi, pcm, frames: int) -> tuple[float, float, list]:
    """Median ms per 80 ms frame to encode, and to decode what was encoded; the decoded frames."""
    import torch

    encode, decode, out = [], [], []
    with torch.no_grad(), mimi.streaming(1):
        for i in range(frames):
            frame = pcm[:, :, i * FRAME_SIZE:(i + 1) * FRAME_SIZE]
            started = time.perf_counter()
            codes = mimi.encode(frame)
            encode.append(time.perf_counter() - started)
            started = time.perf_counter()
            out.append(mimi.decode(codes))
            decode.append(time.perf_counter() - started)
    return statistics.median(encode) * 1e3, statistics.median(decode) * 1e3, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=40)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    import torch
    from moshi.models import loaders

    from jmoshi_cli.tiny_model import MIMI_NAME, cached_tiny_repo
    from jmoshi_cli.upstream import torch_cpu

    torch.set_num_threads(1)
    weights = str(cached_tiny_repo() / MIMI_NAME)
    upstream, mine = loaders.get_mimi(weights, device="cpu"), loaders.get_mimi(weights, device="cpu")
    changed = torch_cpu.fast_transposed_convs(mine)
    torch.manual_seed(0)
    pcm = 0.1 * torch.randn(1, 1, FRAME_SIZE * args.frames)
    rows = {"upstream Mimi": [], "jmoshi's": []}
    same = True
    for _ in range(args.repeat):
        a, b = per_frame(upstream, pcm, args.frames), per_frame(mine, pcm, args.frames)
        rows["upstream Mimi"].append(a[:2])
        rows["jmoshi's"].append(b[:2])
        same = same and all(torch.equal(x, y) for x, y in zip(a[2], b[2], strict=True))
    print(f"torch {torch.__version__}, one thread, {args.frames} frames x {args.repeat}; "
          f"{changed} transposed convolutions changed; the same audio: {same}")
    base = statistics.median(r[1] for r in rows["upstream Mimi"])
    for name, runs in rows.items():
        enc, dec = statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs)
        print(f"{name:15s} encode {enc:6.1f} ms  decode {dec:6.1f} ms per frame  (decode x{dec / base:.2f})")


if __name__ == "__main__":
    main()
