"""Helpers shared by the benchmarks: timing child processes, a loopback hub with the tiny model."""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
# The loopback hub is test support (tests/hub_server.py); the benchmarks borrow it from there.
sys.path.insert(0, str(ROOT / "tests"))


def timed(argv: list[str], env: dict | None = None, repeat: int = 5) -> tuple[float, int]:
    """Median wall seconds of a command over `repeat` runs, and its last exit code."""
    times, code = [], 0
    for _ in range(repeat):
        started = time.perf_counter()
        code = subprocess.run(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode
        times.append(time.perf_counter() - started)
    return statistics.median(times), code


def tiny_hub_root() -> Path:
    from jmoshi_cli.tiny_model import TINY_FILES, build_web_ui_bundle, cached_tiny_repo

    repo = cached_tiny_repo()
    root = Path(tempfile.mkdtemp(prefix="jmoshi-bench-hub-"))
    (root / "jmoshi-test" / "tiny").mkdir(parents=True)
    for name in TINY_FILES:
        (root / "jmoshi-test" / "tiny" / name).symlink_to(repo / name)
    build_web_ui_bundle(root / "kyutai" / "moshi-artifacts" / "dist.tgz")
    return root


# The token every server a benchmark starts checks (JMOSHI_TOKEN), and its clients send.
BENCH_TOKEN = "jmoshi-bench-token-0123456789"


def bench_env(endpoint: str, cache: Path) -> dict:
    variants = cache.parent / "variants.toml"
    variants.write_text('[variants.tiny]\nrepo = "jmoshi-test/tiny"\nvram_gb = 0\nvram_min_gb = 0\n')
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "JMOSHI_"))}
    env.update(HF_ENDPOINT=endpoint, HF_HUB_CACHE=str(cache), JMOSHI_HOME=str(cache.parent / "home"),
               JMOSHI_VARIANTS=str(variants), HF_HUB_DISABLE_TELEMETRY="1", NO_COLOR="1", JMOSHI_TOKEN=BENCH_TOKEN)
    return env


def emit_json(result: dict, path: str | None) -> None:
    """The benchmark's result on stdout, and in `path` too when given (--json)."""
    import json

    text = json.dumps(result, indent=2)
    print(text)
    if path:
        Path(path).write_text(text + "\n")
