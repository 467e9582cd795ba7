"""einops without torch.compile's registration where nothing compiles (upstream/einops_torch.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("torch")
pytest.importorskip("einops")

# A fresh interpreter: the policy's variable as given, einops' first rearrange of a torch tensor, and what
# was imported.
FIRST_REARRANGE = """
import json, sys, torch, einops
from jmoshi_cli.upstream import einops_torch
skipped = einops_torch.skip_compile_registration() if sys.argv[1] == "patched" else None
out = einops.rearrange(torch.arange(6).reshape(2, 3), "a b -> b a")
print(json.dumps([skipped, "torch._dynamo" in sys.modules, out.tolist(), torch.__version__]))
"""


def _first_rearrange(how: str, compile_off: bool) -> list:
    env = {k: v for k, v in os.environ.items() if k != "NO_TORCH_COMPILE"}
    if compile_off:
        env["NO_TORCH_COMPILE"] = "1"
    done = subprocess.run([sys.executable, "-c", FIRST_REARRANGE, how], capture_output=True, text=True, env=env,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_where_nothing_compiles_einops_leaves_torch_dynamo_unimported():
    from jmoshi_cli.runtime import version_tuple

    skipped, dynamo, out, version = _first_rearrange("patched", compile_off=True)
    assert (skipped, dynamo, out) == (True, False, [[0, 3], [1, 4], [2, 5]])
    # As it is, einops imports torch._dynamo on torch < 2.8 (what the patch saves), not on 2.8+.
    assert _first_rearrange("as is", compile_off=True)[1] == (version_tuple(version) < (2, 8))
    # Where torch.compile may run, einops registers as it would.
    assert _first_rearrange("patched", compile_off=False)[0] is False
