"""The MLX backend: J-Moshi on Apple Silicon through Kyutai's moshi_mlx (MLX's CPU backend on Linux).

nu-dialogue's PyTorch files are verified in the cache as for torch, converted once into MLX weights
at the chosen precision (mlx/convert.py), and served by jmoshi's own small server (mlx/server.py)
with the same /api/chat protocol and web UI as moshi.server.

Precision: bf16, int8 (8 bits, groups of 64) or int4 (4 bits, groups of 32). `auto` picks the
largest that fits in three quarters of the unified memory (macOS, the browser and the rest need the
other quarter), from the size of the bf16 LM file: bf16 needs the file plus ~1.5 GB (Mimi, the KV
cache, MLX), int8 about 0.53 of it (one byte a weight, a bf16 scale and bias per 64), int4 about
0.31 (half a byte, a scale and bias per 32). J-Moshi (15.4 GB): ~17 GB, ~9.7 GB, ~6.3 GB.
"""

from __future__ import annotations

import os
import sys
from dataclasses import replace
from pathlib import Path

from ..errors import PreflightError, UsageError
from ..model.precision import Precision
from .base import Backend, Features, Kind, ServerSpec, is_apple_silicon
from .contract import Launch, without_contract

OVERHEAD_GB = 1.5
SHARE = {Precision.BF16: 1.0, Precision.INT8: 0.53, Precision.INT4: 0.31}
USABLE = 0.75
NOT_REAL_TIME = ("the MLX backend on Linux runs on MLX's CPU backend: far slower than real time "
                 "(for tests and development; on a Mac it runs on the GPU)")


def need_gb(lm_gb: float, precision: Precision) -> float:
    return lm_gb * SHARE[precision] + OVERHEAD_GB


def pick(memory_gb: float, lm_gb: float, asked: Precision) -> tuple[Precision, str | None]:
    """The precision to serve at, and a note saying why when it was picked; PreflightError if none fits."""
    usable = memory_gb * USABLE
    if asked is not Precision.AUTO:
        if need_gb(lm_gb, asked) > memory_gb:
            raise PreflightError(f"{asked.value} needs about {need_gb(lm_gb, asked):.1f} GB of memory; this machine "
                                 f"has {memory_gb:.0f} GB", "use --quantize int4 (or auto)")
        return asked, None
    for precision in (Precision.BF16, Precision.INT8, Precision.INT4):
        if need_gb(lm_gb, precision) <= usable:
            others = ", ".join(f"{p.value} ~{need_gb(lm_gb, p):.1f} GB" for p in SHARE if p is not precision)
            return precision, (f"using {precision.value} (~{need_gb(lm_gb, precision):.1f} GB): the largest that "
                               f"fits in {usable:.0f} of {memory_gb:.0f} GB of memory ({others}; --quantize to choose)")
    if need_gb(lm_gb, Precision.INT4) <= memory_gb:
        return Precision.INT4, (f"using int4 (~{need_gb(lm_gb, Precision.INT4):.1f} GB of {memory_gb:.0f} GB): it "
                                "fits only with little else running; close other programs")
    raise PreflightError(f"J-Moshi needs about {need_gb(lm_gb, Precision.INT4):.1f} GB of memory even in int4; this "
                         f"machine has {memory_gb:.0f} GB", "close other programs, or use a Mac with 16 GB or more")


def runtime_problem() -> str | None:
    """Why the MLX runtime cannot run here (not installed, or mlx without its CPU build on Linux)."""
    from importlib.util import find_spec

    missing = [name for name in ("mlx", "moshi_mlx", "rustymimi") if find_spec(name) is None]
    if missing:
        return f"the MLX runtime is not installed ({', '.join(missing)} missing)"
    return None


