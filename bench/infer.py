"""`jmoshi infer` on N files (one model load) against N runs of
`python -m moshi.run_inference --batch-size 1` on the same files and the same tiny artifacts, CPU.

    .venv/bin/python bench/infer.py [--files 4] [--seconds 3]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from jmoshi_cli import audio_io
from jmoshi_cli.audio_io import SAMPLE_RATE
from jmoshi_cli.selftest import speech_like

from _common import BIN, bench_env, tiny_hub_root
from hub_server import LocalHub


def write_inputs(folder: Path, count: int, seconds: float) -> list[Path]:
    import numpy as np

    paths = []
    for i in range(count):
        path = folder / f"input-{i}.wav"
        audio_io.write_wav(path, np.roll(speech_like(seconds), i * 1000), SAMPLE_RATE)
        paths.append(path)
    return paths


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--files", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=3.0)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="jmoshi-bench-infer-"))
    inputs = write_inputs(work, args.files, args.seconds)
    with LocalHub(tiny_hub_root()) as hub:
        env = bench_env(hub.endpoint, work / "cache")
        out = subprocess.run([str(BIN / "jmoshi"), "download", "--variant", "tiny", "--no-web-ui"], env=env,
                             capture_output=True, text=True, check=True).stdout.split()
    files = {Path(p).name: p for p in out}
    env["HF_HUB_OFFLINE"] = "1"

    started = time.perf_counter()
    subprocess.run([str(BIN / "jmoshi"), "infer", *map(str, inputs), "--variant", "tiny", "--device", "cpu",
                    "--offline", "--out", str(work / "jmoshi")], env=env, check=True, capture_output=True)
    ours = time.perf_counter() - started

    started = time.perf_counter()
    for path in inputs:
        subprocess.run([sys.executable, "-m", "moshi.run_inference", "--config", files["config.json"],
                        "--moshi-weight", files["model.safetensors"],
                        "--mimi-weight", files["tokenizer-e351c8d8-checkpoint125.safetensors"],
                        "--tokenizer", files["tokenizer_spm_32k_3.model"], "--device", "cpu", "--batch-size", "1",
                        str(path), str(work / f"{path.stem}.upstream.wav")], env=env, check=True,
                       capture_output=True)
    upstream = time.perf_counter() - started
    shutil.rmtree(work, ignore_errors=True)
    print(f"{args.files} files x {args.seconds:g} s, CPU, tiny model")
    print(f"jmoshi infer (one process, one load)          {ours:7.2f} s")
    print(f"moshi.run_inference --batch-size 1, {args.files} runs  {upstream:7.2f} s")
    print(f"ratio jmoshi / upstream: {ours / upstream:.2f}")


if __name__ == "__main__":
    main()
