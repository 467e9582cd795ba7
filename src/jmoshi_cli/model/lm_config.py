"""The one reader and writer of LM config files (moshi's config.json, nu-dialogue's moshi_lm_kwargs.json).

A config is a JSON object of LMModel keyword arguments plus loader keys (file names, model type,
lm_gen_config) and, for moshi-finetune, LoRA keys. A repo without one (J-Moshi's) means moshi's
built-in Moshi-7B kwargs. Configs jmoshi writes are named by their content in
`<data dir>/lm-configs/`, so that runs asking the same share one file.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from ..errors import CacheError, ConfigError
from ..fsutil import atomic_write

FOLDER = "lm-configs"
# Keys moshi's CheckpointInfo pops before the rest goes to LMModel.
LOADER_KEYS = ("moshi_name", "mimi_name", "mimi_config_name", "tokenizer_name", "lora_name", "model_type",
               "lm_gen_config", "tts_config", "stt_config", "model_id")
LORA_KEYS = ("lora", "lora_rank", "lora_scaling")

Config = dict[str, Any]


def read(path: Path, corrupt_hint: str = "") -> Config:
    """A JSON object from a file; ConfigError naming the file otherwise (CacheError with a hint to
    download again when `corrupt_hint` is given: the file came from the cache)."""
    error = CacheError if corrupt_hint else ConfigError
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise error(f"model config not found: {path}", corrupt_hint or "check the path") from exc
    except OSError as exc:
        raise error(f"cannot read the model config {path}: {exc.strerror or exc}", corrupt_hint) from exc
    except ValueError as exc:
        raise error(f"{path} is not valid JSON: {exc}", corrupt_hint or "fix or replace the file") from exc
    if not isinstance(data, dict):
        raise error(f"{path} is not a JSON object", corrupt_hint or "a moshi config is an object of LM kwargs")
    return data


def base(path: Path | None) -> Config:
    """The config a model is built with: the file, or moshi's built-in Moshi-7B kwargs when there is none."""
    if path is None:
        from ..upstream.moshi_private import builtin_lm_kwargs

        return builtin_lm_kwargs()
    return read(path, corrupt_hint="download the model again")


def lm_kwargs_of(config: Config) -> Config:
    """What moshi passes to LMModel from a config's content: it without the loader and LoRA keys."""
    return {k: v for k, v in config.items() if k not in LOADER_KEYS + LORA_KEYS}


def lm_kwargs(path: Path | None) -> Config:
    return lm_kwargs_of(base(path))


def write(config: Config, data_dir: Path) -> Path:
    """`config` as a file named by its content in the data folder (kept if already there)."""
    text = json.dumps(config, indent=2, sort_keys=True, ensure_ascii=False) + "\n"
    path = Path(data_dir) / FOLDER / f"{hashlib.sha256(text.encode()).hexdigest()[:16]}.json"
    try:
        if path.is_file() and path.read_text(encoding="utf-8") == text:
            return path
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, text.encode())
    except OSError as exc:
        raise CacheError(f"cannot write the LM config to {path.parent}: {exc.strerror or exc}",
                         "set JMOSHI_HOME to a folder you can write to") from exc
    return path


def with_sampling(path: Path | None, overrides: dict[str, Any], data_dir: Path) -> Path:
    """A config whose lm_gen_config holds the sampling values: moshi.server reads them from there."""
    config = base(path)
    config["lm_gen_config"] = {**(config.get("lm_gen_config") or {}), **overrides}
    return write(config, data_dir)
