"""`jmoshi serve`: preflight in seconds, make every artifact local, then run moshi.server as a child.

Flow: options -> preflight (address, port, TLS, GPU; no model load) -> artifacts (cache, download)
-> Launch (argv and env, built by a pure function) -> Server (start, relay output, ready, stop).
"""

from __future__ import annotations

import collections
import ipaddress
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from . import hardware
from .artifacts import ModelFiles
from .errors import PreflightError, ServerError, UsageError

FRAME_LINE = re.compile(r"frame handled in ([0-9.]+)ms")


@dataclass(frozen=True)
class ServeOptions:
    variant: str | None = None
    host: str = "127.0.0.1"
    port: int = 8998
    device: str = "cuda"
    half: bool = False
    offline: bool = False
    https: bool = False
    ssl_dir: Path | None = None
    revision: str | None = None
    moshi_weight: Path | None = None


@dataclass(frozen=True)
class Launch:
    argv: list[str]
    env: dict[str, str]
    host: str
    port: int
    scheme: str
    notes: tuple[str, ...] = ()

    @property
    def url(self) -> str:
        return f"{self.scheme}://{url_host(self.host)}:{self.port}/"


def url_host(host: str) -> str:
    if host in ("0.0.0.0", ""):
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    return f"[{host}]" if ":" in host else host


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# --- preflight: each failure is one line, before any model load ----------------------------------


def check_address(host: str, port: int) -> None:
    if not 1 <= port <= 65535:
        raise UsageError(f"--port {port} is out of range", "use a port between 1024 and 65535, e.g. 8998")
    probe = hardware.port_free(host, port)
    if not probe.ok:
        raise UsageError(f"cannot listen on {host}:{port}: {probe.error}",
                         "use 127.0.0.1 (this machine), 0.0.0.0 (every interface) or one of this machine's addresses")
    if probe.value is False:
        raise PreflightError(f"port {port} on {host} is already in use",
                             f"stop the other server (`ss -ltnp | grep :{port}`) or pass --port {port + 1}")


def check_gpu(device: str, vram_min_gb: float, variant_name: str) -> list[str]:
    """Refuse a GPU run that cannot work; return notes (e.g. fp16 chosen for a pre-Ampere GPU)."""
    if device == "cpu":
        return ["--device cpu: a 7B model on a CPU is far slower than real time (for tests and development)"]
    index = _device_index(device)
    probe = hardware.nvidia()
    if not probe.ok or not probe.value.gpus:
        why = probe.error if not probe.ok else "the NVIDIA driver sees no GPU"
        raise PreflightError(f"no usable NVIDIA GPU: {why}",
                             "run `jmoshi doctor`; `--device cpu` starts anyway, far slower than real time")
    gpus = probe.value.gpus
    if index is not None and index >= len(gpus):
        raise UsageError(f"--device {device}: this machine has {len(gpus)} GPU(s)", "use cuda:0 .. cuda:N-1")
    gpu = gpus[index] if index is not None else gpus[0]
    if gpu.free_bytes < vram_min_gb * 1e9:
        raise PreflightError(
            f"{gpu.name} has {gpu.free_bytes / 1e9:.1f} GB free; {variant_name} needs about {vram_min_gb:g} GB",
            "stop other GPU processes (`nvidia-smi`), or pick another GPU with --device cuda:N")
    if gpu.capability and gpu.capability < (8, 0):
        return [f"{gpu.name} (cc {gpu.capability[0]}.{gpu.capability[1]}) lacks fast bfloat16: using --half"]
    return []


def _device_index(device: str) -> int | None:
    if device == "cuda":
        return None
    match = re.fullmatch(r"cuda:(\d+)", device)
    if not match:
        raise UsageError(f"--device {device!r} is not cuda, cuda:N or cpu", "use --device cuda or --device cpu")
    return int(match.group(1))


def needs_half(notes: list[str]) -> bool:
    return any("using --half" in note for note in notes)


def check_moshi_weight(path: Path | None) -> Path | None:
    if path is None:
        return None
    path = path.expanduser()
    if not path.is_file():
        raise UsageError(f"--moshi-weight {path}: no such file", "give the path of a .safetensors checkpoint")
    return path.resolve()


# --- the child's command line ----------------------------------------------------------------------


def build_launch(files: ModelFiles, static_dir: Path, repo: str, options: ServeOptions,
                 ssl_dir: Path | None, half: bool, base_env: dict[str, str] | None = None,
                 notes: tuple[str, ...] = ()) -> Launch:
    """Everything the child gets, as data: explicit local paths and an offline hub."""
    argv = [sys.executable, "-m", "jmoshi_cli._moshi_entry",
            "--host", options.host, "--port", str(options.port),
            "--hf-repo", repo,
            "--moshi-weight", str(files.moshi_weight),
            "--mimi-weight", str(files.mimi_weight),
            "--tokenizer", str(files.tokenizer),
            "--static", str(static_dir),
            "--device", options.device]
    if half:
        argv.append("--half")
    if ssl_dir is not None:
        argv += ["--ssl", str(ssl_dir)]
    env = dict(os.environ if base_env is None else base_env)
    env.update(HF_HUB_OFFLINE="1", JMOSHI_BIND_HOST=options.host, PYTHONUNBUFFERED="1")
    env.pop("JMOSHI_CONFIG_PATH", None)
    if files.config is not None:
        env["JMOSHI_CONFIG_PATH"] = str(files.config)
    return Launch(argv, env, options.host, options.port, "https" if ssl_dir else "http", notes)


# --- running ----------------------------------------------------------------------------------------

