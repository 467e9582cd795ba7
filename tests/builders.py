"""Test-only builders, kept out of the wheel: LoRA adapters for the tiny model, and a WAV reader.

The adapters are moshi's own LoRA layers (moshi >= 0.2.4: moshi.modules.lora) over the LM as moshi's
loaders build it, saved the way moshi-finetune saves an adapter.
"""

from __future__ import annotations

import json
import typing as tp
import wave
from pathlib import Path

import numpy as np

from jmoshi_cli.fsutil import atomic_write
from jmoshi_cli.tiny_model import CONFIG_NAME, MOSHI_NAME, lm_kwargs_from_config

LORA_NAME = "lora.safetensors"  # moshi-finetune's name
_TINY_LORA_SCALING = 2.0


def build_tiny_lora(base_repo: Path, dest: Path, rank: int = 4, seed: int = 0) -> Path:
    """A LoRA adapter for the tiny model in base_repo, as moshi-finetune writes a checkpoint's consolidated/
    folder: dest/lora.safetensors (the LoRA tensors only) and dest/config.json (the base's config plus
    lora, lora_rank, lora_scaling). Returns the weights' path. Deterministic for a seed."""
    base_repo = Path(base_repo)
    config = json.loads((base_repo / CONFIG_NAME).read_text(encoding="utf-8"))
    return _write_lora(config, base_repo / MOSHI_NAME, Path(dest), rank, seed)


def build_misfit_lora(base_repo: Path, dest: Path, dim: int = 32, rank: int = 4, seed: int = 0) -> Path:
    """Like build_tiny_lora, but trained over a random LM whose ``dim`` differs from base_repo's: an adapter
    that does not fit the tiny model (its config.json says so too)."""
    config = json.loads((Path(base_repo) / CONFIG_NAME).read_text(encoding="utf-8"))
    if config["dim"] == dim:
        raise ValueError(f"dim {dim} is the base's own: the adapter would fit")
    config["dim"] = dim
    return _write_lora(config, None, Path(dest), rank, seed)


def _write_lora(config: dict[str, tp.Any], base_weight: Path | None, dest: Path, rank: int, seed: int) -> Path:
    """moshi's own LoRA layers over the LM as moshi's loaders build it, saved the way moshi-finetune saves
    an adapter (bf16, the state-dict names get_lora_moshi loads)."""
    import torch
    from moshi.models import loaders
    from moshi.modules.lora import replace_all_linear_with_lora
    from safetensors.torch import save

    dest.mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed)
        lm = loaders.get_moshi_lm(base_weight, lm_kwargs=lm_kwargs_from_config(config), device="cpu",
                                  dtype=torch.float32)
        replace_all_linear_with_lora(lm, rank, _TINY_LORA_SCALING)
        for name, param in lm.named_parameters():
            if name.endswith(".lora_B.weight"):
                param.normal_(std=0.05)  # fine-tuning starts it at zero; a zero adapter would change nothing
        tensors = {name: tensor.to(torch.bfloat16).contiguous() for name, tensor in lm.state_dict().items()
                   if ".lora_A." in name or ".lora_B." in name}
        del lm
    atomic_write(dest / LORA_NAME, save(tensors))
    adapter_config = {**config, "lora": True, "lora_rank": rank, "lora_scaling": _TINY_LORA_SCALING}
    atomic_write(dest / CONFIG_NAME, json.dumps(adapter_config, indent=4).encode())
    return dest / LORA_NAME


def read_wav_pcm16(path: Path) -> tuple[np.ndarray, int]:
    """Read a 16-bit PCM WAV written by :func:`write_wav`: ((channels, samples) float32, rate)."""
    with wave.open(str(path), "rb") as w:
        ch, width, rate, frames = w.getnchannels(), w.getsampwidth(), w.getframerate(), w.getnframes()
        if width != 2:
            raise ValueError(f"{path}: {8 * width}-bit WAV, expected 16-bit")
        raw = np.frombuffer(w.readframes(frames), dtype="<i2")
    return (raw.reshape(-1, ch).T.astype(np.float32) / 32767.0), rate
