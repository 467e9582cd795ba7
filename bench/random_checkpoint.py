"""A full-size J-Moshi-shaped checkpoint with random weights, for benchmarks on a machine without the real one.

The LM has moshi's built-in Moshi-7B architecture (J-Moshi's: its repositories hold no config.json, so
none is written here either), 7.69 B parameters in bfloat16 (15.4 GB). Mimi and the text tokenizer are
copied from the tiny test repo (jmoshi_cli.tiny_model): its Mimi file is moshi's real Mimi architecture
with random weights.

    .venv/bin/python bench/random_checkpoint.py /work/bench-7b

The safetensors file is written tensor by tensor (the header first, from the model's shapes on torch's
meta device), so at most one tensor is ever in memory: a few minutes, mostly the disk. Values: RMSNorm
scales 1, everything else N(0, 0.02) drawn once into a 64 Mi-value pool and sliced at random offsets
(the timing of a dense bf16 model does not depend on its values). An existing complete folder is
reused as is.
"""

from __future__ import annotations

import argparse
import json
import shutil
import struct
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

MODEL = "model.safetensors"
MIMI = "tokenizer-e351c8d8-checkpoint125.safetensors"
TOKENIZER = "tokenizer_spm_32k_3.model"
DONE = ".complete.json"
POOL = 1 << 26
STD = 0.02


def lm_shapes() -> dict:
    """Every tensor of the LM's state dict as moshi loads it: name -> shape (all bfloat16)."""
    import torch
    from moshi.models.lm import LMModel

    from jmoshi_cli.upstream.moshi_private import builtin_lm_kwargs

    kwargs = builtin_lm_kwargs()
    kwargs.pop("depformer_causal", None)
    model = LMModel(device="meta", dtype=torch.bfloat16, **kwargs)
    shapes = {}
    for name, tensor in model.state_dict().items():
        assert tensor.dtype == torch.bfloat16, (name, tensor.dtype)
        shapes[name] = tuple(tensor.shape)
    return shapes


def write_safetensors(path: Path, shapes: dict, seed: int = 0) -> int:
    """The file at `path`, one tensor at a time; its size in bytes."""
    import numpy as np
    import torch

    names = sorted(shapes)
    header, offset = {}, 0
    for name in names:
        size = 2 * int(np.prod(shapes[name], dtype=np.int64))
        header[name] = {"dtype": "BF16", "shape": list(shapes[name]), "data_offsets": [offset, offset + size]}
        offset += size
    header["__metadata__"] = {"format": "pt", "note": "random weights, J-Moshi's shapes (bench/random_checkpoint.py)"}
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    generator = torch.Generator().manual_seed(seed)
    pool = (torch.randn(POOL, generator=generator) * STD).to(torch.bfloat16).view(torch.int16).numpy()
    rng = np.random.default_rng(seed)
    partial = path.with_suffix(".partial")
    with partial.open("wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for name in names:
            count = int(np.prod(shapes[name], dtype=np.int64))
            if name.endswith(".alpha"):  # RMSNorm scales
                data = np.full(count, np.int16(torch.ones(1, dtype=torch.bfloat16).view(torch.int16).item()))
                f.write(data.tobytes())
                continue
            written = 0
            while written < count:  # slices of the pool, each from a random offset
                start = int(rng.integers(0, POOL))
                piece = pool[start:start + min(count - written, POOL - start)]
                f.write(memoryview(piece))
                written += piece.shape[0]
    partial.rename(path)
    return path.stat().st_size


def build(folder: Path) -> Path:
    """The checkpoint folder, made unless a complete one is already there."""
    from jmoshi_cli.tiny_model import cached_tiny_repo

    if (folder / DONE).exists() and all((folder / name).exists() for name in (MODEL, MIMI, TOKENIZER)):
        print(f"reusing {folder}", file=sys.stderr)
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(folder).free
    if free < 17e9:
        raise SystemExit(f"{folder}: {free / 1e9:.1f} GB free, the checkpoint needs 15.4 GB (and Mimi's 0.2 GB)")
    tiny = cached_tiny_repo()
    for name in (MIMI, TOKENIZER):
        shutil.copyfile(tiny / name, folder / name)
    started = time.perf_counter()
    shapes = lm_shapes()
    size = write_safetensors(folder / MODEL, shapes)
    seconds = time.perf_counter() - started
    (folder / DONE).write_text(json.dumps({"tensors": len(shapes), "bytes": size, "write_s": round(seconds, 1)}) + "\n")
    print(f"wrote {folder / MODEL}: {len(shapes)} tensors, {size / 1e9:.2f} GB in {seconds:.0f} s", file=sys.stderr)
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    build(parser.parse_args().folder)


if __name__ == "__main__":
    main()