REASONS = [
    ("read_pcm", "sphn 0.2 is installed; moshi 0.2.2 needs the sphn 0.1 API", "pip install 'sphn>=0.1.4,<0.2'"),
    ("read_bytes", "sphn 0.2 is installed; moshi 0.2.2 needs the sphn 0.1 API", "pip install 'sphn>=0.1.4,<0.2'"),
    ("out of memory", "the GPU ran out of memory", "stop other GPU processes, or use a GPU with more memory"),
    ("no kernel image is available", "the installed torch has no kernels for this GPU", "run `jmoshi doctor`"),
    ("Found no NVIDIA driver", "no NVIDIA driver", "use --device cpu for a (slow) test run"),
    ("Address already in use", "the port was taken while the model loaded", "pass another --port"),
    ("size mismatch", "the checkpoint does not fit the model config", "check --moshi-weight and the variant"),
]


def explain_exit(code: int, tail: list[str]) -> ServerError:
    text = "\n".join(tail)
    for needle, reason, hint in REASONS:
        if needle in text:
            break
    else:
        last = next((line.strip() for line in reversed(tail) if line.strip()), "no output")
        reason, hint = last[:200], "see moshi.server's output above; JMOSHI_DEBUG=1 shows more"
    shown = code if code >= 0 else 128 - code
    return ServerError(f"moshi.server exited with code {shown}: {reason}", hint, exit_code=shown or 1)


class Server:
    """The child moshi.server: start it, relay its output, see when it listens, stop it cleanly."""

    def __init__(self, launch: Launch, relay: Callable[[str], None] | None = None):
        self.launch = launch
        self.relay = relay or (lambda line: (sys.stderr.write(line), sys.stderr.flush()))
        self.tail: collections.deque[str] = collections.deque(maxlen=60)
        self.frame_ms: list[float] = []
        self.process: subprocess.Popen | None = None
        self._reader: threading.Thread | None = None

    def start(self) -> "Server":
        # Own process group: a terminal's Ctrl-C reaches jmoshi, which stops the child in order.
        self.process = subprocess.Popen(self.launch.argv, env=self.launch.env, stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        self._reader = threading.Thread(target=self._pump, daemon=True)
        self._reader.start()
        return self

    def _pump(self) -> None:
        assert self.process and self.process.stdout
        for raw in iter(self.process.stdout.readline, b""):
            line = raw.decode("utf-8", "replace")
            self.tail.append(line.rstrip("\n"))
            match = FRAME_LINE.search(line)
            if match:
                self.frame_ms.append(float(match.group(1)))
            self.relay(line)

    def wait_ready(self, timeout_s: float = 1800.0) -> float:
        """Seconds until the port accepts connections; ServerError if the child dies first."""
        assert self.process
        started = time.monotonic()
        target = url_host(self.launch.host).strip("[]")
        while time.monotonic() - started < timeout_s:
            code = self.process.poll()
            if code is not None:
                self.drain()
                raise explain_exit(code, list(self.tail))
            try:
                with socket.create_connection((target, self.launch.port), timeout=0.5):
                    return time.monotonic() - started
            except OSError:
                time.sleep(0.1)
        self.stop()
        raise ServerError(f"moshi.server did not listen within {timeout_s:.0f} s", "see its output above")

    def drain(self) -> None:
        if self._reader is not None:
            self._reader.join(timeout=5)

    def stop(self, grace_s: float = 10.0) -> int | None:
        """SIGTERM, then SIGKILL after grace_s: never leave a child holding GPU memory."""
        process = self.process
        if process is None or process.poll() is not None:
            self.drain()
            return process.returncode if process else None
        try:
            os.killpg(process.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            process.wait(grace_s)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        self.drain()
        return process.returncode

    def __enter__(self) -> "Server":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


@dataclass
class Stop:
    """Which signal asked us to stop (SIGINT -> 130, SIGTERM -> 143), or why the child never got ready."""

    signum: int | None = None
    event: threading.Event = field(default_factory=threading.Event)
    error: ServerError | None = None


def supervise(server: Server, on_ready: Callable[[float], None]) -> int:
    """Run until the child exits or we get SIGINT/SIGTERM; return jmoshi's exit code."""
    stop = Stop()

    def handler(signum, _frame):
        stop.signum = signum
        stop.event.set()

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        server.start()
        ready = threading.Thread(target=_announce, args=(server, on_ready, stop), daemon=True)
        ready.start()
        while not stop.event.wait(0.2):
            if server.process.poll() is not None:
                break
        if stop.signum is not None:
            server.stop()
            return 128 + stop.signum
        ready.join(timeout=6)
        server.drain()
        if stop.error is not None:
            raise stop.error
        raise explain_exit(server.process.returncode, list(server.tail))
    finally:
        server.stop()
        for sig, old in previous.items():
            signal.signal(sig, old)


def _announce(server: Server, on_ready: Callable[[float], None], stop: Stop) -> None:
    try:
        seconds = server.wait_ready()
    except ServerError as exc:
        stop.error = exc
        return
    if not stop.event.is_set():
        on_ready(seconds)


def lan_addresses() -> list[str]:
    """IPv4 addresses of this machine's interfaces other than loopback (no packets sent)."""
    import fcntl
    import struct

    found = []
    for _, name in socket.if_nameindex():
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            try:
                packed = fcntl.ioctl(sock.fileno(), 0x8915, struct.pack("256s", name[:15].encode()))  # SIOCGIFADDR
            except OSError:
                continue
        address = socket.inet_ntoa(packed[20:24])
        if not ipaddress.ip_address(address).is_loopback:
            found.append(address)
    return found


def certificate_names(host: str) -> set[str]:
    names = {"localhost", "127.0.0.1", "::1", socket.gethostname()}
    if host not in ("0.0.0.0", "::", ""):
        names.add(host)
    else:
        names.update(lan_addresses())
    return names
