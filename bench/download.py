"""Download at real size: `jmoshi download` (sha256 verified) against `huggingface-cli download` (not
verified) of the same files from the same loopback hub, each into a fresh cache, in one run.

The model file is generated (default 3 GB, --size-gb to change it) with a J-Moshi-shaped repo around
it. The hub hashes its files for its metadata once, before any timing, so neither tool waits for it.

    .venv/bin/python bench/download.py [--size-gb 3] [--repeat 1] [--rate-mb-s 200]

Over loopback the hub sends as fast as the machine copies memory, so hashing (a third stream of work)
competes with the server and the client for the cores; `--rate-mb-s` paces the hub like a real
network link, where a client has time to spare.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from _common import BIN
from hub_server import LocalHub

REPO = "bench/big"
FILES = {"model.safetensors": None, "tokenizer-e351c8d8-checkpoint125.safetensors": 64 * 1024**2,
         "tokenizer_spm_32k_3.model": 800 * 1024}
BLOCK = 8 * 1024**2


def make_repo(root: Path, model_bytes: int) -> int:
    """Write the repo's files with incompressible content; return their total size."""
    folder = root / REPO
    folder.mkdir(parents=True)
    total = 0
    for name, size in FILES.items():
        size = size or model_bytes
        with (folder / name).open("wb") as out:
            left = size
            while left:
                left -= out.write(os.urandom(min(BLOCK, left)))
        total += size
    return total


def check_disk(where: Path, model_bytes: int) -> None:
    # The hub's copy plus one cache at a time (each run's cache is removed before the next), plus slack.
    need = 2 * model_bytes + 2 * 1024**3
    free = shutil.disk_usage(where).free
    if free < need:
        raise SystemExit(f"need {need / 1e9:.1f} GB free in {where}, have {free / 1e9:.1f} GB; lower --size-gb")


def environment(endpoint: str, work: Path) -> dict:
    variants = work / "variants.toml"
    variants.write_text(f'[variants.big]\nrepo = "{REPO}"\nvram_gb = 0\nvram_min_gb = 0\n')
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING", "JMOSHI_"))}
    env.update(HF_ENDPOINT=endpoint, HF_HUB_CACHE=str(work / "cache"), JMOSHI_HOME=str(work / "home"),
               JMOSHI_VARIANTS=str(variants), HF_HUB_DISABLE_TELEMETRY="1", HF_HUB_DISABLE_PROGRESS_BARS="1",
               NO_COLOR="1")
    return env


def run_once(argv: list[str], endpoint: str, scratch: Path) -> tuple[float, float]:
    """Wall seconds and CPU seconds (user + system) of one run into a fresh cache."""
    work = Path(tempfile.mkdtemp(prefix="run-", dir=scratch))
    try:
        env = environment(endpoint, work)
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        started = time.perf_counter()
        done = subprocess.run(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        seconds = time.perf_counter() - started
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        if done.returncode != 0:
            raise SystemExit(f"{argv[0]} failed: {done.stderr[-2000:]}")
        return seconds, after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    finally:
        shutil.rmtree(work, ignore_errors=True)


def warm(hub: LocalHub) -> None:
    """Make the hub hash its files (and read them into the page cache) before anything is timed."""
    from huggingface_hub import HfApi

    HfApi(endpoint=hub.endpoint).model_info(REPO, files_metadata=True)


def pace(hub: LocalHub, rate_mb_s: float) -> None:
    """Every GET of the next run sent at about `rate_mb_s` (the hub's "slow" fault, retuned)."""
    hub.slow_delay = 0.005
    hub.slow_chunk = max(int(rate_mb_s * 1e6 * hub.slow_delay), 64 * 1024)
    hub.add_fault(REPO, "*", "slow", times=len(FILES) * 4)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size-gb", type=float, default=3.0, help="size of the generated model file (GB)")
    parser.add_argument("--repeat", type=int, default=1, help="runs of each tool, alternating which goes first")
    parser.add_argument("--rate-mb-s", type=float, help="pace the hub's downloads to this many MB/s")
    args = parser.parse_args()
    model_bytes = int(args.size_gb * 1e9)
    scratch = Path(tempfile.mkdtemp(prefix="jmoshi-bench-dl-"))
    try:
        check_disk(scratch, model_bytes)
        total = make_repo(scratch / "hub", model_bytes)
        commands = {
            "huggingface-cli download": [str(BIN / "huggingface-cli"), "download", REPO, *FILES],
            "jmoshi download (verified)": [str(BIN / "jmoshi"), "download", "--variant", "big", "--no-web-ui"],
        }
        times: dict[str, list[tuple[float, float]]] = {label: [] for label in commands}
        with LocalHub(scratch / "hub") as hub:
            warm(hub)
            for i in range(args.repeat):
                order = list(commands) if i % 2 == 0 else list(reversed(commands))
                for label in order:
                    if args.rate_mb_s:
                        pace(hub, args.rate_mb_s)
                    times[label].append(run_once(commands[label], hub.endpoint, scratch))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    report(times, total, args.rate_mb_s)


def report(times: dict[str, list[tuple[float, float]]], total: int, rate_mb_s: float | None = None) -> None:
    walls = {label: statistics.median(wall for wall, _ in runs) for label, runs in times.items()}
    base = walls["huggingface-cli download"]
    count = len(next(iter(times.values())))
    link = f"hub paced to {rate_mb_s:g} MB/s" if rate_mb_s else "loopback hub"
    print(f"{len(FILES)} files, {total / 1e9:.2f} GB, {link}, median of {count} run(s); "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    for label, seconds in walls.items():
        runs = ", ".join(f"{wall:.1f}" for wall, _ in times[label])
        cpu = statistics.median(cpu for _, cpu in times[label])
        print(f"{label:<28} {seconds:7.2f} s  {total / 1e6 / seconds:7.1f} MB/s  x{seconds / base:.3f} of "
              f"huggingface-cli  (client CPU {cpu:.1f} s; runs: {runs} s)")


if __name__ == "__main__":
    main()
