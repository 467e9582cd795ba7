"""`jmoshi doctor`: gather facts about the machine (bounded probes), then judge them (pure functions).

`gather` is the only part that touches the machine; `evaluate` turns Facts into Checks and is tested
with made-up facts for hardware this project's CI does not have (GPUs).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import asdict, dataclass, field
from enum import Enum
from typing import Any

from . import hardware, runtime
from .cache.artifacts import Status
from .hardware import GPU, NvidiaFacts, Probe
from .variants import Catalogue, Variant


class Level(str, Enum):
    OK = "OK"
    WARN = "WARN"
    FAIL = "FAIL"


OK, WARN, FAIL = Level.OK, Level.WARN, Level.FAIL
# Rough download size of a Moshi 7B variant (weights, Mimi, tokenizer, web UI) when the hub cannot tell.
ESTIMATED_7B_BYTES = 16_000_000_000

# The packages checked against what the installed runtime is tested with (runtime.TESTED).
CHECKED_PACKAGES = ("moshi", "sphn", "torch", "huggingface_hub")


@dataclass(frozen=True)
class CompileFacts:
    """What torch.compile on a GPU needs (triton builds a C launcher): see runtime.compile_env."""

    c_compiler: str | None = "gcc"
    python_headers: bool = True
    disabled: bool = False  # NO_TORCH_COMPILE is set


@dataclass
class Check:
    name: str
    status: Level
    detail: str
    hint: str = ""


@dataclass(frozen=True)
class CacheRow:
    filename: str
    status: "Status"
    hashed: bool  # its content was hashed and matched by jmoshi before (else: put there by another tool)

    @property
    def label(self) -> str:
        return "present" if self.status is Status.COMPLETE and not self.hashed else self.status.value


@dataclass
class Facts:
    os: dict
    python: tuple[int, int, int]
    packages: dict[str, str | None]
    nvidia: Probe[NvidiaFacts]
    torch: Probe[dict[str, Any]] | None
    disk: Probe[int]
    cache: Probe[list[CacheRow]]  # the variant's files, from the cache alone
    missing_bytes: int | None
    hub: Probe[int] | None  # None when offline mode is on
    endpoint: str
    port: Probe[bool]
    host: str
    port_number: int
    extra: dict = field(default_factory=dict)
    haproxy: Probe[Any] | None = None  # value: haproxy.Version; error: why it cannot be used
    compile: CompileFacts = field(default_factory=CompileFacts)
    apple: Probe[hardware.AppleFacts] | None = None  # on Apple Silicon: chip, unified memory, macOS, MLX
    # The state one more conversation on a loaded J-Moshi holds (engine.memory, moshi's built-in 7B kwargs);
    # None where not asked (no NVIDIA GPU, or no moshi).
    conversation_bytes: Probe[int] | None = None

    @property
    def on_mac(self) -> bool:
        return self.apple is not None and self.apple.ok

    @property
    def runtime(self) -> runtime.Runtime:
        return runtime.Runtime.from_versions(self.packages)


def gather(catalogue: Catalogue, variant: Variant, host: str = "127.0.0.1", port: int = 8998) -> Facts:
    from .cache import artifacts, hub

    packages = {**runtime.installed_versions(), "jmoshi": hardware.package_version("jmoshi")}
    apple = hardware.apple()
    nvidia = hardware.nvidia() if not apple.ok else Probe(False, error="an Apple Silicon Mac has no NVIDIA GPU")
    has_gpu = nvidia.ok and bool(nvidia.value.gpus)
    sizing = start_conversation_probe() if has_gpu and packages["moshi"] else None  # beside torch's probe
    torch = hardware.torch_cuda() if has_gpu and packages["torch"] else None
    conversation = conversation_size(sizing) if sizing is not None else None
    offline = hub.offline_env()
    reach = None
    if not offline:
        reach = hub_reachable(f"{hub.endpoint()}/api/models/{variant.repo}", hub.token())
    plan = hardware.bounded(
        lambda: artifacts.resolve(catalogue, variant, offline=offline or not (reach and reach.ok)), 20)
    cache, missing = _cache_facts(plan)
    return Facts(
        os=hardware.os_facts(), python=sys.version_info[:3], packages=packages, nvidia=nvidia,
        torch=torch, disk=hardware.disk_free(hub.cache_dir()), cache=cache, missing_bytes=missing,
        hub=reach, endpoint=hub.endpoint(), port=hardware.port_free(host, port), host=host, port_number=port,
        extra={"cache_dir": str(hub.cache_dir()), "offline": offline}, haproxy=haproxy_probe(),
        compile=CompileFacts(runtime.c_compiler(), runtime.python_headers(), runtime.NO_COMPILE_ENV in os.environ),
        apple=apple, conversation_bytes=conversation)


# moshi's built-in 7B kwargs need moshi, thus torch: asked in a child process (as torch itself is), so that a
# broken install cannot take the doctor down, and only where an NVIDIA GPU is there to size.
_CONVERSATION_SCRIPT = """
from jmoshi_cli.engine.memory import per_conversation_bytes
from jmoshi_cli.model.lm_config import lm_kwargs
print(per_conversation_bytes(lm_kwargs(None)))
"""


def start_conversation_probe() -> subprocess.Popen | Probe[int]:
    try:
        return subprocess.Popen([sys.executable, "-c", _CONVERSATION_SCRIPT], stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    except OSError as exc:
        return Probe(False, error=str(exc))


def conversation_size(child: subprocess.Popen | Probe[int], timeout_s: float = 60.0) -> Probe[int]:
    """What one more conversation costs on J-Moshi, from the child `start_conversation_probe` started."""
    if isinstance(child, Probe):
        return child
    try:
        out, err = child.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        child.kill()
        child.communicate()
        return Probe(False, error=f"importing moshi took longer than {timeout_s:g} s")
    if child.returncode != 0:
        return Probe(False, error=(err.strip().splitlines() or ["moshi failed to start"])[-1])
    try:
        return Probe(True, int(json.loads(out.strip().splitlines()[-1])))
    except (ValueError, IndexError, TypeError):
        return Probe(False, error="unexpected output from moshi")


class _TokenStaysHome(urllib.request.HTTPRedirectHandler):
    """Follows a redirect without the Authorization header once it leaves the hub's scheme and host: urllib
    copies every header onto the next request, and the hub sends downloads on to a CDN that must not see
    HF_TOKEN (nor see it in plain HTTP after an https hub)."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        new = super().redirect_request(req, fp, code, msg, headers, newurl)
        if new is not None and _origin(new.full_url) != _origin(req.full_url):
            new.remove_header("Authorization")
        return new


