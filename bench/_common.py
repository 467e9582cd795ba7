"""Helpers shared by the benchmarks: timing child processes, a loopback hub with the tiny model, `jmoshi serve`
in a child process (Served), and the memory checks of the benchmarks that load a full-size model on a shared
machine (MemAvailable, RSS, waiting for room)."""

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


# --- memory, for benchmarks that load a full-size model on a shared machine ------------------------------


def mem_available_bytes() -> int:
    """MemAvailable of /proc/meminfo (Linux): what can be allocated without swapping."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no MemAvailable in /proc/meminfo")


def rss_bytes() -> int:
    """This process's resident set (VmRSS)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def wait_for_memory(need_bytes: float, poll_s: float = 30.0, timeout_s: float = 1200.0) -> None:
    """Until MemAvailable >= need_bytes (others may be using the machine); SystemExit after timeout_s."""
    deadline = time.monotonic() + timeout_s
    while (free := mem_available_bytes()) < need_bytes:
        if time.monotonic() > deadline:
            raise SystemExit(f"MemAvailable {free / 2**30:.1f} GiB stayed below {need_bytes / 2**30:.1f} GiB "
                             f"for {timeout_s:g} s")
        print(f"MemAvailable {free / 2**30:.1f} GiB < {need_bytes / 2**30:.1f} GiB: waiting {poll_s:g} s",
              file=sys.stderr)
        time.sleep(poll_s)


# --- `jmoshi serve` in a child process -------------------------------------------------------------------


class Served:
    """`jmoshi --verbose serve ...` in its own process group: the URL it prints on stdout when ready, its
    stderr lines (the server's, per-frame "frame handled in N ms" lines included) as they come."""

    def __init__(self, args: list[str], env: dict):
        import threading

        self.process = subprocess.Popen([str(BIN / "jmoshi"), "--verbose", "serve", *args], env=env,
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                        start_new_session=True)
        self.started = time.perf_counter()
        self.out: list[str] = []
        self.err: list[str] = []
        self.readers = [threading.Thread(target=self._read, args=(stream, lines), daemon=True)
                        for stream, lines in ((self.process.stdout, self.out), (self.process.stderr, self.err))]
        for reader in self.readers:
            reader.start()

    @staticmethod
    def _read(stream, lines: list[str]) -> None:
        for line in stream:
            lines.append(line.rstrip("\n"))

    def wait_ready(self, timeout: float = 300) -> float:
        """Seconds from start to the URL line."""
        deadline = time.monotonic() + timeout
        while not any(line.strip() for line in self.out):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise SystemExit(f"jmoshi serve never became ready (exit {self.process.returncode}):\n"
                                 + "\n".join(self.err[-30:]))
            time.sleep(0.05)
        return time.perf_counter() - self.started

    def frame_times(self) -> list[float]:
        """ms of every "frame handled in" line so far (one per frame; one per tick with --conversations N)."""
        from jmoshi_cli.serving.server_log import frame_ms

        return [ms for ms in map(frame_ms, list(self.err)) if ms is not None]

    def stop(self) -> None:
        """SIGTERM to the group (jmoshi stops its child in order), SIGKILL if it lingers."""
        import signal

        try:
            os.killpg(self.process.pid, signal.SIGTERM)
            self.process.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        except ProcessLookupError:
            pass
        for reader in self.readers:
            reader.join(10)
