"""Time to "ready" and per-frame handling: `jmoshi serve --device cpu` against running moshi.server
directly on the same local files, in one run, on this machine's CPU.

Upstream 0.2.2 cannot start on a CPU as is (its warm-up calls torch.cuda.synchronize()); the direct
run gets only that one call neutralised, nothing else. jmoshi runs with --verbose, so that its log
holds upstream's per-frame lines as they were written (without it they become periodic summaries).

    .venv/bin/python bench/serve.py [--repeat 3] [--seconds 4]
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from jmoshi_cli.selftest import free_port, speech_like
from jmoshi_cli.serving.chat import chat_sync
from jmoshi_cli.serving.server_log import frame_ms

from _common import BENCH_TOKEN, BIN, bench_env, tiny_hub_root
from hub_server import LocalHub

UPSTREAM = ("import torch, runpy; torch.cuda.synchronize = lambda *a, **k: None; "
            "runpy.run_module('moshi.server', run_name='__main__')")


def wait_port(port: int, process: subprocess.Popen, timeout: float = 300) -> float:
    started = time.perf_counter()
    while time.perf_counter() - started < timeout:
        if process.poll() is not None:
            raise SystemExit(f"server exited: {process.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return time.perf_counter() - started
        except OSError:
            time.sleep(0.05)
    raise SystemExit("server never listened")


def measure(argv: list[str], env: dict, port: int, pcm) -> tuple[float, list[float], int]:
    """Time to listening, per-frame times from the log, audio received. The process (jmoshi, or
    upstream directly) leads its own group; SIGTERM lets jmoshi stop its child in order."""
    log = tempfile.TemporaryFile()
    started = time.perf_counter()
    process = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_port(port, process)
        ready = time.perf_counter() - started
        result = chat_sync(f"ws://127.0.0.1:{port}/api/chat", pcm, tail_s=3.0, token=BENCH_TOKEN)
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    log.seek(0)
    lines = log.read().decode("utf-8", "replace").splitlines()
    frames = [ms for ms in map(frame_ms, lines) if ms is not None]
    return ready, frames, result.audio_samples


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=4.0)
    args = parser.parse_args()
    pcm = speech_like(args.seconds)
    work = Path(tempfile.mkdtemp(prefix="jmoshi-bench-serve-"))
    with LocalHub(tiny_hub_root()) as hub:
        env = bench_env(hub.endpoint, work / "cache")
        out = subprocess.run([str(BIN / "jmoshi"), "download", "--variant", "tiny"], env=env, capture_output=True,
                             text=True, check=True).stdout.split()
    files = {Path(p).name: p for p in out}
    static = str(Path(files["dist.tgz"]).parent / "dist")
    results: dict[str, list] = {"jmoshi serve": [], "moshi.server direct": []}
    for _ in range(args.repeat):
        port = free_port()
        results["jmoshi serve"].append(measure(
            [str(BIN / "jmoshi"), "--verbose", "serve", "--variant", "tiny", "--device", "cpu", "--port", str(port),
             "--offline"],
            env, port, pcm))
        port = free_port()
        direct_env = dict(env, HF_HUB_OFFLINE="1")
        results["moshi.server direct"].append(measure(
            [sys.executable, "-c", UPSTREAM, "--port", str(port), "--device", "cpu", "--hf-repo", "jmoshi-test/tiny",
             "--moshi-weight", files["model.safetensors"], "--mimi-weight",
             files["tokenizer-e351c8d8-checkpoint125.safetensors"], "--tokenizer", files["tokenizer_spm_32k_3.model"],
             "--static", static], direct_env, port, pcm))
    shutil.rmtree(work, ignore_errors=True)
    summary = {}
    for label, runs in results.items():
        ready = statistics.median(r for r, _, _ in runs)
        frames = [f for _, fs, _ in runs for f in fs]
        summary[label] = (ready, statistics.median(frames), statistics.mean(frames), len(frames))
    base = summary["moshi.server direct"]
    print(f"{args.repeat} runs each, {args.seconds:g} s of audio per conversation, CPU, tiny model")
    for label, (ready, median, mean, n) in summary.items():
        print(f"{label:<22} ready {ready:6.2f} s (x{ready / base[0]:.2f})   per frame median {median:6.1f} ms, "
              f"mean {mean:6.1f} ms over {n} frames (x{median / base[1]:.2f})")


if __name__ == "__main__":
    main()