def _origin(url: str) -> tuple[str, str]:
    parts = urllib.parse.urlsplit(url)
    return parts.scheme.lower(), parts.netloc.lower()


def hub_reachable(url: str, token: str | None, timeout_s: float = 3.0) -> Probe[int]:
    """Whether the hub answers at url (any HTTP status counts), with the token sent to the hub's host alone."""
    request = urllib.request.Request(url, method="HEAD", headers={"user-agent": "jmoshi-doctor"})
    if token:
        request.add_header("authorization", f"Bearer {token}")
    try:
        with urllib.request.build_opener(_TokenStaysHome()).open(request, timeout=timeout_s) as response:
            return Probe(True, response.status)
    except urllib.error.HTTPError as exc:
        return Probe(True, exc.code)
    except (urllib.error.URLError, OSError, ValueError) as exc:
        return Probe(False, error=str(getattr(exc, "reason", exc)))


def haproxy_probe() -> Probe[Any]:
    from .errors import JMoshiError
    from .serving import haproxy

    try:
        return Probe(True, haproxy.find())
    except JMoshiError as exc:
        return Probe(False, error=exc.message)


def _cache_facts(plan: Probe[Any]) -> tuple[Probe[list[CacheRow]], int | None]:
    from .cache import artifacts

    if not plan.ok:
        return Probe(False, error=plan.error), None
    rows = [CacheRow(entry.artifact.filename, entry.status,
                     entry.status is Status.COMPLETE and artifacts.is_stamped(entry.path))
            for entry in plan.value.entries]
    sizes_known = all(e.artifact.size is not None for e in plan.value.missing)
    missing = plan.value.missing_bytes if sizes_known else None
    return Probe(True, rows), missing


