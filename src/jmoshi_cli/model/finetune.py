"""Fine-tuned J-Moshi for serve and infer: a local checkpoint (`--moshi-weight`) and a LoRA adapter (`--lora`).

Either comes from the command line or from a user variant (`moshi_weight = ...`, `lora = ...` in
variants.toml). Both are always combined with the chosen variant's tokenizer and Mimi, which jmoshi
passes to moshi as local files, so nothing falls back to Kyutai's English defaults.

- A checkpoint's LM config is the one beside it (lora.local_config: moshi-finetune's config.json,
  nu-dialogue's moshi_lm_kwargs.json), else the variant's.
- An adapter is checked against its base from the files' headers before anything loads
  (lora.check_fits), then handed to moshi.server as `--lora-weight` with the adapter's config.json
  (`--config-path`), which says `lora`, its rank and scaling. moshi fuses it into the weights.
- moshi 0.2.2 has no LoRA, and moshi refuses LoRA on int8 weights: both are one line, before loading.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

from .. import preflight
from ..cache.artifacts import ModelFiles
from ..errors import UsageError
from ..variants import Variant
from . import lora
from .precision import Precision


@dataclass(frozen=True)
class FineTune:
    weight: Path | None = None  # a local LM checkpoint instead of the variant's
    adapter: lora.Adapter | None = None


def resolve(variant: Variant, moshi_weight: Path | None, lora_path: Path | None) -> FineTune:
    """The checkpoint and adapter asked for (flags win over the variant), checked to exist and be readable."""
    weight = moshi_weight or (Path(variant.moshi_weight) if variant.moshi_weight else None)
    adapter_path = lora_path or (Path(variant.lora) if variant.lora else None)
    adapter = lora.find_adapter(adapter_path.expanduser()) if adapter_path is not None else None
    return FineTune(preflight.check_moshi_weight(weight), adapter)


def precision_for(fine_tune: FineTune, rt, precision: Precision) -> Precision:
    """Refuse what cannot load an adapter; an adapter means bf16 (moshi has no LoRA over int8)."""
    if fine_tune.adapter is None:
        return precision
    from ..runtime import CURRENT, INSTALL

    if not rt.has_lora:
        raise UsageError(f"--lora needs the current runtime (moshi 0.2.13); this is moshi {rt.moshi}, which has "
                         "no LoRA", f"install it: {INSTALL[CURRENT]}")
    if precision is Precision.INT8:
        raise UsageError("--lora and --quantize int8 do not go together: moshi loads LoRA over bf16 weights only",
                         "drop --quantize int8, or merge the adapter into a full checkpoint and serve that")
    return Precision.BF16


def apply(fine_tune: FineTune, files: ModelFiles, variant: Variant, data_dir: Path,
          on_note: Callable[[str], None] = lambda note: None) -> ModelFiles:
    """The model files with the checkpoint's own config and the adapter in place, the adapter checked."""
    if fine_tune.weight is not None:
        config = lora.local_config(fine_tune.weight, data_dir)
        if config is not None:
            files = replace(files, config=config)
        check_checkpoint(fine_tune.weight, lora.lm_kwargs(files.config),
                         str(config) if config is not None else f"variant {variant.name}'s config")
    adapter = fine_tune.adapter
    if adapter is None:
        return files
    base = f"variant {variant.name}" if fine_tune.weight is None else str(fine_tune.weight)
    lora.check_fits(adapter, files.moshi_weight, lora.lm_kwargs(files.config), base_name=base)
    step = f" (checkpoint {adapter.step})" if adapter.step is not None else ""
    on_note(f"LoRA adapter {adapter.weight}{step}, rank {adapter.rank}, over {base}")
    return replace(files, config=adapter.config, lora=adapter.weight)


# What a checkpoint's tensors say about the LM kwargs it was trained with: (kwarg, what is counted).
def _shape_facts(header: dict[str, lora.Tensor]) -> dict[str, int]:
    facts: dict[str, int] = {}
    if "text_emb.weight" in header:
        rows, facts["dim"] = header["text_emb.weight"].shape[:2]
        facts["text_card"] = rows - 1  # one extra row: the initial token
    if "emb.0.weight" in header:
        facts["card"] = header["emb.0.weight"].shape[0] - 1
    counts = {"n_q": r"emb\.(\d+)\.weight", "dep_q": r"linears\.(\d+)\.weight",
              "num_layers": r"transformer\.layers\.(\d+)\.", "depformer_num_layers": r"depformer\.layers\.(\d+)\."}
    for kwarg, pattern in counts.items():
        found = {m.group(1) for key in header if (m := re.match(pattern, key))}
        if found:
            facts[kwarg] = len(found)
    return facts


def check_checkpoint(weight: Path, kwargs: dict, config_name: str) -> None:
    """UsageError when a local checkpoint's tensors contradict the LM config it would be built with.

    From the file's header only (no torch): moshi would otherwise fail deep in loading, in the child.
    """
    for kwarg, found in _shape_facts(lora.read_header(weight)).items():
        wanted = kwargs.get(kwarg)
        if isinstance(wanted, int) and wanted != found:
            raise UsageError(f"--moshi-weight {weight} does not match {config_name}: {kwarg} is {wanted} there, "
                             f"{found} in the weights",
                             "put the config.json (or moshi_lm_kwargs.json) it was trained with beside it")
