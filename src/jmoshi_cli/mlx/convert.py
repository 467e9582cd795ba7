"""nu-dialogue's PyTorch checkpoints as moshi_mlx weights: made once per source file, streamed.

moshi_mlx loads only its own layout (``load_weights(strict=True)``): other names, the depformer split
into one module per codebook, norms as plain vectors, and for q8/q4 every Linear and Embedding
quantized by ``mlx.nn.quantize`` (8 bits in groups of 64, 4 bits in groups of 32, as Kyutai's own MLX
weights). This module writes that file from nu-dialogue's safetensors:

- Both attention layouts: moshi <= 0.2.3's ``self_attn.in_proj_weight`` / ``out_proj.weight`` (the
  depformer's steps stacked on dim 0) and moshi >= 0.2.4's ``in_projs.{i}.weight`` /
  ``out_projs.{i}.weight`` give the same bytes.
- Streamed: the output's layout comes from the model built lazily (MLX allocates nothing until a
  value is used), so the header is written first; then each source tensor is read with plain file
  reads, converted, written and dropped. Peak memory is a few tensors (~1 GB for J-Moshi), whatever
  the file size: a 16 GB Mac turns the 15.4 GB bf16 file into 4-bit.
- Kept in ``<data dir>/mlx/<sha256 of the source>/``: ``config.json`` (the moshi LM kwargs: the repo's
  own, or moshi's built-in 7B ones when it has none, as J-Moshi) and ``model.<precision>.safetensors``
  with its manifest ``<precision>.json``, written last (size and sha256). A file without its manifest
  is never used. The file is hashed while written and read back before it is renamed into place; loading
  it checks it against that sha256 as derived.py says (hashed again when its stamp changed; removed when
  it differs).
- Mimi: rustymimi reads only the legacy attention names; a Mimi saved by moshi >= 0.2.4 is copied
  under those names into ``<data dir>/mlx/mimi/<sha256>/`` (a legacy one is used as it is).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import re
import struct
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ..errors import CacheError, UsageError
from ..model import derived
from ..model.precision import Precision
from .model import Quantization

FORMAT = 1
CONFIG = "config.json"
MIMI = "mimi.safetensors"
MIMI_MANIFEST = "mimi.json"
_MLX_NAMES = {"bfloat16": "BF16", "float16": "F16", "float32": "F32", "uint32": "U32", "int32": "I32"}


# moshi_mlx's own choices (local_web -q 8|4, Kyutai's MLX weights): 8 bits in groups of 64, 4 in groups of 32.
QUANTIZATION = {Precision.BF16: None, Precision.INT8: Quantization(8, 64), Precision.INT4: Quantization(4, 32)}


def quantization_for(precision: Precision) -> Quantization | None:
    """How moshi_mlx quantizes at `precision` (None: bf16); UsageError for AUTO, which jmoshi decides first."""
    try:
        return QUANTIZATION[Precision(precision)]
    except (KeyError, ValueError):
        raise UsageError(f"the MLX backend holds weights in bf16, int8 or int4, not {precision}",
                         "int4 needs ~5 GB of unified memory for J-Moshi, int8 ~9 GB, bf16 ~17 GB") from None


@dataclass(frozen=True)
class MlxCheckpoint:
    weight: Path  # model.<precision>.safetensors
    config: Path  # config.json: the moshi LM kwargs
    precision: Precision
    source_sha256: str
    size: int
    made_s: float | None = None  # seconds it took to make, None when it was already there


def folder_for(data_dir: Path, source_sha256: str) -> Path:
    return Path(data_dir) / "mlx" / source_sha256


def weight_name(precision: Precision) -> str:
    return f"model.{precision.value}.safetensors"


def manifest_name(precision: Precision) -> str:
    return f"{precision.value}.json"


def cached(folder: Path, precision: Precision) -> MlxCheckpoint | None:
    """The checkpoint in `folder` if it was finished (its manifest written) and has its recorded size."""
    try:
        manifest = json.loads((folder / manifest_name(precision)).read_text(encoding="utf-8"))
        weight = folder / weight_name(precision)
        if manifest.get("format") != FORMAT or manifest.get("precision") != precision.value \
                or weight.stat().st_size != manifest["size"] or not (folder / CONFIG).is_file():
            return None
        return MlxCheckpoint(weight, folder / CONFIG, precision, manifest["source_sha256"], manifest["size"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def verify(checkpoint: MlxCheckpoint) -> bool:
    """Whether the file still has the sha256 it was written with (reads it whole; a match is recorded)."""
    return derived.matches(checkpoint.weight, checkpoint.weight.parent / manifest_name(checkpoint.precision))


def verify_mimi(folder: Path) -> bool:
    """Whether the renamed Mimi in `folder` still has the sha256 it was written with (as verify)."""
    return derived.matches(folder / MIMI, folder / MIMI_MANIFEST)


def recheck_lm(data_dir: Path, source_sha256: str) -> list[derived.Rechecked]:
    """The MLX weights made from that LM at each precision, hashed whole; removed when they no longer match."""
    folder = folder_for(data_dir, source_sha256)
    if not any(cached(folder, p) for p in QUANTIZATION):
        return []
    with derived.locked(folder):
        found = [made for made in (cached(folder, p) for p in QUANTIZATION) if made is not None]
        return [derived.recheck(f"mlx-{made.precision.value}", made.weight, folder / manifest_name(made.precision),
                                functools.partial(verify, made)) for made in found]


def recheck_mimi(data_dir: Path, source_sha256: str) -> list[derived.Rechecked]:
    """The renamed copy of that Mimi, if one was made, hashed whole; removed when it no longer matches."""
    folder = mimi_folder_for(data_dir, source_sha256)
    if not _mimi_cached(folder):
        return []
    with derived.locked(folder):
        if not _mimi_cached(folder):
            return []
        return [derived.recheck("mlx-mimi", folder / MIMI, folder / MIMI_MANIFEST, lambda: verify_mimi(folder))]


def _confirmed(found: MlxCheckpoint, on_note: Callable[[str], None]) -> MlxCheckpoint:
    derived.confirm(f"the MLX {found.precision.value} weights", found.weight,
                    found.weight.parent / manifest_name(found.precision), lambda: verify(found), on_note)
    return found


def lm_kwargs_for(config: Path | None) -> dict[str, Any]:
    """The LM kwargs of the repo's config.json, or moshi's built-in Moshi-7B ones when it has none (J-Moshi)."""
    from ..model import lm_config

    return lm_config.lm_kwargs(config)


def check_precision(lm_kwargs: dict[str, Any], precision: Precision) -> None:
    """UsageError, before anything is made or loaded, when `precision` cannot hold this LM."""
    from .model import build_lm

    build_lm(lm_kwargs, quantization_for(precision))


def weights_size(lm_kwargs: dict[str, Any], precision: Precision) -> int:
    """Bytes of the LM's weights at `precision` (what they take in unified memory, the KV cache aside)."""
    from .model import build_lm

    return sum(array.nbytes for array in _parameters(build_lm(lm_kwargs, quantization_for(precision))).values())


