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
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Callable, TypeVar

T = TypeVar("T")


@dataclass
class Probe:
    """The outcome of one probe: a value, or why there is none."""

    ok: bool
    value: object = None
    error: str = ""


def bounded(fn: Callable[[], T], timeout_s: float) -> Probe:
    """Run fn in a daemon thread; give up after timeout_s (the thread is abandoned, not joined)."""
    box: list[Probe] = []

    def target() -> None:
        try:
            box.append(Probe(True, fn()))
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

    pynvml.nvmlInit()
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


def nvidia(timeout_s: float = 5.0) -> Probe:
    """GPUs through NVML (the driver's library): no torch, no CUDA context."""
    probe = bounded(_nvml, timeout_s)
    if not probe.ok and ("LibraryNotFound" in probe.error or "Shared Library Not Found" in probe.error):
        probe.error = "no NVIDIA driver found (libnvidia-ml.so is not installed)"
    elif not probe.ok and "DriverNotLoaded" in probe.error:
        probe.error = "the NVIDIA driver is installed but not loaded"
    return probe


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


def torch_cuda(timeout_s: float = 60.0) -> Probe:
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


def os_facts() -> dict[str, str]:
    return {"system": platform.system(), "machine": platform.machine(), "release": platform.release()}


def disk_free(path: Path) -> Probe:
    """Free bytes on the file system that holds path (or its nearest existing parent)."""
    target = Path(path).expanduser()
    while not target.exists() and target != target.parent:
        target = target.parent
    try:
        return Probe(True, shutil.disk_usage(target).free)
    except OSError as exc:
        return Probe(False, error=str(exc))


def port_free(host: str, port: int) -> Probe:
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


def http_reachable(url: str, timeout_s: float = 3.0) -> Probe:
    """Whether an HTTP server answers at url (any HTTP status counts as reachable)."""
    request = urllib.request.Request(url, method="HEAD", headers={"user-agent": "jmoshi-doctor"})
    token = os.environ.get("HF_TOKEN")
    if token:
        request.add_header("authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            return Probe(True, response.status)
    except urllib.error.HTTPError as exc:
        return Probe(True, exc.code)
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        return Probe(False, error=str(reason))
