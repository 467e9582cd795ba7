"""bitsandbytes only for int8 weights, imported without torch.compile's start-up (upstream/moshi_int8.py)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytest.importorskip("torch")
pytest.importorskip("moshi")

from jmoshi_cli.tiny_model import CONFIG_NAME, MOSHI_NAME, cached_tiny_repo  # noqa: E402

# A fresh interpreter steps the tiny LM (float32, greedy) on fixed codes, with or without the patch, and says
# what it sampled and whether bitsandbytes was imported.
STEP = """
import json, sys
from pathlib import Path
import torch
from moshi.models import LMGen, loaders
from jmoshi_cli.tiny_model import lm_kwargs_from_config
from jmoshi_cli.upstream import moshi_int8
patched = moshi_int8.plain_layers_skip_bitsandbytes() if sys.argv[3] == "patched" else False
kwargs = lm_kwargs_from_config(json.loads(Path(sys.argv[1]).read_text()))
lm = loaders.get_moshi_lm(sys.argv[2], lm_kwargs=kwargs, device="cpu", dtype=torch.float32)
gen = LMGen(lm, use_sampling=False)
codes = torch.arange(8 * 12).reshape(12, 1, 8, 1) % lm.card
out = []
with torch.no_grad(), gen.streaming(1):
    for frame in codes:
        tokens = gen.step(frame)
        out.append(None if tokens is None else tokens.flatten().tolist())
print(json.dumps({"patched": patched, "tokens": out, "bitsandbytes": "bitsandbytes" in sys.modules}))
"""


def _step(repo, how: str) -> dict:
    done = subprocess.run([sys.executable, "-c", STEP, str(repo / CONFIG_NAME), str(repo / MOSHI_NAME), how],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_a_plain_lm_steps_without_bitsandbytes_and_samples_the_same():
    from moshi.utils import quantize

    repo = cached_tiny_repo()
    patched, plain = _step(repo, "patched"), _step(repo, "as is")
    assert patched["tokens"] == plain["tokens"] and any(patched["tokens"])
    assert not patched["bitsandbytes"]
    # The patch is applied exactly where moshi imports bitsandbytes for every layer (0.2.2's multi_linear).
    assert patched["patched"] == hasattr(quantize, "multi_linear") == plain["bitsandbytes"]


@pytest.mark.slow
def test_bitsandbytes_imports_without_torch_compile_and_still_quantizes():
    from jmoshi_cli import runtime

    pytest.importorskip("bitsandbytes")
    code = """
import sys, torch
compile_ = torch.compile
from jmoshi_cli.upstream import moshi_int8
bnb = moshi_int8.import_bitsandbytes()
assert torch.compile is compile_ and moshi_int8.import_bitsandbytes() is bnb
print("torch._inductor.compile_fx" in sys.modules)
if sys.argv[1] == "quantize":  # bitsandbytes 0.45 (the documented runtime, no int8) quantizes on a GPU only
    from bitsandbytes import functional
    weights, scales, _ = functional.int8_vectorwise_quant(torch.tensor([[1.0, -2.0], [0.5, 0.25]]).half())
    print(weights.tolist(), scales.tolist())
"""
    quantize = runtime.detect().has_int8
    done = subprocess.run([sys.executable, "-c", code, "quantize" if quantize else "import"], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.strip().splitlines()
    assert lines[0] == "False"  # 0.46+ would have set up inductor's compiler
    if quantize:
        assert lines[1] == "[[64, -127], [127, 64]] [2.0, 0.5]"