def evaluate(facts: Facts, variant: Variant) -> list[Check]:
    rt = facts.runtime
    checks = [_os(facts), _python(facts), _runtime(rt)]
    checks += [_package(name, facts.packages.get(name), rt) for name in CHECKED_PACKAGES]
    checks += _mac_checks(facts, variant) if facts.on_mac else _gpu_checks(facts, variant)
    checks += [_disk(facts), _cache(facts, variant), _hub(facts), _port(facts)]
    if facts.haproxy is not None:
        checks.append(_haproxy(facts.haproxy))
    return checks


def _os(facts: Facts) -> Check:
    system, machine = facts.os.get("system"), facts.os.get("machine")
    if facts.apple is not None and facts.apple.ok:
        return Check("os", OK, f"macOS {facts.apple.value.macos} on {facts.apple.value.chip} (the MLX backend)")
    if system == "Linux" and machine in ("x86_64", "AMD64"):
        return Check("os", OK, f"Linux {machine}")
    if system == "Linux":
        return Check("os", WARN, f"Linux {machine}: not tested", "jmoshi is tested on Linux x86_64")
    why = {"Darwin": "an Intel Mac has neither CUDA nor Apple Silicon for MLX",
           "Windows": "moshi's server and its audio stack are only tested here on Linux"}
    return Check("os", FAIL, why.get(system or "", f"{system} is not supported"),
                 "use a Linux x86_64 machine with an NVIDIA GPU (24 GB), or WSL2 on Windows")


def _mac_checks(facts: Facts, variant: Variant) -> list[Check]:
    """Apple Silicon: MLX and Metal, and which precision fits the unified memory (the NVIDIA rows do not apply)."""
    from .backends.mlx import need_gb, pick
    from .errors import PreflightError
    from .model.precision import Precision

    assert facts.apple is not None  # called only when facts.on_mac
    mac = facts.apple.value
    memory_gb = mac.memory_bytes / 1e9
    if mac.mlx is None:
        mlx = Check("mlx", FAIL, "MLX is not installed", "reinstall jmoshi on this Mac: pip install .")
    elif not mac.metal:
        mlx = Check("mlx", FAIL, f"mlx {mac.mlx} does not see the Metal GPU", "update macOS (MLX needs 13.5 or newer)")
    else:
        mlx = Check("mlx", OK, f"mlx {mac.mlx}, Metal GPU")
    sizes = ", ".join(f"{p.value} ~{need_gb(variant.lm_gb, p):.1f} GB"
                      for p in (Precision.BF16, Precision.INT8, Precision.INT4))
    try:
        precision, _ = pick(memory_gb, variant.lm_gb, Precision.AUTO)
    except PreflightError as exc:
        return [mlx, Check("memory", FAIL, f"{memory_gb:.0f} GB unified memory: {exc.message}", exc.hint)]
    level = OK if precision is Precision.BF16 else WARN
    return [mlx, Check("memory", level, f"{memory_gb:.0f} GB unified memory: {variant.name} fits {precision.value} "
                                         f"({sizes}); `jmoshi serve` picks it by itself",
                       "" if level is OK else "--quantize bf16 needs a Mac with more memory")]


def _python(facts: Facts) -> Check:
    version = ".".join(map(str, facts.python))
    if (3, 10) <= facts.python[:2] <= (3, 12):
        return Check("python", OK, version)
    return Check("python", FAIL, f"{version}: jmoshi and its runtimes are tested on Python 3.10-3.12",
                 "create the environment with python3.10, 3.11 or 3.12")


def _runtime(rt: runtime.Runtime) -> Check:
    """Which of the two tested runtimes is installed (current: Volta to Blackwell; documented: up to Hopper)."""
    serves = {runtime.CURRENT: "GPUs from Volta (sm_70) to Blackwell (sm_120)",
              runtime.DOCUMENTED: "GPUs from Maxwell (sm_50) to Hopper (sm_90), not Blackwell"}
    if rt.moshi is None:
        return Check("runtime", FAIL, "moshi is not installed", "reinstall jmoshi: pip install .")
    if rt.kind == runtime.UNTESTED:
        return Check("runtime", WARN, rt.label, f"install a tested runtime: {runtime.INSTALL[rt.family]}")
    return Check("runtime", OK, f"{rt.label} ({serves[rt.kind]})")