class MlxBackend(Backend):
    kind = Kind.MLX
    server_name = "jmoshi's MLX server"
    precisions = (Precision.AUTO, Precision.BF16, Precision.INT8, Precision.INT4)

    def refuse(self, wanted: Features) -> None:
        if wanted.replicas:
            raise UsageError("--replicas is not offered on the MLX backend: one Mac holds one J-Moshi",
                             "run `jmoshi serve` on several machines and `jmoshi front` over them")
        if wanted.conversations:
            raise UsageError(f"{wanted.conversations} is not offered on the MLX backend: moshi_mlx batches streams but "
                             "cannot reset one conversation's state without the others'",
                             f"drop {wanted.conversations}: on MLX one conversation at a time (more at once: several "
                             "Macs behind `jmoshi front`)")
        if wanted.lora:
            raise UsageError("--lora is not offered on the MLX backend",
                             "merge the adapter into a full checkpoint (moshi-finetune), then --moshi-weight FILE")
        if wanted.half:
            raise UsageError("--half is for NVIDIA GPUs older than Ampere",
                             "on MLX choose the precision with --quantize bf16|int8|int4")
        if wanted.device not in ("auto", "gpu", "cpu"):
            raise UsageError(f"--device {wanted.device} is not offered on the MLX backend",
                             "MLX runs on the Mac's GPU by itself (--device cpu for MLX's CPU backend)")
        problem = runtime_problem()
        if problem:
            if is_apple_silicon():
                raise PreflightError(problem, "reinstall jmoshi on this Mac: pip install --force-reinstall .")
            raise PreflightError(problem, "pip install '.[mlx]' in jmoshi's folder (Linux: MLX's CPU backend, "
                                          "for tests)")

    def device(self, asked: str) -> str:
        return ("gpu" if is_apple_silicon() else "cpu") if asked == "auto" else asked

    def prepare(self, request, *, web_ui, watch=None, on_note=lambda note: None):
        from ..cache import artifacts
        from ..hardware import memory_total
        from ..mlx import convert
        from ..model import finetune, preparation
        from ..variants import load_catalogue

        catalogue = load_catalogue()
        chosen = catalogue.get(request.variant)
        fine_tune = finetune.resolve(chosen, request.moshi_weight, None)
        plan, files = preparation.local_files(catalogue, chosen, fine_tune, request.revision, offline=request.offline,
                                              web_ui=web_ui, precision=Precision.BF16, watch=watch, on_note=on_note)
        memory_gb = (memory_total() or 0) / 1e9
        precision, note = pick(memory_gb, Path(files.moshi_weight).stat().st_size / 1e9, request.precision)
        if note:
            on_note(note)
        if not is_apple_silicon():
            on_note(NOT_REAL_TIME)
        data = artifacts.data_dir()
        entry = plan.entry("moshi")
        sha = entry.artifact.sha256 if entry is not None and entry.path == files.moshi_weight else None
        lm = convert.ensure_mlx(data, files.moshi_weight, sha, files.config, precision, on_note)
        mimi_entry = plan.entry("mimi")
        mimi = convert.ensure_mimi(data, files.mimi_weight, mimi_entry.artifact.sha256 if mimi_entry else None, on_note)
        files = replace(files, moshi_weight=lm.weight, config=lm.config, mimi_weight=mimi)
        return preparation.PreparedModel(catalogue, chosen, plan, files, precision, False, fine_tune,
                                         request.revision)

    def for_infer(self, device):
        pass  # MLX reads no setting when it is imported

    def load_for_infer(self, files, options, device, quiet=True):
        from ..infer import mlx_engine

        return mlx_engine.load(files, options, device, quiet)

    def from_local(self, files, folder, on_step=lambda step: None):
        """MLX weights and a Mimi with the names rustymimi reads, converted into `folder` (bf16)."""
        from ..mlx import convert

        on_step("converting the model to MLX")
        made = convert.ensure_mlx(folder, files.moshi_weight, None, files.config, Precision.BF16)
        mimi = convert.ensure_mimi(folder, files.mimi_weight, None)
        return replace(files, moshi_weight=made.weight, mimi_weight=mimi, config=made.config)

    def command(self, spec: ServerSpec):

        files = spec.files
        argv = [sys.executable, "-m", "jmoshi_cli.mlx.server",
                "--host", spec.host, "--port", str(spec.port),
                "--lm-config", str(files.config),
                "--moshi-weight", str(files.moshi_weight),
                "--mimi-weight", str(files.mimi_weight),
                "--tokenizer", str(files.tokenizer),
                "--static", str(files.web_ui) if files.web_ui else "none"]
        if spec.ssl_dir is not None:
            argv += ["--ssl", str(spec.ssl_dir)]
        if spec.device == "cpu":
            argv += ["--cpu"]
        env = without_contract(os.environ if spec.base_env is None else spec.base_env)
        env.update(HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
        return Launch(argv, env, spec.host, spec.port, spec.scheme, spec.contract, self.server_name)
