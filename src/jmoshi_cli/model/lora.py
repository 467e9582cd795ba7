"""Fine-tuned J-Moshi: LoRA adapters and full checkpoints, checked from their files before moshi loads them.

What the upstream code writes and reads (checked in the sources):

- kyutai-labs/moshi-finetune ``finetune/checkpointing.py``: every checkpoint goes to
  ``<run_dir>/checkpoints/checkpoint_<step:06d>/consolidated/`` (written as ``tmp.consolidated``, then
  renamed). It holds ``lora.safetensors`` (LoRA training with ``save_adapters: true``: only the trainable
  tensors, ``<module>.lora_A.weight`` and ``<module>.lora_B.weight``, plus the embeddings when
  ``lora.ft_embed`` is on) or ``consolidated.safetensors`` (full weights, LoRA merged), and
  ``config.json``. ``train.py`` writes as config.json the base's config.json (or moshi's built-in
  ``_lm_kwargs`` when the base repo has none, as J-Moshi's) plus ``lora``, ``lora_rank``, ``lora_scaling``
  (``lora`` stays true in a merged full checkpoint too). Older checkpoints are deleted (``num_ckpt_keep``).
  Its README serves them with ``moshi.server --lora-weight .../lora.safetensors --config-path
  .../config.json``, or ``--moshi-weight .../consolidated.safetensors``.
- nu-dialogue/moshi-finetune (J-Moshi's training code, moshi 0.1.0) ``tools/clean_moshi.py``: a folder
  with ``model.safetensors`` (the full state dict, moshi 0.1/0.2.2 key names) and ``moshi_lm_kwargs.json``,
  which is only ``LMModel``'s keyword arguments (moshi's ``_lm_kwargs``, ``dep_q`` and
  ``depformer_context`` possibly changed), none of config.json's file-name keys.
- moshi 0.2.13 ``models/loaders.py``: ``CheckpointInfo.from_hf_repo`` reads config.json as the LM kwargs at
  top level after popping ``moshi_name``, ``mimi_name``, ``tokenizer_name``, ``lora_name``, ``model_type``,
  ``lm_gen_config`` and a few more; ``get_moshi_lm`` pops ``lora`` (default false), ``lora_rank``
  (default 128), ``lora_scaling`` (default 2.0). With ``lora`` true, ``get_lora_moshi`` wraps every
  ``nn.Linear`` with ``modules/lora.py``'s ``LoRALinear`` (``lora_A`` is rank x in, ``lora_B`` out x rank,
  the base weight moves to ``frozen_W``), loads the adapter with ``strict=False`` and fails only on
  unexpected keys; ``moshi.server`` fuses it into the weights unless ``--no_fuse_lora``. With ``lora``
  true and no adapter the new layers keep their random initialisation, which changes the model's output.
- moshi 0.2.13 ``modules/transformer.py`` ``StreamingMultiheadAttention._load_hook``: one Linear per step
  (``in_projs.{i}``, ``out_projs.{i}``); the legacy ``in_proj_weight``, ``in_proj.weight`` and
  ``out_proj.weight`` (and their ``lora_A``/``lora_B``) hold the steps stacked on dim 0 and are split in
  ``mult`` equal blocks on load.
"""

from __future__ import annotations

import json
import re
import struct
import typing as tp
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError, UsageError
from . import lm_config

LORA_NAME = "lora.safetensors"
FULL_NAME = "consolidated.safetensors"
CONFIG_NAME = "config.json"
NU_KWARGS_NAME = "moshi_lm_kwargs.json"

# moshi's get_moshi_lm defaults, used when a config leaves them out.
DEFAULT_LORA_RANK = 128
DEFAULT_LORA_SCALING = 2.0
LORA_KEYS = lm_config.LORA_KEYS
LOADER_KEYS = lm_config.LOADER_KEYS  # config.json keys that CheckpointInfo.from_hf_repo pops

# LM kwargs that decide the weights' shapes or what they mean; every depformer_* key counts as well.
ARCH_KEYS = ("dim", "num_heads", "num_layers", "hidden_scale", "kv_repeat", "text_card", "text_card_out", "card",
             "n_q", "dep_q", "delays", "gating", "norm", "positional_embedding", "bias_proj",
             "demux_second_text_stream", "extra_heads_num_heads", "extra_heads_dim")
_IGNORED_DEPFORMER_KEYS = ("depformer_causal",)  # deprecated: moshi drops it

_MAX_HEADER = 100_000_000  # safetensors refuses larger headers
_LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<part>[AB])\.weight$")
_SPLIT = re.compile(r"^(?P<prefix>.+)\.(?P<kind>in|out)_projs\.(?P<step>\d+)$")
_LEGACY_LORA = re.compile(r"^(?P<prefix>.+)\.(?P<kind>in|out)_proj$")
_CHECKPOINT = re.compile(r"^checkpoint_(?P<step>\d+)$")
_LEGACY_BASE = {"in": (".in_proj_weight", ".in_proj.weight"), "out": (".out_proj.weight",)}