def _package(name: str, version: str | None, rt: runtime.Runtime) -> Check:
    low, high = runtime.TESTED[rt.family][name]
    wanted = f">={low},<{high}"
    problem = next((p for p in rt.problems() if p.key == name), None)
    if problem is not None and problem.fatal:
        return Check(name, FAIL, problem.detail, problem.fix)
    if version is None:
        return Check(name, FAIL, "not installed", f"pip install '{name}{wanted}' (or reinstall jmoshi)")
    if runtime.in_range(version, low, high):
        return Check(name, OK, version)
    return Check(name, WARN, f"{version}: the {rt.family} runtime is tested with {name}{wanted}",
                 f"pip install '{name}{wanted}'")


def _gpu_checks(facts: Facts, variant: Variant) -> list[Check]:
    if not facts.nvidia.ok:
        return [Check("gpu", FAIL, facts.nvidia.error + ": J-Moshi needs an NVIDIA GPU",
                      f"use a machine with an NVIDIA GPU of {variant.vram_gb:g} GB; `--device cpu` works "
                      "for tests but a 7B model on a CPU is far from real time")]
    gpus: list[GPU] = facts.nvidia.value.gpus
    if not gpus:
        return [Check("gpu", FAIL, "the NVIDIA driver sees no GPU",
                      "check `nvidia-smi` and the container's --gpus flag")]
    best = max(gpus, key=lambda g: g.free_bytes)
    listing = "; ".join(f"{g.index}: {g.name}, {_gb(g.total_bytes)} total, {_gb(g.free_bytes)} free, "
                        f"cc {_cc(g.capability)}" for g in gpus)
    nvidia = facts.nvidia.value
    cuda = f" (CUDA {nvidia.cuda_driver})" if nvidia.cuda_driver else ""
    checks = [Check("gpu", OK, f"driver {nvidia.driver}{cuda}; {listing}")]
    checks.append(_torch_cuda(facts, best))
    checks.append(_compiler(facts))
    checks.append(_bf16(best))
    checks.append(_vram(best, variant, facts.runtime))
    checks += [_fits(gpu, variant, facts.runtime) for gpu in gpus]
    if facts.conversation_bytes is not None:
        checks += _conversations(gpus, variant, facts.runtime, facts.conversation_bytes)
    return checks


def _conversations(gpus: list[GPU], variant: Variant, rt: runtime.Runtime, per: Probe[int]) -> list[Check]:
    """Per GPU, from its total memory: how many conversations `serve --conversations` holds on one model,
    in bf16 and in int8 (informational: the vram and fit rows judge whether J-Moshi runs at all)."""
    from .engine import memory

    if not per.ok:
        return [Check("conversations", WARN, f"cannot size a conversation: {per.error}",
                      "`jmoshi serve --conversations auto` sizes them itself when it starts")]
    each = per.value
    later = "" if rt.has_slot_masks else f"; --conversations needs moshi 0.2.5 or later, this runtime has {rt.moshi}"
    hint = "" if rt.has_slot_masks else f"install the current runtime: {runtime.INSTALL[runtime.CURRENT]}"
    checks = []
    for gpu in gpus:
        bf16 = memory.fit_measured(gpu.total_bytes, variant.vram_min_gb, each)
        counts = [f"{bf16} in bf16"]
        if variant.lora:
            counts.append("int8 not for a LoRA variant")
        elif rt.has_int8:
            counts.append(f"{memory.fit_measured(gpu.total_bytes, variant.vram_min_int8_gb, each)} in int8")
        else:
            counts.append("int8 needs the current runtime")
        checks.append(Check(f"conversations:{gpu.index}", OK,
                            f"cuda:{gpu.index} {gpu.name}, {_gb(gpu.total_bytes)} total: conversations at once on "
                            f"one loaded {variant.name}: {', '.join(counts)} ({each / 1e9:.2f} GB each){later}", hint))
    return checks