def ensure_mlx(data_dir: Path, source: Path, source_sha256: str | None, config: Path | None,
               precision: Precision, on_note: Callable[[str], None] = lambda note: None) -> MlxCheckpoint:
    """The MLX weights of `source` at `precision`, made now if they are not there yet (once per source file).

    source_sha256: the verified hash of `source` when known (hashed here otherwise, once per file).
    config: the repo's config.json, None for J-Moshi (moshi's built-in 7B kwargs).
    """
    sha = source_sha256 or derived.local_sha256(Path(data_dir), Path(source), on_note, "MLX weights")
    folder = folder_for(data_dir, sha)
    found = cached(folder, precision)
    if found is not None and derived.unchanged(found.weight, folder / manifest_name(precision)):
        return found
    lm_kwargs = lm_kwargs_for(config)
    check_precision(lm_kwargs, precision)
    derived.make_folder(folder)
    with derived.locked(folder):
        found = cached(folder, precision)  # made meanwhile by another jmoshi
        if found is not None:
            return _confirmed(found, on_note)
        on_note(f"converting {Path(source).name} to MLX {precision.value} once; it is kept in {folder}")
        return convert_lm(Path(source), folder, sha, lm_kwargs, precision)


# --- reading a safetensors file tensor by tensor ----------------------------------------------------------