_LAYOUT_HINT = (f"give a moshi-finetune run folder, a checkpoints/checkpoint_NNNNNN folder, its consolidated/ "
                f"folder, or {LORA_NAME} itself with its {CONFIG_NAME} beside it")
_FIT_HINT = ("use the adapter with the model it was trained on (--variant, or --moshi-weight for a "
             "fine-tuned base), or train it again over this one")


class Tensor(tp.NamedTuple):
    dtype: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class Adapter:
    """A LoRA adapter as moshi-finetune writes it: the weights and the config.json beside them."""

    weight: Path
    config: Path
    rank: int
    scaling: float

    @property
    def step(self) -> int | None:
        """The training step of the checkpoint_NNNNNN folder it comes from; None outside that layout."""
        for folder in (self.weight.parent.parent, self.weight.parent):  # checkpoint_NNNNNN/consolidated/
            match = _CHECKPOINT.match(folder.name)
            if match:
                return int(match["step"])
        return None


# --- safetensors headers ----------------------------------------------------------------------------


def read_header(path: Path) -> dict[str, Tensor]:
    """The tensors a safetensors file holds (name -> dtype, shape), from its header alone."""
    path = Path(path)
    try:
        with path.open("rb") as stream:
            size = path.stat().st_size
            length = _header_length(stream.read(8), size, path)
            raw = stream.read(length)
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror or exc}", "check the path and its permissions") from exc
    tensors, data_end = _parse_header(raw, path)
    if 8 + len(raw) + data_end > size:
        raise UsageError(f"{path} is truncated: its header announces {data_end} bytes of data",
                         "copy or download the file again")
    return tensors


def _not_safetensors(path: Path) -> UsageError:
    return UsageError(f"{path} is not a safetensors file",
                      "give a .safetensors file as safetensors.torch.save_file writes it (8-byte header length, "
                      "then a JSON header), e.g. moshi-finetune's lora.safetensors")


def _header_length(prefix: bytes, size: int, path: Path) -> int:
    if len(prefix) < 8:
        raise _not_safetensors(path)
    (length,) = struct.unpack("<Q", prefix)
    if length < 2 or length > min(_MAX_HEADER, size - 8):
        raise _not_safetensors(path)
    return length


def _parse_header(raw: bytes, path: Path) -> tuple[dict[str, Tensor], int]:
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise _not_safetensors(path) from None
    if not isinstance(header, dict):
        raise _not_safetensors(path)
    tensors: dict[str, Tensor] = {}
    data_end = 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            tensors[name] = Tensor(str(entry["dtype"]), tuple(int(d) for d in entry["shape"]))
            data_end = max(data_end, int(entry["data_offsets"][1]))
        except (KeyError, TypeError, ValueError, IndexError):
            raise _not_safetensors(path) from None
    return tensors, data_end


# --- finding an adapter -----------------------------------------------------------------------------


def find_adapter(path: Path) -> Adapter:
    """The adapter at PATH: a moshi-finetune run folder (its newest checkpoint: see ``Adapter.step``),
    a checkpoint folder, its consolidated/ folder, or lora.safetensors with config.json beside it."""
    path = Path(path).expanduser()
    if not path.exists():
        raise UsageError(f"LoRA adapter {path}: no such file or folder", _LAYOUT_HINT)
    weight = _weight_in(path) if path.is_dir() else path
    _require_lora(weight)
    rank, scaling = _lora_settings(weight.with_name(CONFIG_NAME), weight)
    return Adapter(weight.resolve(), weight.with_name(CONFIG_NAME).resolve(), rank, scaling)


def _weight_in(folder: Path) -> Path:
    consolidated = _consolidated(folder) or _newest_consolidated(folder)
    if consolidated is None:
        if (folder / "model.safetensors").is_file():
            raise _full_checkpoint(folder / "model.safetensors")
        raise UsageError(f"no LoRA adapter in {folder}", f"expected {LORA_NAME} and {CONFIG_NAME}: {_LAYOUT_HINT}")
    if not (consolidated / LORA_NAME).is_file():
        raise _full_checkpoint(consolidated / FULL_NAME)
    return consolidated / LORA_NAME


def _consolidated(folder: Path) -> Path | None:
    """The folder that holds a checkpoint's files: FOLDER itself or its consolidated/ child."""
    for candidate in (folder, folder / "consolidated"):
        if any((candidate / name).is_file() for name in (LORA_NAME, FULL_NAME)):
            return candidate
    return None


