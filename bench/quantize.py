"""Peak host memory and time to make J-Moshi's int8 checkpoint: jmoshi's streamed path against moshi's own.

A random bf16 checkpoint with J-Moshi's architecture (moshi's built-in Moshi-7B kwargs; `--layers`
of the 32 transformer layers, every other tensor full size) is written to a temporary folder. Then,
each in a fresh process so that its peak resident memory (ru_maxrss) is its own:

- jmoshi: `quantize.make_int8` (one tensor at a time through moshi's QLinear, streamed to disk,
  hashed, read back);
- upstream: what moshi offers, i.e. load the whole model (`loaders.get_moshi_lm`), swap every
  Linear for its QLinear (`replace_linear_with_qlinear`) and save the state dict.

    .venv/bin/python bench/quantize.py --layers 8      # ~5.6 GB checkpoint; 32 is the real 15.4 GB
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from _common import emit_json  # noqa: E402

OURS = """
import json, sys
from pathlib import Path
from jmoshi_cli.model import quantize
src, out, config = Path(sys.argv[1]), Path(sys.argv[2]), json.loads(sys.argv[3])
made = quantize.make_int8(src, out, "0" * 64, config)
print(json.dumps({"size": made.size}))
"""

UPSTREAM = """
import json, sys, torch
from moshi.models import loaders
from moshi.utils.quantize import replace_linear_with_qlinear
from safetensors.torch import save_file
from jmoshi_cli.model import quantize
src, out, config = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
with torch.no_grad():
    lm = loaders.get_moshi_lm(src, lm_kwargs=quantize.lm_kwargs(config), device="cpu")
    replace_linear_with_qlinear(lm)
    save_file({k: v.contiguous() for k, v in lm.state_dict().items()}, out + "/upstream.safetensors")
print(json.dumps({"size": __import__("os").path.getsize(out + "/upstream.safetensors")}))
"""


def make_source(path: Path, layers: int) -> dict:
    """A random bf16 checkpoint of J-Moshi's shapes, written tensor by tensor (never the whole model)."""
    import torch
    from moshi.models import loaders

    from jmoshi_cli.model import quantize

    config = dict(loaders._lm_kwargs, num_layers=layers)
    config.pop("depformer_causal", None)
    model = loaders.get_moshi_lm(None, lm_kwargs=config, device="meta")
    names = [(name, tuple(t.shape)) for name, t in model.state_dict().items()]
    layout = [quantize._Out(name, "BF16", shape, name) for name, shape in names]
    generator = torch.Generator().manual_seed(0)
    with open(path, "wb") as f:
        f.write(quantize._header(layout, "0" * 64))
        for _, shape in names:
            tensor = (torch.randn(shape, generator=generator) * 0.02).to(torch.bfloat16)
            f.write(memoryview(quantize._raw(tensor)))
    return config


def measure(script: str, source: Path, out: Path, config: dict) -> dict:
    """Run one path in its own process: seconds, peak RSS (GiB), and what it printed."""
    env = {**os.environ, "NO_TORCH_COMPILE": "1", "PYTHONPATH": str(ROOT / "src")}
    started = time.monotonic()
    process = subprocess.Popen([sys.executable, "-c", script, str(source), str(out), json.dumps(config)],
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.monotonic() - started
    stdout, stderr = process.stdout.read(), process.stderr.read()
    if os.waitstatus_to_exitcode(status) != 0:
        return {"ok": False, "error": stderr.strip().splitlines()[-1] if stderr.strip() else f"status {status}",
                "seconds": round(seconds, 1), "peak_rss_gib": round(usage.ru_maxrss / 2**20, 2)}
    return {"ok": True, "seconds": round(seconds, 1), "peak_rss_gib": round(usage.ru_maxrss / 2**20, 2),
            **json.loads(stdout.strip().splitlines()[-1])}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=8, help="transformer layers (J-Moshi has 32)")
    parser.add_argument("--skip-upstream", action="store_true", help="only jmoshi's path (the full model "
                        "loaded whole needs about the checkpoint's size in RAM, and more)")
    parser.add_argument("--json", help="also write the result here")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="jmoshi-bench-int8-") as tmp:
        folder = Path(tmp)
        source = folder / "model.safetensors"
        started = time.monotonic()
        config = make_source(source, args.layers)
        size = source.stat().st_size
        result = {"layers": args.layers, "source_gb": round(size / 1e9, 2),
                  "source_written_s": round(time.monotonic() - started, 1)}
        (folder / "ours").mkdir()
        result["jmoshi"] = measure(OURS, source, folder / "ours", config)
        if not args.skip_upstream:
            (folder / "upstream").mkdir()
            result["upstream"] = measure(UPSTREAM, source, folder / "upstream", config)
        for name in ("jmoshi", "upstream"):
            if name in result:
                result[name]["peak_rss_over_source"] = round(result[name]["peak_rss_gib"] * 2**30 / size, 2)
    emit_json(result, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
