"""The moshi runtime installed beside jmoshi: its versions, what it can do, and what is broken in it.

Everything here comes from package metadata (importlib.metadata) and the file system: nothing heavy
is imported, so `doctor`, serve's preflight and the child's bootstrap can all ask in milliseconds.

Two runtimes are tested (both are admitted by pyproject's ranges):

- **current** — what `pip install .` resolves: moshi 0.2.13, sphn 0.2, torch 2.9 (the default PyPI
  wheel, CUDA 12.8, kernels sm_70 ... sm_120: Volta to Blackwell), huggingface_hub < 1.0,
  bitsandbytes 0.49;
- **documented** — the runtime J-Moshi documents, `pip install . -c constraints/moshi-0.2.2.txt`:
  moshi 0.2.2, sphn 0.1, torch 2.6 (kernels sm_50 ... sm_90: Maxwell to Hopper), huggingface_hub 0.28.

What each moshi version can do, read from upstream's released sources (server.py, loaders.py,
modules/transformer.py, package metadata of 0.2.2, 0.2.3, 0.2.4, 0.2.5, 0.2.11, 0.2.12, 0.2.13):

- 0.2.4 adds ``--config-path`` and ``--lora-weight`` (0.2.2 and 0.2.3 look config.json up on the hub);
- 0.2.5 passes ``--host`` to ``web.run_app`` (before, the server listens on every interface) and caps
  sphn < 0.2 (0.2.2 - 0.2.4 declare ``sphn>=0.1.4`` and break on sphn 0.2);
- 0.2.12 moves to the sphn 0.2 API (``OpusStreamWriter.append_pcm`` returns the bytes, ``read_pcm``
  and ``read_bytes`` are gone), compiles the RMS norm with torch.compile and CUDA-graphs Mimi;
- every version ends its warm-up with ``torch.cuda.synchronize()`` (it raises without an NVIDIA
  driver) and compiles the gating FFN with torch.compile on first use, on the CPU too:
  ``NO_TORCH_COMPILE`` (any value, read when moshi is imported) turns every compile off.
"""

from __future__ import annotations

import os
import shutil
import sysconfig
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

PACKAGES = ("moshi", "sphn", "torch", "huggingface_hub", "bitsandbytes")

CURRENT, DOCUMENTED, UNTESTED = "current", "documented", "untested"

# What each tested runtime is tested with: package -> (lowest, first excluded).
TESTED: dict[str, dict[str, tuple[str, str]]] = {
    CURRENT: {"moshi": ("0.2.13", "0.2.14"), "sphn": ("0.2", "0.3"), "torch": ("2.8", "2.10"),
              "huggingface_hub": ("0.24", "1.0")},
    DOCUMENTED: {"moshi": ("0.2.2", "0.2.3"), "sphn": ("0.1.4", "0.2"), "torch": ("2.2", "2.7"),
                 "huggingface_hub": ("0.24", "0.29")},
}

# The exact commands that put a whole tested runtime in place (in the environment jmoshi runs from).
INSTALL = {
    CURRENT: "pip install 'moshi==0.2.13' 'sphn>=0.2,<0.3' 'torch>=2.8,<2.10' 'huggingface_hub>=0.24,<1.0'",
    DOCUMENTED: "pip install 'moshi==0.2.2' 'sphn>=0.1.4,<0.2' 'torch>=2.2,<2.7' 'huggingface_hub>=0.24,<0.29'",
}
SPHN_FOR_API = {"0.1": "pip install 'sphn>=0.1.4,<0.2'", "0.2": "pip install 'sphn>=0.2,<0.3'"}

NO_COMPILE_ENV = "NO_TORCH_COMPILE"


def version_tuple(text: str | None) -> tuple[int, ...]:
    """'2.9.1+cu128' -> (2, 9, 1); '0.2.13rc1' -> (0, 2, 13); None or junk -> ()."""
    parts: list[int] = []
    for piece in (text or "").split("+")[0].split("."):
        digits = ""
        for ch in piece:
            if not ch.isdigit():
                break
            digits += ch
        if not digits:
            break
        parts.append(int(digits))
    return tuple(parts)


def in_range(version: str, low: str, high: str) -> bool:
    return version_tuple(low) <= version_tuple(version) < version_tuple(high)


@dataclass(frozen=True)
class Problem:
    """A broken or untested combination: one line, the exact fix, and whether nothing can work."""

    key: str
    detail: str
    fix: str
    fatal: bool = True