class Reader(derived.SafetensorsReader):
    """The source read tensor by tensor (derived.SafetensorsReader), each tensor as an MLX array."""

    def array(self, key: str):
        """The tensor as an MLX array (its own dtype)."""
        import mlx.core as mx
        import numpy as np

        dtype, shape, data = self.dtype(key), self.shape(key), self.raw(key)
        if dtype == "BF16":
            return mx.array(np.frombuffer(data, dtype=np.uint16).reshape(shape)).view(mx.bfloat16)
        numpy_dtype = {"F16": np.float16, "F32": np.float32, "I32": np.int32, "I64": np.int64, "U8": np.uint8,
                       "I8": np.int8, "U32": np.uint32}[dtype]
        return mx.array(np.frombuffer(data, dtype=numpy_dtype).reshape(shape))


# --- PyTorch names -> moshi_mlx names ------------------------------------------------------------------------


@dataclass(frozen=True)
class _Target:
    """One MLX tensor made from a source tensor: its name, and which part of the source it is."""

    name: str
    chunk: int | None = None  # the depformer step's slice of a stacked tensor (dim 0), None: all of it
    chunks: int = 1
    vector: bool = False  # a norm's alpha (1, 1, dim) becomes a vector (dim,)


_RULES: list[tuple[re.Pattern, Callable[..., list[_Target]]]] = []


def _rule(pattern: str):
    def register(make):
        _RULES.append((re.compile(pattern + "$"), make))
        return make

    return register


@_rule(r"(text_emb(?:\.out1|\.out2|\.low_rank)?\.weight|text_linear\.weight|(?:condition_provider|extra_heads)\..*)")
def _same(m, plan):
    return [_Target(m[1])]


@_rule(r"out_norm\.alpha")
def _out_norm(m, plan):
    return [_Target("out_norm.weight", vector=True)]


@_rule(r"emb\.(\d+)\.weight")
def _audio_emb(m, plan):
    return [_Target(f"audio_embs.{m[1]}.weight")]


@_rule(r"transformer\.layers\.(\d+)\.(norm[12])\.alpha")
def _norm(m, plan):
    return [_Target(f"transformer.layers.{m[1]}.{m[2]}.weight", vector=True)]


@_rule(r"(transformer\.layers\.\d+\.(?:layer_scale_[12]\.scale|gating\.linear_(?:in|out)\.weight))")
def _main_same(m, plan):
    return [_Target(m[1])]


@_rule(r"transformer\.layers\.(\d+)\.self_attn\.(?:in_proj_weight|in_projs\.0\.weight)")
def _main_in_proj(m, plan):
    return [_Target(f"transformer.layers.{m[1]}.self_attn.in_proj.weight")]


@_rule(r"transformer\.layers\.(\d+)\.self_attn\.(?:out_proj\.weight|out_projs\.0\.weight)")
def _main_out_proj(m, plan):
    return [_Target(f"transformer.layers.{m[1]}.self_attn.out_proj.weight")]


@_rule(r"depformer_in\.(\d+)\.weight")
def _dep_in(m, plan):
    return [_Target(f"depformer.slices.{s}.linear_in.weight") for s in plan.slices_of(int(m[1]))]


@_rule(r"linears\.(\d+)\.weight")
def _dep_out(m, plan):
    return [_Target(f"depformer.slices.{m[1]}.linear_out.weight")]


@_rule(r"depformer_text_emb\.((?:low_rank\.|out1\.|out2\.)?weight)")
def _dep_text_emb(m, plan):
    return [_Target(f"depformer.slices.0.emb.{m[1]}")]


@_rule(r"depformer_emb\.(\d+)\.((?:low_rank\.)?weight)")
def _dep_emb(m, plan):
    return [_Target(f"depformer.slices.{int(m[1]) + 1}.emb.{m[2]}")]


@_rule(r"depformer\.layers\.(\d+)\.(norm[12])\.alpha")
def _dep_norm(m, plan):  # one norm shared by every step in PyTorch, one copy per slice in MLX
    return [_Target(f"depformer.slices.{s}.transformer.layers.{m[1]}.{m[2]}.weight", vector=True)
            for s in range(plan.slices)]


@_rule(r"depformer\.layers\.(\d+)\.gating\.(\d+)\.(linear_(?:in|out))\.weight")
def _dep_gating(m, plan):
    return [_Target(f"depformer.slices.{s}.transformer.layers.{m[1]}.gating.{m[3]}.weight")
            for s in plan.slices_of(int(m[2]))]


