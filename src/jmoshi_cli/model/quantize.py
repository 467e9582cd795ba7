"""int8 J-Moshi for 16 GB GPUs: made once from the bf16 checkpoint with moshi's own quantization code.

J-Moshi publishes bf16 weights only (~15.4 GB; ~18.7 GB of GPU memory to serve). moshi >= 0.2.13
runs an LM whose config says ``"quantize": true`` with every ``nn.Linear`` replaced by its
``QLinear`` (bitsandbytes int8 weights + a float32 scale per row, ``weight_scb``), about 10-12 GB of
GPU memory. Loading such a checkpoint expects the int8 weights already made, so jmoshi makes them:

- Every Linear weight goes through ``moshi.utils.quantize.QLinear`` itself, one tensor at a time,
  and is streamed into a new safetensors file: peak host memory is a few tensors (a few hundred MB
  for J-Moshi), not the model. Names are the model's own (the attention's legacy ``in_proj_weight``
  is split by the model's own load hook first), so the file loads with ``strict`` key checks.
- The result lives outside the Hugging Face snapshot, in ``<data dir>/int8/<sha256 of the source>/``,
  beside the LM config that says ``quantize`` and a manifest with the file's size and sha256. The
  weights are written to a ``.partial`` file, hashed while written, read back and hashed again, then
  renamed; the manifest comes last. A folder without a manifest is never used. Loading it checks it
  against that sha256 as derived.py says (hashed again when its stamp changed; removed when it differs).
- moshi 0.2.13 casts every floating tensor of a checkpoint to the model's dtype when it loads it,
  ``weight_scb`` included, and then its QLinear refuses the bfloat16 scales. :func:`restore_scales`
  puts the float32 scales from the file back after loading (the server child and `jmoshi infer`).

moshi 0.2.2 has another, older int8 scheme (``quantize_transformer``) and no config file: int8 is
offered on the current runtime only.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import struct
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Protocol

from ..errors import CacheError, UsageError
from . import derived, lm_config

if TYPE_CHECKING:
    import torch

FORMAT = 1
WEIGHT, CONFIG, MANIFEST = "model.int8.safetensors", "config.json", "int8.json"
_TORCH: dict = {}  # the same names as torch dtypes, filled on first use (torch is imported late)


def check_runtime(rt) -> None:
    """Refuse int8 where moshi or bitsandbytes cannot run it, before anything is made or loaded."""
    from ..runtime import CURRENT, INSTALL

    if not rt.has_int8:
        raise UsageError(f"int8 needs the current runtime (moshi 0.2.13); this is moshi {rt.moshi}",
                         f"install it: {INSTALL[CURRENT]}, or serve bf16 on a GPU with ~19 GB free")
    if rt.bitsandbytes is None:
        raise UsageError("int8 needs bitsandbytes, which is not installed",
                         "pip install 'bitsandbytes>=0.45,<0.50' (Linux), or serve bf16")


# --- the int8 checkpoint in jmoshi's data folder -------------------------------------------------------


@dataclass(frozen=True)
class Int8Checkpoint:
    weight: Path
    config: Path
    source_sha256: str
    size: int
    made_s: float | None = None  # seconds it took to make, None when it was already there


def folder_for(data_dir: Path, source_sha256: str) -> Path:
    return data_dir / "int8" / source_sha256


def cached(folder: Path) -> Int8Checkpoint | None:
    """The int8 checkpoint in `folder` if it was finished (its manifest written) and is still whole."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
        weight = folder / WEIGHT
        if manifest.get("format") != FORMAT or weight.stat().st_size != manifest["size"] \
                or not (folder / CONFIG).is_file():
            return None
        return Int8Checkpoint(weight, folder / CONFIG, manifest["source_sha256"], manifest["size"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def verify(checkpoint: Int8Checkpoint) -> bool:
    """Whether the int8 file still has the sha256 it was written with (reads it whole; a match is recorded)."""
    return derived.matches(checkpoint.weight, checkpoint.weight.parent / MANIFEST)


def recheck(data_dir: Path, source_sha256: str) -> list[derived.Rechecked]:
    """The int8 checkpoint of that source, if one was made, hashed whole; removed when it no longer matches."""
    folder = folder_for(data_dir, source_sha256)
    if cached(folder) is None:
        return []
    with derived.locked(folder):
        found = cached(folder)  # removed meanwhile by another jmoshi
        if found is None:
            return []
        return [derived.recheck("int8", found.weight, folder / MANIFEST, lambda: verify(found))]


def _confirmed(found: Int8Checkpoint, on_note: Callable[[str], None]) -> Int8Checkpoint:
    derived.confirm("the int8 checkpoint", found.weight, found.weight.parent / MANIFEST, lambda: verify(found),
                    on_note)
    return found


def int8_files(plan, files, data_dir: Path, on_note: Callable[[str], None]):
    """`files` (artifacts.ModelFiles) with the int8 checkpoint and its config in place of the bf16 ones."""
    from dataclasses import replace

    entry = plan.entry("moshi")  # absent with --moshi-weight: that file is hashed instead
    sha = entry.artifact.sha256 if entry is not None and entry.path == files.moshi_weight else None
    made = ensure_int8(data_dir, files.moshi_weight, sha, files.config, on_note)
    if made.made_s is not None:
        on_note(f"int8 checkpoint made in {made.made_s:.0f} s: {made.size / 1e9:.1f} GB, sha256 verified")
    return replace(files, moshi_weight=made.weight, config=made.config)


def ensure_int8(data_dir: Path, source: Path, source_sha256: str | None, config: Path | None,
                on_note: Callable[[str], None] = lambda note: None) -> Int8Checkpoint:
    """The int8 checkpoint of `source`, made now if it is not there yet (once per source file)."""
    sha = source_sha256 or derived.local_sha256(data_dir, source, on_note, "int8 checkpoint")
    folder = folder_for(data_dir, sha)
    found = cached(folder)
    if found is not None and derived.unchanged(found.weight, folder / MANIFEST):
        return found
    derived.make_folder(folder)
    with derived.locked(folder):
        found = cached(folder)  # made meanwhile by another jmoshi
        if found is not None:
            return _confirmed(found, on_note)
        on_note(f"making the int8 checkpoint of {source.name} once (moshi's QLinear, bitsandbytes); "
                f"it is kept in {folder}")
        return make_int8(source, folder, sha, lm_config.base(config))


# --- making it -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Out:
    """One tensor of the int8 file: where it comes from and what it becomes."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    source: str  # the key in the bf16 checkpoint it is made from


def lm_kwargs(config: dict) -> dict:
    """The LMModel arguments of a config, as moshi reads them, without `quantize` (jmoshi's meta model is
    built with plain Linears, which tell what to quantize)."""
    return {k: v for k, v in lm_config.lm_kwargs_of(config).items() if k != "quantize"}


def make_int8(source: Path, folder: Path, source_sha256: str, lm_config: dict) -> Int8Checkpoint:
    """Quantize `source` into `folder` (weights, config, manifest), one tensor in memory at a time."""
    import torch

    from ..upstream import moshi_int8

    started = time.monotonic()
    moshi_int8.import_bitsandbytes()  # before moshi's QLinear imports it (with torch.compile's start-up)
    model = _meta_model(lm_config)
    reader = open_checkpoint(source)
    layout = _layout(reader, model)
    size = _file_size(layout)
    derived.check_room(folder, size, "the int8 checkpoint")
    with derived.written_in_one_step(folder / WEIGHT, "the int8 checkpoint") as partial, torch.no_grad():
        written = _write(partial, layout, reader, model, source_sha256)
        _check_written(partial, written, layout)
    _finish(folder, lm_config, source_sha256, size, written)
    return Int8Checkpoint(folder / WEIGHT, folder / CONFIG, source_sha256, size, time.monotonic() - started)


def _torch_dtypes() -> None:
    import torch

    _TORCH.update(BF16=torch.bfloat16, F16=torch.float16, F32=torch.float32, F64=torch.float64, I8=torch.int8,
                  U8=torch.uint8, I16=torch.int16, I32=torch.int32, I64=torch.int64, BOOL=torch.bool)


def open_checkpoint(source: Path) -> derived.SafetensorsReader:
    return derived.SafetensorsReader(source)


def _tensor(reader: derived.SafetensorsReader, key: str):
    """A tensor of the source as torch has it (its own dtype), read on its own."""
    import torch

    if not _TORCH:
        _torch_dtypes()
    data, dtype, shape = reader.raw(key), reader.dtype(key), reader.shape(key)
    if not data:
        return torch.empty(shape, dtype=_TORCH[dtype])
    return torch.frombuffer(data, dtype=_TORCH[dtype]).reshape(shape)


def _check_written(partial: Path, written: str, layout: list[_Out]) -> None:
    """Read the file back: the same bytes, and the real reader finds every tensor."""
    if derived.sha256_of(partial) != written:
        raise CacheError(f"the int8 checkpoint read back from {partial} differs from what was written",
                         "check the disk (`dmesg`), then run the command again")
    if set(open_checkpoint(partial).keys()) != {o.name for o in layout}:
        raise CacheError(f"the int8 checkpoint {partial} lost tensors", "run the command again")


def _meta_model(lm_config: dict):
    """The LM as moshi builds it, on the meta device (no memory): which tensors feed a Linear."""
    from moshi.models import loaders

    return loaders.get_moshi_lm(None, lm_kwargs=lm_kwargs(lm_config), device="meta")


def _parts(model, key: str, tensor) -> dict[str, Any]:
    """A checkpoint tensor under the model's names: attention's legacy names split by its own load hook."""
    from moshi.modules.transformer import StreamingMultiheadAttention

    prefix = key.rpartition(".")[0]
    while prefix:
        with contextlib.suppress(AttributeError):
            module = model.get_submodule(prefix)
            if isinstance(module, StreamingMultiheadAttention):
                parts = {key: tensor}
                StreamingMultiheadAttention._load_hook(module, parts, prefix + ".")
                return parts
        prefix = prefix.rpartition(".")[0]
    return {key: tensor}


def _quantized(model, name: str) -> bool:
    import torch

    if not name.endswith(".weight"):
        return False
    try:
        return isinstance(model.get_submodule(name[: -len(".weight")]), torch.nn.Linear)
    except AttributeError:
        return False


def _layout(reader, model) -> list[_Out]:
    """Every tensor of the int8 file, in order, from the source's header only (no data read)."""
    import torch

    layout = []
    for key in reader.keys():
        dtype, shape = reader.dtype(key), reader.shape(key)
        meta = torch.empty(shape, dtype=torch.float32, device="meta")
        for name, part in _parts(model, key, meta).items():
            if _quantized(model, name):
                layout.append(_Out(name, "I8", tuple(part.shape), key))
                layout.append(_Out(name + "_scb", "F32", (part.shape[0],), key))
            else:
                layout.append(_Out(name, dtype, tuple(part.shape), key))
    return layout


def _nbytes(out: _Out) -> int:
    return derived.count(out.shape) * derived.BYTES[out.dtype]


def _header(layout: list[_Out], source_sha256: str) -> bytes:
    entries: dict[str, Any] = {"__metadata__": {"format": "pt", "quantized_by": "moshi.utils.quantize.QLinear",
                                                "source_sha256": source_sha256}}
    offset = 0
    for out in layout:
        end = offset + _nbytes(out)
        entries[out.name] = {"dtype": out.dtype, "shape": list(out.shape), "data_offsets": [offset, end]}
        offset = end
    text = json.dumps(entries, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # safetensors aligns the data to 8 bytes
    return struct.pack("<Q", len(text)) + text


def _file_size(layout: list[_Out]) -> int:
    return len(_header(layout, "0" * 64)) + sum(_nbytes(o) for o in layout)


def _write(path: Path, layout: list[_Out], reader, model, source_sha256: str) -> str:
    """Stream the int8 file: each source tensor read, split, quantized and written, then dropped."""
    digest = hashlib.sha256()
    done: dict[str, Any] = {}  # the current source tensor's parts, quantized: at most one tensor's worth
    current = None
    with open(path, "wb") as f:
        def put(data: bytes | memoryview) -> None:
            f.write(data)
            digest.update(data)

        put(_header(layout, source_sha256))
        for out in layout:
            if out.source != current:
                current, done = out.source, _convert(model, out.source, _tensor(reader, out.source))
            put(memoryview(_raw(done[out.name])))
        f.flush()
        os.fsync(f.fileno())
    return digest.hexdigest()


class _Int8Weights(Protocol):
    """The parameters of moshi's QLinear: it sets them from an untyped bitsandbytes call, so their type is
    not inferred from it."""

    weight: torch.Tensor
    weight_scb: torch.Tensor


def _convert(model, key: str, tensor) -> dict[str, Any]:
    """The output tensors made from one source tensor: int8 weight and float32 scale, or as it was."""
    from moshi.utils.quantize import QLinear
    from torch import nn

    converted = {}
    for name, part in _parts(model, key, tensor).items():
        if _quantized(model, name):
            linear = nn.Linear(part.shape[1], part.shape[0], bias=False, device="meta")
            linear.weight = nn.Parameter(part, requires_grad=False)
            quantized: _Int8Weights = QLinear(linear)
            converted[name], converted[name + "_scb"] = quantized.weight.data, quantized.weight_scb.data
        else:
            converted[name] = part
    return converted


def _raw(tensor):
    import torch

    return tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy()


def _finish(folder: Path, lm_config: dict, source_sha256: str, size: int, sha256: str) -> None:
    from importlib import metadata

    from ..fsutil import atomic_write_text

    atomic_write_text(folder / CONFIG, json.dumps({**lm_config, "quantize": True}, indent=2) + "\n")
    versions = {}
    for package in ("moshi", "bitsandbytes", "torch"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[package] = metadata.version(package)
    manifest = {"format": FORMAT, "source_sha256": source_sha256, "size": size, "sha256": sha256, **versions,
                derived.STAMP: derived.stamp(folder / WEIGHT)}
    atomic_write_text(folder / MANIFEST, json.dumps(manifest, indent=2) + "\n")  # last: the folder is complete


# --- loading it ------------------------------------------------------------------------------------------


def restore_scales(model, weight: Path) -> int:
    """Put the float32 ``weight_scb`` scales of `weight` back into a loaded model (moshi cast them).

    Returns how many were restored; a model without QLinear layers is left as it is.
    """
    import torch
    from moshi.utils.quantize import QLinear
    from safetensors import safe_open

    restored = 0
    with safe_open(str(weight), "pt") as reader:
        for key in reader.keys():
            if not key.endswith(".weight_scb"):
                continue
            module = model.get_submodule(key[: -len(".weight_scb")])
            if isinstance(module, QLinear):
                layer: _Int8Weights = module
                device = layer.weight.device
                layer.weight_scb = torch.nn.Parameter(reader.get_tensor(key).to(device), requires_grad=False)
                restored += 1
    return restored