@dataclass(frozen=True)
class Runtime:
    """Installed versions (None: not installed) and the capabilities of that moshi, as data."""

    moshi: str | None
    sphn: str | None
    torch: str | None
    huggingface_hub: str | None
    bitsandbytes: str | None
    honours_host: bool  # --host reaches web.run_app (0.2.5+)
    has_config_path: bool  # --config-path (0.2.4+)
    has_lora: bool  # --lora-weight (0.2.4+)
    has_int8: bool  # QLinear int8 checkpoints with "quantize" in the LM config (checked on 0.2.13)
    has_slot_masks: bool  # per-slot reset and exec masks, LMGen(support_out_of_sync=True) (0.2.5+)
    sphn_api: str  # the sphn API moshi's server calls: "0.1" (< 0.2.12) or "0.2"
    kind: str  # CURRENT, DOCUMENTED or UNTESTED

    @classmethod
    def from_versions(cls, versions: dict[str, str | None]) -> "Runtime":
        moshi = versions.get("moshi")
        v = version_tuple(moshi)
        kind = UNTESTED
        for name in (CURRENT, DOCUMENTED):
            low, high = TESTED[name]["moshi"]
            if moshi and in_range(moshi, low, high):
                kind = name
        return cls(moshi=moshi, sphn=versions.get("sphn"), torch=versions.get("torch"),
                   huggingface_hub=versions.get("huggingface_hub"), bitsandbytes=versions.get("bitsandbytes"),
                   honours_host=v >= (0, 2, 5), has_config_path=v >= (0, 2, 4), has_lora=v >= (0, 2, 4),
                   has_int8=v >= (0, 2, 13), has_slot_masks=v >= (0, 2, 5),
                   sphn_api="0.2" if v >= (0, 2, 12) else "0.1", kind=kind)

    @property
    def family(self) -> str:
        """The tested runtime this moshi behaves like (its sphn API decides): CURRENT or DOCUMENTED."""
        return CURRENT if self.sphn_api == "0.2" else DOCUMENTED

    @property
    def label(self) -> str:
        names = {CURRENT: "current runtime", DOCUMENTED: "J-Moshi-documented runtime", UNTESTED: "untested runtime"}
        return (f"{names[self.kind]}: moshi {self.moshi}, sphn {self.sphn}, torch {self.torch}, "
                f"huggingface_hub {self.huggingface_hub}")

    def other_install(self) -> str:
        """The command that installs the other tested runtime."""
        return INSTALL[DOCUMENTED if self.family == CURRENT else CURRENT]

    def problems(self) -> list[Problem]:
        """Every broken (fatal) or untested (not fatal) combination of the installed packages."""
        found: list[Problem] = []
        if self.moshi is None:
            return [Problem("moshi", "moshi is not installed", f"reinstall jmoshi, or {INSTALL[CURRENT]}")]
        if self.kind == UNTESTED:
            found.append(Problem("moshi", f"moshi {self.moshi} is not one of the tested versions (0.2.13, 0.2.2)",
                                 INSTALL[self.family], fatal=False))
        if self.sphn is None:
            found.append(Problem("sphn", "sphn is not installed", SPHN_FOR_API[self.sphn_api]))
        else:
            installed_api = "0.2" if version_tuple(self.sphn) >= (0, 2) else "0.1"
            if installed_api != self.sphn_api:
                calls = {"0.1": "OpusStreamReader.read_pcm / OpusStreamWriter.read_bytes, removed in sphn 0.2",
                         "0.2": "append_pcm / append_bytes returning the data, which sphn 0.1 does not"}
                found.append(Problem(
                    "sphn", f"sphn {self.sphn} with moshi {self.moshi}: its server calls the sphn {self.sphn_api} "
                    f"API ({calls[self.sphn_api]}); connections die at the first audio frame",
                    SPHN_FOR_API[self.sphn_api]))
        if self.torch is None:
            found.append(Problem("torch", "torch is not installed", INSTALL[self.family]))
        return found

    def fatal(self) -> list[Problem]:
        return [p for p in self.problems() if p.fatal]


def installed_versions() -> dict[str, str | None]:
    return versions(PACKAGES)


def versions(names) -> dict[str, str | None]:
    """Each named package's installed version (None: not installed), for meta.json and doctor."""
    found: dict[str, str | None] = {}
    for name in names:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


def detect() -> Runtime:
    return Runtime.from_versions(installed_versions())


# --- GPU kernels -----------------------------------------------------------------------------------


def parse_arch_flags(text: str | list[str] | None) -> list[str]:
    """`torch._C._cuda_getArchFlags()` ('sm_50 sm_60 ...') or get_arch_list() -> ['sm_50', 'sm_60', ...]."""
    if not text:
        return []
    items = text.split() if isinstance(text, str) else list(text)
    return [item.strip() for item in items if item.strip()]


def _arch_number(arch: str) -> tuple[str, tuple[int, int]] | None:
    """'sm_86' -> ('sm', (8, 6)); 'compute_90' -> ('compute', (9, 0)); 'sm_120' -> ('sm', (12, 0))."""
    kind, _, number = arch.partition("_")
    digits = "".join(ch for ch in number if ch.isdigit())
    if kind not in ("sm", "compute") or len(digits) < 2:
        return None
    return kind, (int(digits[:-1]), int(digits[-1]))


def has_kernels(capability: tuple[int, int], archs: list[str]) -> bool:
    """Whether a torch built for `archs` runs on a GPU of this compute capability.

    A cubin for sm_XY runs on X.Z with Z >= Y (same major: sm_80 serves 8.6 and 8.9, not 9.0);
    arch-specific cubins (sm_90a) run on exactly that GPU; PTX (compute_XY) is compiled by the driver
    for any newer GPU.
    """
    major, minor = capability
    for arch in archs:
        parsed = _arch_number(arch)
        if parsed is None:
            continue
        kind, (a, b) = parsed
        if kind == "compute" and (a, b) <= (major, minor):
            return True
        if kind == "sm" and arch.endswith("a"):
            if (a, b) == (major, minor):
                return True
        elif kind == "sm" and a == major and b <= minor:
            return True
    return False