def _fits(gpu: GPU, variant: Variant, rt: runtime.Runtime) -> Check:
    """Per GPU, from its free memory now: fits bf16, fits int8 only, or does not fit."""
    free, name = gpu.free_bytes / 1e9, f"fit:{gpu.index}"
    where = f"cuda:{gpu.index} {gpu.name}, {_gb(gpu.free_bytes)} free"
    if free >= variant.vram_min_gb:
        return Check(name, OK, f"{where}: fits bf16 (~{variant.vram_min_gb:g} GB)")
    if free >= variant.vram_min_int8_gb:
        if rt.has_int8:
            return Check(name, WARN, f"{where}: fits int8 only (~{variant.vram_min_int8_gb:g} GB; bf16 needs "
                         f"~{variant.vram_min_gb:g} GB)", "`jmoshi serve` picks int8 by itself (--quantize int8)")
        return Check(name, WARN, f"{where}: fits int8 only, which needs the current runtime",
                     f"install it: {runtime.INSTALL[runtime.CURRENT]}")
    return Check(name, FAIL, f"{where}: does not fit (int8 needs ~{variant.vram_min_int8_gb:g} GB, bf16 "
                 f"~{variant.vram_min_gb:g} GB)", "stop other GPU processes (see `nvidia-smi`)")


def _compiler(facts: Facts) -> Check:
    """torch.compile on the GPU (both runtimes compile moshi kernels) needs triton's C compiler."""
    found = facts.compile
    if found.disabled:
        return Check("compiler", OK, "NO_TORCH_COMPILE is set: moshi runs uncompiled (slower)")
    missing = [what for what, ok in (("no C compiler (gcc, clang or $CC)", bool(found.c_compiler)),
                                     ("no Python headers (Python.h)", found.python_headers)) if not ok]
    if missing:
        return Check("compiler", WARN, f"{' and '.join(missing)}: triton cannot build torch.compile's kernels; "
                     "jmoshi serves with NO_TORCH_COMPILE=1 (slower)", runtime.COMPILER_FIX)
    return Check("compiler", OK, f"torch.compile can build its kernels ({found.c_compiler})")


def _cc(capability: tuple[int, int] | None) -> str:
    return f"{capability[0]}.{capability[1]}" if capability else "?"


def _gb(n: int) -> str:
    return f"{n / 1e9:.1f} GB"


def _torch_cuda(facts: Facts, gpu: GPU) -> Check:
    torch = facts.torch
    if torch is None:
        return Check("torch-cuda", FAIL, "torch is not installed", "reinstall jmoshi")
    if not torch.ok:
        return Check("torch-cuda", FAIL, f"torch could not be asked: {torch.error}", "run with JMOSHI_DEBUG=1")
    info = torch.value
    rt = facts.runtime
    if not info.get("cuda"):
        return Check("torch-cuda", FAIL, f"torch {info['version']} is a CPU-only build", runtime.cpu_only_fix(rt))
    if not info.get("available"):
        return Check("torch-cuda", FAIL, f"torch {info['version']} (CUDA {info['cuda']}) cannot use the GPU",
                     f"the driver may be older than CUDA {info['cuda']} needs: update the NVIDIA driver")
    if gpu.capability:
        archs = runtime.parse_arch_flags(info.get("arch_flags") or info.get("arch_list"))
        problem = runtime.kernel_problem(rt, gpu.name, gpu.capability, archs, info["version"])
        if problem is not None:
            return Check("torch-cuda", FAIL, problem.detail, problem.fix)
    return Check("torch-cuda", OK, f"torch {info['version']}, CUDA {info['cuda']}")


def _bf16(gpu: GPU) -> Check:
    if gpu.capability and gpu.capability >= (8, 0):
        return Check("bf16", OK, f"{gpu.name} supports bfloat16")
    return Check("bf16", WARN, f"{gpu.name} (cc {_cc(gpu.capability)}) has no fast bfloat16",
                 "serve with --half (float16); jmoshi turns it on by itself for such GPUs")


def _vram(gpu: GPU, variant: Variant, rt: runtime.Runtime) -> Check:
    need_min = variant.vram_min_gb * 1e9
    if gpu.total_bytes < need_min and rt.has_int8 and gpu.total_bytes >= variant.vram_min_int8_gb * 1e9:
        return Check("vram", WARN, f"{gpu.name} has {_gb(gpu.total_bytes)}: too little for bf16 "
                     f"(~{variant.vram_min_gb:g} GB), enough for int8 (~{variant.vram_min_int8_gb:g} GB)",
                     "`jmoshi serve` and `jmoshi infer` use int8 by themselves on this GPU")
    if gpu.total_bytes < need_min:
        return Check("vram", FAIL, f"{gpu.name} has {_gb(gpu.total_bytes)}; {variant.name} uses about "
                     f"{variant.vram_min_gb:g} GB", f"use a GPU with {variant.vram_gb:g} GB or more")
    if gpu.free_bytes < need_min:
        return Check("vram", WARN, f"{_gb(gpu.free_bytes)} free of {_gb(gpu.total_bytes)}; {variant.name} "
                     f"needs about {variant.vram_min_gb:g} GB", "stop other GPU processes (see `nvidia-smi`)")
    if gpu.total_bytes < variant.vram_gb * 1e9:
        return Check("vram", WARN, f"{_gb(gpu.total_bytes)}: below the {variant.vram_gb:g} GB asked for, above "
                     f"the {variant.vram_min_gb:g} GB measured in use", "close other GPU programs while serving")
    return Check("vram", OK, f"{_gb(gpu.free_bytes)} free; {variant.name} needs about {variant.vram_min_gb:g} GB")