@_rule(r"depformer\.layers\.(\d+)\.self_attn\.(in_proj_weight|out_proj\.weight)")
def _dep_stacked(m, plan):
    proj = "in_proj" if m[2] == "in_proj_weight" else "out_proj"
    return [_Target(f"depformer.slices.{s}.transformer.layers.{m[1]}.self_attn.{proj}.weight",
                    chunk=plan.step_of(s), chunks=plan.steps) for s in range(plan.slices)]


@_rule(r"depformer\.layers\.(\d+)\.self_attn\.(in|out)_projs\.(\d+)\.weight")
def _dep_split(m, plan):
    return [_Target(f"depformer.slices.{s}.transformer.layers.{m[1]}.self_attn.{m[2]}_proj.weight")
            for s in plan.slices_of(int(m[3]))]


@dataclass(frozen=True)
class _Steps:
    """Which of PyTorch's per-step depformer weights each MLX slice (one per audio codebook) uses."""

    slices: int
    schedule: tuple[int, ...] | None

    @property
    def steps(self) -> int:
        return max(self.schedule) + 1 if self.schedule else self.slices

    def step_of(self, slice_index: int) -> int:
        return self.schedule[slice_index] if self.schedule else slice_index

    def slices_of(self, step: int) -> list[int]:
        return [s for s in range(self.slices) if self.step_of(s) == step]


def targets(key: str, steps: _Steps) -> list[_Target]:
    for pattern, make in _RULES:
        m = pattern.match(key)
        if m:
            return make(m, steps)
    raise CacheError(f"unexpected tensor {key} in the LM checkpoint: not a Moshi-shaped model",
                     "use --backend torch for this model")


# --- the output file ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Out:
    name: str
    dtype: str  # safetensors' name
    shape: tuple[int, ...]
    source: str  # the key in the PyTorch checkpoint it is made from
    target: _Target
    quantization: Quantization | None  # of a quantized layer's weight, which becomes weight, scales and biases

    @property
    def nbytes(self) -> int:
        return derived.count(self.shape) * derived.BYTES[self.dtype]


def _parameters(model) -> dict[str, Any]:
    from mlx.utils import tree_flatten

    return dict(tree_flatten(model.parameters()))


def _layout(reader: Reader, lm_kwargs: dict[str, Any], precision: Precision) -> list[_Out]:
    """Every tensor of the MLX file, in source order, from the source's header and the lazily built model."""
    from .model import build_lm

    plain = {name: tuple(a.shape) for name, a in _parameters(build_lm(lm_kwargs, None)).items()}
    final = _parameters(build_lm(lm_kwargs, quantization_for(precision)))
    steps = _Steps(lm_kwargs["dep_q"], tuple(lm_kwargs["depformer_weights_per_step_schedule"])
                   if lm_kwargs.get("depformer_weights_per_step_schedule") else None)
    layout, seen = [], set()
    for key in reader.keys():
        for target in targets(key, steps):
            shape = _target_shape(reader.shape(key), target)
            if plain.get(target.name) != shape:
                raise CacheError(f"tensor {key} of the LM checkpoint has shape {reader.shape(key)}, which does not fit "
                                 f"{target.name} {plain.get(target.name)} of the model its config describes",
                                 "check the model's config.json; use --backend torch for this model")
            quantized = target.name[: -len("weight")] + "scales" in final
            quantization = quantization_for(precision) if quantized else None
            names = [target.name] + ([target.name[: -len("weight")] + p for p in ("scales", "biases")]
                                     if quantized else [])
            for name in names:
                if name in seen:
                    raise CacheError(f"the LM checkpoint has {target.name} twice ({key})", "download the model again")
                seen.add(name)
                array = final[name]
                layout.append(_Out(name, _MLX_NAMES[str(array.dtype).rpartition(".")[2]], tuple(array.shape),
                                   key, target, quantization))
    missing = sorted(set(final) - seen)
    if missing:
        raise CacheError(f"the LM checkpoint lacks {len(missing)} tensors of the model, e.g. {missing[0]}",
                         "download the model again, or check its config.json")
    # An order that does not depend on the source's layout or key order, so that the same weights always
    # give the same bytes; the outputs of one source tensor stay together (it is read once).
    return sorted(layout, key=lambda out: (legacy_name(out.source), out.name))