def kernel_problem(runtime: Runtime, gpu_name: str, capability: tuple[int, int], archs: list[str],
                   torch_version: str | None = None) -> Problem | None:
    """None when torch has kernels for this GPU, else what is wrong and the fix for this runtime."""
    if not archs or has_kernels(capability, archs):
        return None
    sm = f"sm_{capability[0]}{capability[1]}"
    version = torch_version or runtime.torch
    detail = f"{gpu_name} is {sm}; torch {version} has kernels for {' '.join(archs)} only"
    numbers = [n for n in (_arch_number(a) for a in archs) if n is not None]
    newest = max((n[1] for n in numbers), default=(0, 0))
    if capability > newest:
        if runtime.family == DOCUMENTED:
            fix = (f"this GPU needs torch 2.8 or newer, which moshi {runtime.moshi} does not allow: "
                   f"install the current runtime: {INSTALL[CURRENT]}")
        else:
            fix = (f"install a torch with {sm} kernels: pip install -U 'torch>=2.8,<2.10' "
                   "(the default PyPI wheels for Linux have them)")
    else:
        if runtime.family == CURRENT:
            fix = (f"torch {version} no longer has kernels for this older GPU: install the J-Moshi-documented "
                   f"runtime (torch 2.6, sm_50 and up): {INSTALL[DOCUMENTED]}")
        else:
            fix = "install torch from the default PyPI index: pip install --force-reinstall 'torch>=2.2,<2.7'"
    return Problem("torch-cuda", detail, fix)


def cpu_only_fix(runtime: Runtime) -> str:
    """Reinstall torch from PyPI (its Linux wheels include CUDA) within this runtime's range."""
    low, high = TESTED[runtime.family]["torch"]
    return f"pip install --force-reinstall 'torch>={low},<{high}' (PyPI's Linux wheels include CUDA)"


# --- torch.compile ------------------------------------------------------------------------------------


def c_compiler(env: Mapping[str, str] | None = None) -> str | None:
    """The C compiler triton builds its CUDA launcher with ($CC, else gcc, else clang), or None."""
    env = os.environ if env is None else env
    if env.get("CC"):
        return shutil.which(env["CC"]) or (env["CC"] if Path(env["CC"]).is_file() else None)
    return shutil.which("gcc", path=env.get("PATH")) or shutil.which("clang", path=env.get("PATH"))


def python_headers() -> bool:
    """Whether Python.h is installed (triton includes it in the launcher it compiles)."""
    include = sysconfig.get_paths().get("include")
    if not include:
        return False
    return (Path(include) / "Python.h").is_file()


def compile_env(device: str, env: Mapping[str, str] | None = None, compiler: str | None | bool = True,
                headers: bool = True) -> tuple[dict[str, str], str | None]:
    """The environment to add for moshi's torch.compile, and a note for the user (or None).

    - On the CPU jmoshi turns torch.compile off (``NO_TORCH_COMPILE=1``): the CPU is for tests and
      development, where compiling costs seconds to a minute at start-up on a small machine, needs a
      C++ compiler, and the frame time is dominated by Mimi either way.
    - On a GPU it stays on, as upstream runs it; without the C compiler and Python headers triton
      needs it is turned off with a note, so the server starts (slower) instead of dying at warm-up.
    - A ``NO_TORCH_COMPILE`` the user set is left as it is.
    """
    env = os.environ if env is None else env
    if NO_COMPILE_ENV in env:
        return {}, None
    if device == "cpu":
        return {NO_COMPILE_ENV: "1"}, None
    missing = [what for what, ok in (("a C compiler (gcc)", bool(compiler)), ("Python headers", headers)) if not ok]
    if missing:
        return {NO_COMPILE_ENV: "1"}, (
            f"torch.compile is off: {' and '.join(missing)} not found, which triton needs (moshi runs slower); "
            f"to turn it on: {COMPILER_FIX}")
    return {}, None


COMPILER_FIX = "apt-get install gcc python3-dev (or set CC to a C compiler)"


def compile_setup(device: str, env: Mapping[str, str] | None = None) -> tuple[dict[str, str], str | None]:
    """compile_env with this machine's compiler and headers looked up (only for a GPU)."""
    if device == "cpu":
        return compile_env(device, env)
    return compile_env(device, env, compiler=c_compiler(env), headers=python_headers())


def limit_threads(threads: int | None) -> None:
    """A server child's CPU share, set before torch starts its thread pool: torch sizes it from
    OMP_NUM_THREADS (see backends.cpu_threads)."""
    if threads is not None:
        os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(threads)


def apply_compile_policy(device: str) -> str | None:
    """compile_setup for this process (before moshi is imported: moshi reads it at import)."""
    extra, note = compile_setup(device)
    os.environ.update(extra)
    return note
