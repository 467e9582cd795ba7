"""Download at real size: `jmoshi download` (sha256 verified) against `huggingface-cli download` (not
verified) of the same files from the same loopback hub, each into a fresh cache, in one run.

The model file is generated (default 3 GB, --size-gb to change it) with a J-Moshi-shaped repo around
it. The hub hashes its files for its metadata once, before any timing, so neither tool waits for it.

    .venv/bin/python bench/download.py [--size-gb 3] [--repeat 3] [--rate-mb-s 0 1250 125] [--settle-s 6]

Each link rate is measured in turn: 0 is the loopback hub unpaced, any other paces every body the hub
sends to that many MB/s, like a network link (1250 MB/s is 10 Gbit/s), each connection on its own
as a CDN limits each one; both tools fetch a repo's files side by side, the small ones beside the
weights. Each run starts after a sync and a pause (`--settle-s`, see settle()), so that no run pays
for the one before it. Per link it reports each tool's median wall, the ratio, and the CPU seconds
of the client and of the hub (the hub runs in this process); first, how long sha256 alone takes
over the same files on one core, the least a verified download can take whatever the link.
The defaults take about six minutes.
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


def run_once(argv: list[str], endpoint: str, scratch: Path, settle_s: float) -> tuple[float, float, float]:
    """Wall seconds, the client's CPU seconds (user + system) and the hub's (this process), one run."""
    work = Path(tempfile.mkdtemp(prefix="run-", dir=scratch))
    try:
        env = environment(endpoint, work)
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        hub_before = resource.getrusage(resource.RUSAGE_SELF)
        started = time.perf_counter()
        done = subprocess.run(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        seconds = time.perf_counter() - started
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        hub_after = resource.getrusage(resource.RUSAGE_SELF)
        if done.returncode != 0:
            raise SystemExit(f"{argv[0]} failed: {done.stderr[-2000:]}")
        return seconds, _cpu(after) - _cpu(before), _cpu(hub_after) - _cpu(hub_before)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        settle(settle_s)


def settle(seconds: float) -> None:
    """Untimed: let what the last run wrote reach the disk and its memory go, so every run starts alike.

    Without the sync a run pays for its predecessor's gigabytes still being written back. The wait
    is for virtual machines that give freed memory back to their host (virtio-balloon free page
    reporting, after about 2 s): a run that starts sooner writes its cache into memory still backed,
    and takes a half or a third of the time of one that starts later, on the very same work.
    """
    os.sync()
    time.sleep(seconds)


def _cpu(usage: resource.struct_rusage) -> float:
    return usage.ru_utime + usage.ru_stime


def warm(hub: LocalHub) -> None:
    """Make the hub hash its files (and read them into the page cache) before anything is timed.

    Also compile both tools' modules, as an installed wheel has them: an editable install (and uv)
    leaves them to be compiled at each start where PYTHONDONTWRITEBYTECODE is set.
    """
    import compileall
    import importlib.util

    from huggingface_hub import HfApi

    HfApi(endpoint=hub.endpoint).model_info(REPO, files_metadata=True)
    for name in ("jmoshi_cli", "huggingface_hub", "requests", "urllib3", "typer", "click", "rich", "tqdm"):
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.submodule_search_locations:
            for folder in spec.submodule_search_locations:
                compileall.compile_dir(folder, quiet=1)


def sha256_alone(root: Path) -> float:
    """Seconds to sha256 the repo's files on one core from the page cache, with jmoshi's own file_hash.

    No verified download can end sooner than this after its first byte: a link faster than this
    rate (an unpaced loopback hub can be) leaves the hash, not the transfer, setting the wall.
    """
    from jmoshi_cli.cache.artifacts import file_hash

    started = time.perf_counter()
    for name in FILES:
        file_hash(root / REPO / name, "sha256")
    return time.perf_counter() - started


Runs = dict[str, list[tuple[float, float, float]]]


def run_link(hub: LocalHub, commands: dict[str, list[str]], rate_mb_s: float, repeat: int, scratch: Path,
             settle_s: float) -> Runs:
    """Both tools `repeat` times each, alternating which goes first, over a link of `rate_mb_s` (0: unpaced)."""
    hub.link_bytes_per_s = rate_mb_s * 1e6 if rate_mb_s else None
    times: Runs = {label: [] for label in commands}
    for i in range(repeat):
        order = list(commands) if i % 2 == 0 else list(reversed(commands))
        for label in order:
            times[label].append(run_once(commands[label], hub.endpoint, scratch, settle_s))
    return times


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size-gb", type=float, default=3.0, help="size of the generated model file (GB)")
    parser.add_argument("--repeat", type=int, default=3, help="runs of each tool per link, alternating the order")
    parser.add_argument("--rate-mb-s", type=float, nargs="+", default=[0, 1250, 125],
                        help="links to measure, in MB/s: 0 is the loopback unpaced, 1250 a 10 Gbit/s link, "
                             "125 a 1 Gbit/s one (default: all three)")
    parser.add_argument("--settle-s", type=float, default=6.0,
                        help="pause between runs, after a sync (see settle(); 0 to run back to back)")
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
        results: list[tuple[float, Runs]] = []
        with LocalHub(scratch / "hub") as hub:
            warm(hub)
            floor = min(sha256_alone(scratch / "hub") for _ in range(3))
            settle(args.settle_s)
            for rate in args.rate_mb_s:
                results.append((rate, run_link(hub, commands, rate, args.repeat, scratch, args.settle_s)))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    print(f"{len(FILES)} files, {total / 1e9:.2f} GB, median of {args.repeat} run(s) per tool and link; "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    print(f"sha256 of the files alone, one core, from memory: {floor:.2f} s ({total / 1e6 / floor:.0f} MB/s)")
    for rate, times in results:
        report(times, total, rate, floor)


def report(times: Runs, total: int, rate_mb_s: float, floor: float) -> None:
    walls = {label: statistics.median(wall for wall, _, _ in runs) for label, runs in times.items()}
    base = walls["huggingface-cli download"]
    link = f"link paced to {rate_mb_s:g} MB/s" if rate_mb_s else "loopback, unpaced"
    bound = " (faster than sha256 on one core: the hash sets the wall)" if base < floor else ""
    print(f"\n{link}: huggingface-cli moves {total / 1e6 / base:.0f} MB/s{bound}")
    for label, seconds in walls.items():
        runs = ", ".join(f"{wall:.2f}" for wall, _, _ in times[label])
        cpu = statistics.median(cpu for _, cpu, _ in times[label])
        hub_cpu = statistics.median(hub for _, _, hub in times[label])
        print(f"  {label:<28} {seconds:7.2f} s  x{seconds / base:.3f}  "
              f"(CPU: client {cpu:.1f} s, hub {hub_cpu:.1f} s; runs: {runs} s)")


if __name__ == "__main__":
    main()