def _target_shape(shape: tuple[int, ...], target: _Target) -> tuple[int, ...]:
    if target.vector:
        return (shape[-1],)
    if target.chunk is not None:
        return (shape[0] // target.chunks, *shape[1:])
    return shape


def _header(layout: list[_Out], metadata: dict[str, str]) -> bytes:
    entries: dict[str, Any] = {"__metadata__": metadata}
    offset = 0
    for out in layout:
        entries[out.name] = {"dtype": out.dtype, "shape": list(out.shape),
                             "data_offsets": [offset, offset + out.nbytes]}
        offset += out.nbytes
    text = json.dumps(entries, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # safetensors aligns the data to 8 bytes
    return struct.pack("<Q", len(text)) + text


def _convert(reader: Reader, key: str, outs: list[_Out]) -> dict[str, Any]:
    """The MLX tensors made from one source tensor (bf16; weight, scales and biases when quantized)."""
    import mlx.core as mx

    source = reader.array(key).astype(mx.bfloat16)
    made = {}
    for out in outs:
        if out.name != out.target.name:
            continue  # scales and biases come with their weight
        array = source
        if out.target.vector:
            array = array.reshape(-1)
        if out.target.chunk is not None:
            array = mx.split(array, out.target.chunks, axis=0)[out.target.chunk]
        if out.quantization is not None:
            stem = out.name[: -len("weight")]
            made[out.name], made[stem + "scales"], made[stem + "biases"] = mx.quantize(
                array, group_size=out.quantization.group_size, bits=out.quantization.bits)
        else:
            made[out.name] = array
    return made


def _raw(array, out: _Out) -> memoryview:
    import mlx.core as mx
    import numpy as np

    if array.dtype == mx.bfloat16:
        array = array.view(mx.uint16)
    data = np.ascontiguousarray(np.asarray(array))
    if data.nbytes != out.nbytes or tuple(data.shape) != out.shape:
        raise CacheError(f"converting {out.source} gave {out.name} of shape {data.shape}, not {out.shape}",
                         "report this with the model's config.json")
    return data.reshape(-1).view(np.uint8).data


def _write(path: Path, layout: list[_Out], reader: Reader, metadata: dict[str, str]) -> str:
    """Stream the file: each source tensor read, converted and written, then dropped. Returns its sha256."""
    import mlx.core as mx

    digest = hashlib.sha256()
    by_source: dict[str, list[_Out]] = {}
    for out in layout:
        by_source.setdefault(out.source, []).append(out)
    current: str | None = None
    made: dict[str, Any] = {}
    with open(path, "wb") as f:
        def put(data) -> None:
            f.write(data)
            digest.update(data)

        put(_header(layout, metadata))
        for out in layout:
            if out.source != current:
                made = {}
                mx.clear_cache()  # MLX keeps freed buffers for reuse: give them back, one tensor's worth at most
                current, made = out.source, _convert(reader, out.source, by_source[out.source])
                mx.eval(*made.values())
            put(_raw(made[out.name], out))
        f.flush()
        os.fsync(f.fileno())
    return digest.hexdigest()


def convert_lm(source: Path, folder: Path, source_sha256: str, lm_kwargs: dict[str, Any],
               precision: Precision) -> MlxCheckpoint:
    """Convert `source` into `folder` at `precision` (config, weights, manifest last), one tensor at a time."""
    from ..fsutil import atomic_write_text

    started = time.monotonic()
    reader = Reader(source)
    layout = _layout(reader, lm_kwargs, precision)
    metadata = {"format": "mlx"}
    size = len(_header(layout, metadata)) + sum(out.nbytes for out in layout)
    derived.check_room(folder, size, "the MLX weights")
    weight = folder / weight_name(precision)
    with derived.written_in_one_step(weight, "the MLX weights") as partial:
        atomic_write_text(folder / CONFIG, json.dumps(lm_kwargs, indent=2) + "\n")
        written = _write(partial, layout, reader, metadata)
        if derived.sha256_of(partial) != written:
            raise CacheError(f"the MLX weights read back from {partial} differ from what was written",
                             "check the disk (`dmesg`), then run the command again")
    _finish(folder, precision, source_sha256, size, written)
    return MlxCheckpoint(weight, folder / CONFIG, precision, source_sha256, size, time.monotonic() - started)


def _finish(folder: Path, precision: Precision, source_sha256: str, size: int, sha256: str) -> None:
    from importlib import metadata

    from ..fsutil import atomic_write_text

    versions = {}
    for package in ("mlx", "moshi_mlx"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[package] = metadata.version(package)
    q = quantization_for(precision)
    manifest = {"format": FORMAT, "precision": precision.value, "bits": q.bits if q else 16,
                "group_size": q.group_size if q else None, "source_sha256": source_sha256, "size": size,
                "sha256": sha256, **versions, derived.STAMP: derived.stamp(folder / weight_name(precision))}
    atomic_write_text(folder / manifest_name(precision), json.dumps(manifest, indent=2) + "\n")  # last


# --- Mimi ---------------------------------------------------------------------------------------------------------

_SPLIT = re.compile(r"^(?P<prefix>.*\.self_attn)\.(?P<kind>in|out)_projs\.\d+\.weight$")


def legacy_name(key: str) -> str:
    """A tensor's name in moshi <= 0.2.3's attention layout, where the steps' projections are one tensor
    (what rustymimi reads)."""
    m = _SPLIT.match(key)
    if m is None:
        return key
    return f"{m['prefix']}.in_proj_weight" if m["kind"] == "in" else f"{m['prefix']}.out_proj.weight"


def mimi_folder_for(data_dir: Path, source_sha256: str) -> Path:
    return Path(data_dir) / "mlx" / "mimi" / source_sha256


def ensure_mimi(data_dir: Path, source: Path, source_sha256: str | None,
                on_note: Callable[[str], None] = lambda note: None) -> Path:
    """A Mimi file rustymimi can read: `source` itself when its names are the legacy ones, else a renamed copy
    made once into ``<data dir>/mlx/mimi/<sha256>/``."""
    reader = Reader(source)
    renamed = {key: legacy_name(key) for key in reader.keys()}
    if all(key == name for key, name in renamed.items()):
        return Path(source)
    if len(set(renamed.values())) != len(renamed):
        raise CacheError(f"{source} has per-step attention weights, which Mimi does not: not a Mimi checkpoint",
                         "download the model again")
    sha = source_sha256 or derived.local_sha256(Path(data_dir), Path(source), on_note, "MLX Mimi")
    folder = mimi_folder_for(data_dir, sha)
    done = folder / MIMI
    if _mimi_cached(folder) and derived.unchanged(done, folder / MIMI_MANIFEST):
        return done
    derived.make_folder(folder)
    with derived.locked(folder):
        if _mimi_cached(folder):
            derived.confirm("the MLX Mimi", done, folder / MIMI_MANIFEST, lambda: verify_mimi(folder), on_note)
        else:
            on_note(f"renaming {sum(k != n for k, n in renamed.items())} attention tensors of {Path(source).name} "
                    f"for rustymimi; kept in {folder}")
            _copy_renamed(reader, renamed, folder, sha)
    return done


def _mimi_cached(folder: Path) -> bool:
    try:
        manifest = json.loads((folder / MIMI_MANIFEST).read_text(encoding="utf-8"))
        return manifest.get("format") == FORMAT and (folder / MIMI).stat().st_size == manifest["size"]
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _copy_renamed(reader: Reader, renamed: dict[str, str], folder: Path, source_sha256: str) -> None:
    from ..fsutil import atomic_write_text

    entries: dict[str, Any] = {"__metadata__": {"format": "pt", "source_sha256": source_sha256}}
    offset = 0
    for key in reader.keys():
        begin, end = reader.entries[key]["data_offsets"]
        entries[renamed[key]] = {"dtype": reader.dtype(key), "shape": list(reader.shape(key)),
                                 "data_offsets": [offset, offset + end - begin]}
        offset += end - begin
    text = json.dumps(entries, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    digest = hashlib.sha256()
    with derived.written_in_one_step(folder / MIMI, "Mimi for MLX") as partial, open(partial, "wb") as f:
        def put(data: bytes | bytearray) -> None:
            f.write(data)
            digest.update(data)

        put(struct.pack("<Q", len(text)) + text)
        for key in reader.keys():
            put(reader.raw(key))
        f.flush()
        os.fsync(f.fileno())
    manifest = {"format": FORMAT, "size": (folder / MIMI).stat().st_size, "sha256": digest.hexdigest(),
                "source_sha256": source_sha256, derived.STAMP: derived.stamp(folder / MIMI)}
    atomic_write_text(folder / MIMI_MANIFEST, json.dumps(manifest, indent=2) + "\n")
