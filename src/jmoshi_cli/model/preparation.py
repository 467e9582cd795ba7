"""One model preparation for `serve` and `infer`: the variant, its fine-tune, its precision, its files.

Order matters and is the same for both commands: the fine-tune is resolved and checked (seconds),
the precision is decided once (the fine-tune's rules, then the device's memory), then the files are
made local: the variant's verified in the cache, the fine-tune in place, then, for int8, the int8
checkpoint of whatever LM that leaves. The result is one `PreparedModel`; nothing downstream decides
the precision again.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

from .. import preflight, runtime
from ..cache import artifacts
from ..cache.artifacts import ModelFiles
from ..variants import Catalogue, Variant
from . import derived, finetune, quantize
from .precision import Precision

Note = Callable[[str], None]


@dataclass(frozen=True)
class ModelRequest:
    """What the command line asked for."""

    variant: str | None = None
    revision: str | None = None
    moshi_weight: Path | None = None
    lora: Path | None = None
    precision: Precision = Precision.AUTO
    device: str = "cuda"
    half: bool = False
    offline: bool = False


@dataclass(frozen=True)
class PreparedModel:
    catalogue: Catalogue
    variant: Variant
    plan: artifacts.Plan
    files: ModelFiles
    precision: Precision  # never AUTO
    half: bool
    fine_tune: finetune.FineTune = finetune.FineTune()
    revision: str | None = None

    def facts(self) -> dict[str, Any]:
        """What only jmoshi knows of the model, for each recording's meta.json."""
        from .. import __version__

        entry = next((e for e in self.plan.entries if e.artifact.repo == self.variant.repo), None)
        return {"variant": self.variant.name, "repo": self.variant.repo,
                "revision": self.revision or self.variant.revision,
                "commit": entry.artifact.commit if entry else None,
                "moshi_weight": str(self.fine_tune.weight) if self.fine_tune.weight else None,
                "lora": str(self.files.lora) if self.files.lora else None,
                "lm_config": str(self.files.config) if self.files.config else None,
                "precision": self.precision.value, "jmoshi": __version__}


def decide_precision(fine_tune: finetune.FineTune, asked: Precision) -> Precision:
    """The fine-tune's rules (a LoRA means bf16 on the current runtime), before the device has its say."""
    return finetune.precision_for(fine_tune, runtime.detect(), asked)


def prepare_model(request: ModelRequest, *, web_ui: bool, watch: artifacts.WatchFactory | None = None,
                  on_note: Note = lambda note: None, catalogue: Catalogue | None = None) -> PreparedModel:
    """Checks in seconds, then the files: everything a backend needs to load the model."""
    from ..variants import load_catalogue

    catalogue = catalogue or load_catalogue()
    chosen = catalogue.get(request.variant)
    fine_tune = finetune.resolve(chosen, request.moshi_weight, request.lora)
    precision = decide_precision(fine_tune, request.precision)
    device = preflight.check_device(request.device, chosen.vram_min_gb, chosen.name, precision,
                                    chosen.vram_min_int8_gb)
    for note in device.notes:
        on_note(note)
    plan, files = local_files(catalogue, chosen, fine_tune, request.revision, offline=request.offline,
                              web_ui=web_ui, precision=device.precision, watch=watch, on_note=on_note)
    return PreparedModel(catalogue, chosen, plan, files, device.precision, request.half or device.half,
                         fine_tune, request.revision)


def local_files(catalogue: Catalogue, variant: Variant, fine_tune: finetune.FineTune, revision: str | None, *,
                offline: bool, web_ui: bool, precision: Precision, watch=None,
                on_note: Note = lambda note: None) -> tuple[artifacts.Plan, ModelFiles]:
    """The variant's files verified in the cache, the fine-tune in place, then the int8 checkpoint."""
    plan, files = artifacts.ensure_local(catalogue, variant, revision, offline=offline, web_ui=web_ui,
                                         moshi_weight=fine_tune.weight, watch=watch, on_note=on_note)
    files = finetune.apply(fine_tune, files, variant, artifacts.data_dir(), on_note)
    if precision is Precision.INT8:
        files = quantize.int8_files(plan, files, artifacts.data_dir(), on_note)
    return plan, files


def recheck_derived(plan: artifacts.Plan, data_dir: Path | None = None) -> list[derived.Rechecked]:
    """Every file jmoshi made from the plan's LM and Mimi (int8, MLX), hashed whole (`jmoshi verify`); one that
    no longer matches is removed, so that the next start makes it again. A local --moshi-weight's files are
    keyed by that file, not by the variant: they are not the plan's."""
    from ..mlx import convert

    data_dir = data_dir or artifacts.data_dir()
    found = []
    for role, recheck in (("moshi", quantize.recheck), ("moshi", convert.recheck_lm), ("mimi", convert.recheck_mimi)):
        entry = plan.entry(role)
        if entry is not None and entry.artifact.sha256:
            found += [replace(made, made_from=entry.artifact) for made in recheck(data_dir, entry.artifact.sha256)]
    return found
