"""Machine probes. Each returns facts, never raises, and is bounded in time.

torch is never imported here: its CUDA facts come from a child process with a timeout, so a broken
driver or a slow import cannot hang or crash the caller.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Generic, TypeVar

T = TypeVar("T")


@dataclass
class Probe(Generic[T]):
    """The outcome of one probe: a value, or why there is none (then `value` is None)."""

    ok: bool
    value: T = None  # type: ignore[assignment]  # None exactly when not ok (and a few probes' False)
    error: str = ""


class ProbeFailure(Exception):
    """A probe's own account of why it has no value: its text is the probe's error as it is."""


def bounded(fn: Callable[[], T], timeout_s: float) -> Probe[T]:
    """Run fn in a daemon thread; give up after timeout_s (the thread is abandoned, not joined)."""
    box: list[Probe[T]] = []

    def target() -> None:
        try:
            box.append(Probe(True, fn()))
        except ProbeFailure as exc:
            box.append(Probe(False, error=str(exc)))
        except BaseException as exc:  # noqa: BLE001 - a probe reports, it never raises
            box.append(Probe(False, error=f"{type(exc).__name__}: {exc}".rstrip(": ")))

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(timeout_s)
    if not box:
        return Probe(False, error=f"no answer within {timeout_s:g} s")
    return box[0]


@dataclass
class GPU:
    index: int
    name: str
    total_bytes: int
    free_bytes: int
    capability: tuple[int, int] | None


@dataclass
class NvidiaFacts:
    driver: str = ""
    cuda_driver: str = ""
    gpus: list[GPU] = field(default_factory=list)


def _nvml() -> NvidiaFacts:
    import pynvml

    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError_LibraryNotFound:
        raise ProbeFailure("no NVIDIA driver found (libnvidia-ml.so is not installed)") from None
    except pynvml.NVMLError_DriverNotLoaded:
        raise ProbeFailure("the NVIDIA driver is installed but not loaded") from None
    try:
        facts = NvidiaFacts(driver=_text(pynvml.nvmlSystemGetDriverVersion()))
        try:
            version = pynvml.nvmlSystemGetCudaDriverVersion_v2()
            facts.cuda_driver = f"{version // 1000}.{version % 1000 // 10}"
        except pynvml.NVMLError:
            pass
        for index in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
            try:
                capability = tuple(pynvml.nvmlDeviceGetCudaComputeCapability(handle))
            except pynvml.NVMLError:
                capability = None
            name = _text(pynvml.nvmlDeviceGetName(handle))
            facts.gpus.append(GPU(index, name, int(memory.total), int(memory.free), capability))
        return facts
    finally:
        pynvml.nvmlShutdown()


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def nvidia(timeout_s: float = 5.0) -> Probe[NvidiaFacts]:
    """GPUs through NVML (the driver's library): no torch, no CUDA context."""
    return bounded(_nvml, timeout_s)


_TORCH_SCRIPT = """
import json, torch
out = {"version": torch.__version__, "cuda": torch.version.cuda, "available": torch.cuda.is_available(),
       "arch_list": [], "arch_flags": "", "bf16": None, "devices": []}
try:  # the architectures the build has kernels for, known without a GPU (get_arch_list() needs one)
    out["arch_flags"] = torch._C._cuda_getArchFlags() or ""
except Exception:
    pass
if out["available"]:
    out["arch_list"] = torch.cuda.get_arch_list()
    out["bf16"] = torch.cuda.is_bf16_supported()
    out["devices"] = [list(torch.cuda.get_device_capability(i)) for i in range(torch.cuda.device_count())]
print(json.dumps(out))
"""


def torch_cuda(timeout_s: float = 60.0) -> Probe[dict[str, Any]]:
    """What the installed torch can do with CUDA, asked in a child process."""
    try:
        done = subprocess.run(
            [sys.executable, "-c", _TORCH_SCRIPT], capture_output=True, text=True, timeout=timeout_s
        )
    except subprocess.TimeoutExpired:
        return Probe(False, error=f"importing torch took longer than {timeout_s:g} s")
    except OSError as exc:
        return Probe(False, error=str(exc))
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["torch failed to start"])[-1]
        return Probe(False, error=last)
    try:
        return Probe(True, json.loads(done.stdout.strip().splitlines()[-1]))
    except (ValueError, IndexError):
        return Probe(False, error="unexpected output from torch")


def package_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


@dataclass
class AppleFacts:
    """An Apple Silicon Mac, for the MLX backend: memory is shared by the CPU and the GPU (unified)."""

    chip: str  # e.g. "Apple M3 Pro"
    memory_bytes: int
    macos: str  # e.g. "14.5"
    mlx: str | None = None  # the installed mlx version
    metal: bool | None = None  # MLX sees the Metal GPU (None: mlx not importable)


def apple(timeout_s: float = 10.0) -> Probe[AppleFacts]:
    """The Mac's chip, unified memory, macOS and MLX/Metal; not ok anywhere else."""
    if sys.platform != "darwin" or platform.machine() != "arm64":
        return Probe(False, error=f"not an Apple Silicon Mac ({platform.system()} {platform.machine()})")
    return bounded(_apple, timeout_s)


def _apple() -> AppleFacts:
    def sysctl(name: str) -> str:
        return subprocess.run(["sysctl", "-n", name], capture_output=True, text=True, check=True).stdout.strip()

    facts = AppleFacts(sysctl("machdep.cpu.brand_string"), int(sysctl("hw.memsize")), platform.mac_ver()[0])
    facts.mlx = package_version("mlx")
    if facts.mlx is not None:
        # Asked in a child: importing mlx here would cost every doctor run its start-up.
        done = subprocess.run([sys.executable, "-c", "import mlx.core as mx; print(mx.metal.is_available())"],
                              capture_output=True, text=True)
        facts.metal = done.returncode == 0 and done.stdout.strip() == "True"
    return facts


def memory_total() -> int | None:
    """Bytes of memory this machine has (unified memory on a Mac)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def os_facts() -> dict[str, str]:
    return {"system": platform.system(), "machine": platform.machine(), "release": platform.release()}


def disk_free(path: Path) -> Probe[int]:
    """Free bytes on the file system that holds path (or its nearest existing parent)."""
    target = Path(path).expanduser()
    while not target.exists() and target != target.parent:
        target = target.parent
    try:
        return Probe(True, shutil.disk_usage(target).free)
    except OSError as exc:
        return Probe(False, error=str(exc))


def port_free(host: str, port: int) -> Probe[bool]:
    """Whether we could listen on host:port right now (value True/False; error for a bad address)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (socket.gaierror, UnicodeError, OverflowError) as exc:
        return Probe(False, error=f"cannot resolve host {host!r}: {exc}")
    family, _, _, _, address = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(address)
        except OverflowError as exc:
            return Probe(False, error=str(exc))
        except OSError as exc:
            if exc.errno in (98, 48):  # EADDRINUSE on Linux, macOS
                return Probe(True, False, error="in use")
            return Probe(False, error=exc.strerror or str(exc))
    return Probe(True, True)