def _newest_consolidated(folder: Path) -> Path | None:
    """The consolidated/ folder of the newest checkpoint under FOLDER or FOLDER/checkpoints."""
    for parent in (folder / "checkpoints", folder):
        # A checkpoint still being written has only tmp.consolidated/, which _consolidated skips.
        try:
            found = [(int(m["step"]), child / "consolidated") for child in parent.iterdir()
                     if (m := _CHECKPOINT.match(child.name)) and _consolidated(child / "consolidated")]
        except OSError:
            continue
        if found:
            return max(found)[1]
    return None


def _full_checkpoint(weight: Path) -> UsageError:
    return UsageError(f"{weight} is a full checkpoint, not a LoRA adapter",
                      f"serve it with --moshi-weight {weight} (the config beside it is used)")


def _require_lora(weight: Path) -> None:
    if not any(_LORA_KEY.match(name) for name in read_header(weight)):
        raise _full_checkpoint(weight)


def _lora_settings(config: Path, weight: Path) -> tuple[int, float]:
    if not config.is_file():
        raise UsageError(f"LoRA adapter {weight}: no {CONFIG_NAME} beside it",
                         f"moshi-finetune writes {CONFIG_NAME} next to {LORA_NAME}; copy it from the same "
                         "checkpoint folder")
    data = read_json(config)
    if not data.get("lora"):
        raise UsageError(f"{config} says lora: {json.dumps(data.get('lora', False))}: not a LoRA adapter's config",
                         f"give the {CONFIG_NAME} that moshi-finetune wrote beside this {LORA_NAME}")
    rank = data.get("lora_rank", DEFAULT_LORA_RANK)
    scaling = data.get("lora_scaling", DEFAULT_LORA_SCALING)
    if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
        raise ConfigError(f"{config}: lora_rank must be a positive integer, not {json.dumps(rank)}")
    if isinstance(scaling, bool) or not isinstance(scaling, (int, float)):
        raise ConfigError(f"{config}: lora_scaling must be a number, not {json.dumps(scaling)}")
    return rank, float(scaling)


read_json = lm_config.read


# --- does it fit the base? --------------------------------------------------------------------------


def check_fits(adapter: Adapter, base_weight: Path, base_lm_kwargs: dict, *, base_name: str | None = None) -> None:
    """UsageError unless moshi can load ADAPTER over BASE_WEIGHT built with BASE_LM_KWARGS (headers only).

    BASE_NAME (a variant's name, say) replaces the base's path in the message."""
    problem = (_config_difference(read_json(adapter.config), base_lm_kwargs)
               or _tensor_difference(read_header(adapter.weight), read_header(base_weight), adapter.rank))
    if problem:
        raise UsageError(f"LoRA adapter {adapter.weight} does not fit {base_name or base_weight}: {problem}",
                         _FIT_HINT)


lm_kwargs = lm_config.lm_kwargs
lm_kwargs_of = lm_config.lm_kwargs_of


def _config_difference(adapter_config: dict, base: dict) -> str | None:
    depformer = sorted({k for k in (*adapter_config, *base)
                        if k.startswith("depformer_") and k not in _IGNORED_DEPFORMER_KEYS})
    for key in (*ARCH_KEYS, *depformer):
        if key in adapter_config and key in base and _canonical(adapter_config[key]) != _canonical(base[key]):
            return (f"{key} is {json.dumps(adapter_config[key])} in the adapter's {CONFIG_NAME}, "
                    f"{json.dumps(base[key])} in the base")
    return None


def _canonical(value: tp.Any) -> tp.Any:
    return json.loads(json.dumps(value))  # tuples and lists compare alike


def _tensor_difference(adapter: dict[str, Tensor], base: dict[str, Tensor], rank: int) -> str | None:
    modules: dict[str, dict[str, Tensor]] = {}
    extra: dict[str, Tensor] = {}
    for name, tensor in adapter.items():
        match = _LORA_KEY.match(name)
        if match:
            modules.setdefault(match["module"], {})[match["part"]] = tensor
        else:
            extra[name] = tensor
    if not modules:
        return "it holds no lora_A/lora_B weights"
    modules, problem = _split_legacy(modules, rank)
    if problem:
        return problem
    steps = _step_counts(modules)
    for module, parts in modules.items():
        problem = _module_difference(module, parts, base, rank, steps)
        if problem:
            return problem
    return _extra_difference(extra, base)


