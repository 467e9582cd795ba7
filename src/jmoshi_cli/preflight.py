"""Checks shared by serve and infer that run in seconds, before any download or model load.

Each failure is a JMoshiError with one line and a hint. What the checks decide (fp16 for an old GPU)
comes back as data, with the note a person should read kept beside it, never parsed from it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from . import hardware, runtime
from .errors import PreflightError, UsageError
from .model.precision import Precision


@dataclass(frozen=True)
class DeviceCheck:
    """What the device check decided, and what to tell the user about it."""

    half: bool = False
    precision: Precision = Precision.BF16  # never AUTO: int8 when asked, or when bf16 does not fit
    notes: tuple[str, ...] = ()


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


def check_runtime() -> runtime.Runtime:
    """Refuse a broken set of packages (the sphn trap, moshi or torch missing) with its exact fix."""
    rt = runtime.detect()
    fatal = rt.fatal()
    if fatal:
        raise PreflightError(fatal[0].detail, fatal[0].fix)
    return rt


def check_kernels(rt: runtime.Runtime, gpu: hardware.GPU) -> None:
    """Refuse, before any load, a GPU the installed torch has no kernels for (asked in a child process)."""
    if not gpu.capability:
        return
    probe = hardware.torch_cuda()
    if not probe.ok:
        raise PreflightError(f"torch could not be asked about CUDA: {probe.error}", "run `jmoshi doctor`")
    info = probe.value
    if not info.get("cuda"):
        raise PreflightError(f"torch {info.get('version')} is a CPU-only build", runtime.cpu_only_fix(rt))
    archs = runtime.parse_arch_flags(info.get("arch_flags") or info.get("arch_list"))
    problem = runtime.kernel_problem(rt, gpu.name, gpu.capability, archs, info.get("version"))
    if problem is not None:
        raise PreflightError(problem.detail, problem.fix)


def check_device(device: str, vram_min_gb: float, variant_name: str, precision: Precision = Precision.AUTO,
                 int8_gb: float | None = None) -> DeviceCheck:
    """Refuse a run that cannot work (packages, GPU, kernels, memory); choose fp16 for a pre-Ampere GPU
    and int8 when bf16 does not fit the GPU's free memory but int8 does (`int8_gb` given, `precision` auto)."""
    from .model import quantize

    rt = check_runtime()
    if precision is Precision.INT8:
        quantize.check_runtime(rt)
    if device == "cpu":
        chosen = Precision.INT8 if precision is Precision.INT8 else Precision.BF16
        return DeviceCheck(precision=chosen, notes=(
            "--device cpu: a 7B model on a CPU is far slower than real time (for tests and development)",))
    gpu = _gpu(device)
    chosen, notes = _precision_for(gpu, rt, vram_min_gb, variant_name, precision, int8_gb)
    check_kernels(rt, gpu)
    _, compile_note = runtime.compile_setup(device)
    notes += (compile_note,) if compile_note else ()
    if gpu.capability and gpu.capability < (8, 0):
        return DeviceCheck(half=True, precision=chosen, notes=notes + (
            f"{gpu.name} (cc {gpu.capability[0]}.{gpu.capability[1]}) lacks fast bfloat16: using --half",))
    return DeviceCheck(precision=chosen, notes=notes)


def _gpu(device: str) -> hardware.GPU:
    index = device_index(device)
    probe = hardware.nvidia()
    if not probe.ok or not probe.value.gpus:
        why = probe.error if not probe.ok else "the NVIDIA driver sees no GPU"
        raise PreflightError(f"no usable NVIDIA GPU: {why}",
                             "run `jmoshi doctor`; `--device cpu` starts anyway, far slower than real time")
    gpus = probe.value.gpus
    if index is not None and index >= len(gpus):
        raise UsageError(f"--device {device}: this machine has {len(gpus)} GPU(s)", "use cuda:0 .. cuda:N-1")
    return gpus[index] if index is not None else gpus[0]


def _precision_for(gpu: hardware.GPU, rt: runtime.Runtime, bf16_gb: float, variant_name: str,
                   precision: Precision, int8_gb: float | None) -> tuple[Precision, tuple[str, ...]]:
    """(precision, notes) for this GPU's free memory; PreflightError when neither fits."""
    free = gpu.free_bytes / 1e9
    int8_ok = int8_gb is not None and free >= int8_gb
    if precision is Precision.INT8:
        if int8_gb is not None and not int8_ok:
            raise PreflightError(f"{gpu.name} has {free:.1f} GB free; {variant_name} in int8 needs about "
                                 f"{int8_gb:g} GB",
                                 "stop other GPU processes (`nvidia-smi`), or pick another GPU with --device cuda:N")
        return Precision.INT8, ()
    if free >= bf16_gb:
        return Precision.BF16, ()
    can_int8 = precision is Precision.AUTO and int8_gb is not None and rt.has_int8 and rt.bitsandbytes is not None
    if can_int8 and int8_ok:
        return Precision.INT8, (f"{gpu.name} has {free:.1f} GB free, too little for bf16 (~{bf16_gb:g} GB): "
                      f"serving int8 (~{int8_gb:g} GB; --quantize bf16 to refuse instead)",)
    also = f" (bf16) or about {int8_gb:g} GB (int8)" if int8_gb is not None and rt.has_int8 else ""
    raise PreflightError(f"{gpu.name} has {free:.1f} GB free; {variant_name} needs about {bf16_gb:g} GB{also}",
                         "stop other GPU processes (`nvidia-smi`), or pick another GPU with --device cuda:N")


def device_index(device: str) -> int | None:
    if device == "cuda":
        return None
    match = re.fullmatch(r"cuda:(\d+)", device)
    if not match:
        raise UsageError(f"--device {device!r} is not cuda, cuda:N or cpu", "use --device cuda or --device cpu")
    return int(match.group(1))


def check_moshi_weight(path: Path | None) -> Path | None:
    """A local LM checkpoint: the file, or the one in a folder (nu-dialogue's model.safetensors,
    moshi-finetune's consolidated.safetensors)."""
    if path is None:
        return None
    path = path.expanduser()
    if path.is_dir():
        inside = [path / name for name in ("model.safetensors", "consolidated.safetensors") if (path / name).is_file()]
        if not inside:
            raise UsageError(f"--moshi-weight {path}: no model.safetensors or consolidated.safetensors in it",
                             "give the path of a .safetensors checkpoint")
        path = inside[0]
    if not path.is_file():
        raise UsageError(f"--moshi-weight {path}: no such file", "give the path of a .safetensors checkpoint")
    return path.resolve()
