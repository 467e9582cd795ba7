"""Download throughput: `jmoshi download` against `huggingface-cli download` of the same files from the
same loopback hub (the tiny model: ~200 MB in 4 files, plus the web UI bundle), fresh cache each run.

    .venv/bin/python bench/download.py [--repeat 3]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from jmoshi_cli.tiny_model import TINY_FILES

from _common import BIN, bench_env, tiny_hub_root
from hub_server import LocalHub


def run_once(argv: list[str], endpoint: str) -> tuple[float, int]:
    work = Path(tempfile.mkdtemp(prefix="jmoshi-bench-dl-"))
    try:
        env = bench_env(endpoint, work / "cache")
        started = time.perf_counter()
        done = subprocess.run(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        seconds = time.perf_counter() - started
        if done.returncode != 0:
            raise SystemExit(f"{argv[0]} failed: {done.stderr[-2000:]}")
        size = sum(p.stat().st_size for p in (work / "cache").rglob("*") if p.is_file() and not p.is_symlink())
        return seconds, size
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeat", type=int, default=3)
    repeat = parser.parse_args().repeat
    root = tiny_hub_root()
    with LocalHub(root) as hub:
        commands = {
            "jmoshi download --variant tiny": [str(BIN / "jmoshi"), "download", "--variant", "tiny"],
            "huggingface-cli download (same 5 files)": None,
        }
        results = {}
        for label, argv in commands.items():
            if argv is None:
                # huggingface-cli takes one repo per call: the model files, then the web UI bundle.
                argv = ["bash", "-c", f"{BIN}/huggingface-cli download jmoshi-test/tiny {' '.join(TINY_FILES)} "
                        f"&& {BIN}/huggingface-cli download kyutai/moshi-artifacts dist.tgz"]
            runs = [run_once(argv, hub.endpoint) for _ in range(repeat)]
            results[label] = (statistics.median(s for s, _ in runs), runs[0][1])
    base = results["huggingface-cli download (same 5 files)"][0]
    for label, (seconds, size) in results.items():
        print(f"{label:<42} {seconds:6.2f} s  {size / 1e6:7.1f} MB  {size / 1e6 / seconds:7.1f} MB/s  "
              f"x{seconds / base:.2f} of huggingface-cli")
    print("jmoshi's time includes the sha256 check of every file and unpacking the web UI bundle")


if __name__ == "__main__":
    main()