def _split_legacy(modules: dict[str, dict[str, Tensor]], rank: int) -> tuple[dict, str | None]:
    """Legacy stacked adapter names (``in_proj.lora_A``) as the per-step modules moshi splits them into."""
    out: dict[str, dict[str, Tensor]] = {}
    for module, parts in modules.items():
        match = _LEGACY_LORA.match(module)
        if match is None or any(len(parts.get(part, Tensor("", ())).shape) != 2 for part in "AB"):
            out[module] = parts  # _module_difference says what is wrong with it, if anything
            continue
        (a_rows, a_in), (b_rows, b_rank) = parts["A"].shape, parts["B"].shape
        mult = a_rows // rank
        if a_rows % rank or b_rows % max(mult, 1) or mult == 0:
            return out, f"{module}.lora_A.weight has {a_rows} rows, not a multiple of lora_rank {rank}"
        for i in range(mult):
            out[f"{match['prefix']}.{match['kind']}_projs.{i}"] = {
                "A": Tensor(parts["A"].dtype, (rank, a_in)),
                "B": Tensor(parts["B"].dtype, (b_rows // mult, b_rank))}
    return out, None


def _step_counts(modules: dict[str, dict[str, Tensor]]) -> dict[tuple[str, str], int]:
    counts: dict[tuple[str, str], int] = {}
    for module in modules:
        match = _SPLIT.match(module)
        if match:
            key = (match["prefix"], match["kind"])
            counts[key] = counts.get(key, 0) + 1
    return counts


def _module_difference(module: str, parts: dict[str, Tensor], base: dict[str, Tensor], rank: int,
                       steps: dict[tuple[str, str], int]) -> str | None:
    for part in "AB":
        if part not in parts:
            return f"{module}.lora_{part}.weight is missing"
        if len(parts[part].shape) != 2:
            return f"{module}.lora_{part}.weight has shape {list(parts[part].shape)}, not a matrix"
    (a_rank, a_in), (b_out, b_rank) = parts["A"].shape, parts["B"].shape
    for part, found in (("A", a_rank), ("B", b_rank)):
        if found != rank:
            return f"{module}.lora_{part}.weight has rank {found}, its {CONFIG_NAME} says lora_rank {rank}"
    expected = _base_shape(module, base, steps)
    if isinstance(expected, str):
        return f"{module}: {expected}"
    if (b_out, a_in) != expected:
        return f"{module} is {b_out}x{a_in} in the adapter, {'x'.join(map(str, expected))} in the base"
    return None


def _base_shape(module: str, base: dict[str, Tensor], steps: dict[tuple[str, str], int]) -> tuple[int, ...] | str:
    """(out, in) of the base weight that the LoRA pair wraps, or why there is none.

    Legacy attention weights hold the steps stacked: moshi splits them in as many blocks as the model has
    steps, and a complete adapter has one LoRA pair per step."""
    direct = base.get(f"{module}.weight")
    if direct is not None:
        return direct.shape
    match = _SPLIT.match(module)
    stacked = None if match is None else next(
        (base[match["prefix"] + s] for s in _LEGACY_BASE[match["kind"]] if match["prefix"] + s in base), None)
    if match is None or stacked is None:
        return "no such weight in the base"
    mult = steps[(match["prefix"], match["kind"])]
    if len(stacked.shape) != 2 or stacked.shape[0] % mult:
        return f"the base's stacked weight {list(stacked.shape)} does not split in {mult} steps"
    return (stacked.shape[0] // mult, stacked.shape[1])


def _extra_difference(extra: dict[str, Tensor], base: dict[str, Tensor]) -> str | None:
    """Tensors trained in full next to the adapter (moshi-finetune's ft_embed) replace the base's."""
    for name, tensor in extra.items():
        if name not in base:
            return f"{name} is not in the base"
        if tensor.shape != base[name].shape:
            return f"{name} is {list(tensor.shape)} in the adapter, {list(base[name].shape)} in the base"
    return None


# --- the config beside a full checkpoint ------------------------------------------------------------


def local_config(weight: Path, data_dir: Path) -> Path | None:
    """The moshi config.json for a --moshi-weight file, from the files beside it; None if there is none.

    config.json is used as is unless it holds LoRA keys, as moshi-finetune's do: then a copy without them,
    because with ``lora: true`` and no adapter moshi adds randomly initialised LoRA layers (its merged
    checkpoints say true), and moshi 0.2.2 does not know the keys at all. nu-dialogue's
    moshi_lm_kwargs.json holds the LM kwargs at top level, which is what config.json is, so it is copied as
    it is. Copies go to DATA_DIR/lm-configs/<content hash>.json."""
    folder = Path(weight).parent
    config = folder / CONFIG_NAME
    if config.is_file():
        data = read_json(config)
        if not any(key in data for key in LORA_KEYS):
            return config
        return lm_config.write({k: v for k, v in data.items() if k not in LORA_KEYS}, data_dir)
    kwargs = folder / NU_KWARGS_NAME
    if kwargs.is_file():
        return lm_config.write(read_json(kwargs), data_dir)
    return None


__all__ = [
    "Adapter",
    "Tensor",
    "lm_kwargs",
    "check_fits",
    "find_adapter",
    "local_config",
    "read_header",
    "read_json",
]