def _disk(facts: Facts) -> Check:
    where = facts.extra.get("cache_dir", "the cache")
    if not facts.disk.ok:
        return Check("disk", WARN, f"cannot read free space of {where}: {facts.disk.error}")
    free = int(facts.disk.value)
    estimated = facts.missing_bytes is None
    need = (ESTIMATED_7B_BYTES if _any_missing(facts) else 0) if facts.missing_bytes is None else facts.missing_bytes
    about = "about " if estimated else ""
    if need > free:
        return Check("disk", FAIL, f"{_gb(free)} free in {where}; {about}{_gb(need)} still to download",
                     "free space, or set HF_HUB_CACHE (or HF_HOME) to a larger disk")
    return Check("disk", OK, f"{_gb(free)} free in {where}; {about}{_gb(need)} still to download")


def _any_missing(facts: Facts) -> bool:
    return not facts.cache.ok or any(row.status is not Status.COMPLETE for row in facts.cache.value)


def _cache(facts: Facts, variant: Variant) -> Check:
    if not facts.cache.ok:
        return Check("cache", WARN, f"{variant.name}: {facts.cache.error.split(': ', 1)[-1]}",
                     f"run `jmoshi download --variant {variant.name}`")
    rows = facts.cache.value
    missing = [row.filename for row in rows if row.status is not Status.COMPLETE]
    unverified = [row.filename for row in rows if row.status is Status.COMPLETE and not row.hashed]
    summary = ", ".join(f"{row.filename} {row.label}" for row in rows)
    if missing:
        return Check("cache", WARN, f"{variant.name}: {summary}", f"run `jmoshi download --variant {variant.name}`")
    if unverified:
        return Check("cache", OK, f"{variant.name}: all files present ({len(unverified)} not yet verified)",
                     f"`jmoshi verify --variant {variant.name}` checks their hashes")
    return Check("cache", OK, f"{variant.name}: all files present and verified")


def _hub(facts: Facts) -> Check:
    if facts.hub is None:
        return Check("hub", OK, "offline mode (HF_HUB_OFFLINE=1): nothing will be downloaded")
    if facts.hub.ok:
        return Check("hub", OK, f"{facts.endpoint} answers")
    return Check("hub", WARN, f"{facts.endpoint} unreachable: {facts.hub.error}",
                 "downloads will fail: check the network, or set HF_ENDPOINT to a mirror")


def _port(facts: Facts) -> Check:
    where = f"{facts.host}:{facts.port_number}"
    if not facts.port.ok:
        return Check("port", FAIL, f"{where}: {facts.port.error}", "pass another --host")
    if facts.port.value:
        return Check("port", OK, f"{where} is free")
    return Check("port", WARN, f"{where} is in use", f"stop what uses it, or serve with --port {facts.port_number + 1}")


def _haproxy(probe: Probe[Any]) -> Check:
    from .serving.haproxy import INSTALL_HINT

    if probe.ok:
        version = ".".join(map(str, probe.value.version))
        return Check("haproxy", OK, f"HAProxy {version} ({probe.value.path}): `serve --replicas` and `front` work")
    return Check("haproxy", WARN, f"{probe.error}; one conversation at a time still works",
                 INSTALL_HINT + " (HAProxy 2.4 or newer)")


def as_json(checks: list[Check], variant: Variant) -> dict:
    return {"variant": variant.name, "repo": variant.repo, "ok": not any(c.status == FAIL for c in checks),
            "checks": [asdict(c) | {"status": c.status.value} for c in checks]}
