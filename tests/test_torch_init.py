"""moshi's modules built without the random values their files replace: the same weights, bit for bit."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("moshi")

from jmoshi_cli.tiny_model import CONFIG_NAME, MIMI_NAME, MOSHI_NAME, cached_tiny_repo, lm_kwargs_from_config  # noqa: E402
from jmoshi_cli.upstream import torch_init  # noqa: E402


def _same_tensors(one: torch.nn.Module, other: torch.nn.Module) -> None:
    mine, theirs = one.state_dict(), other.state_dict()
    assert mine.keys() == theirs.keys()
    different = [key for key in mine if not torch.equal(mine[key], theirs[key])]
    assert not different, different[:5]


@pytest.fixture(scope="module")
def repo():
    return cached_tiny_repo()


def test_mimi_loads_the_same_weights_without_drawing_them_first(repo):
    from moshi.models import loaders

    torch.manual_seed(0)
    theirs = loaders.get_mimi(str(repo / MIMI_NAME), device="cpu")
    with torch_init.no_random_init(everywhere=True):
        mine = loaders.get_mimi(str(repo / MIMI_NAME), device="cpu")
    _same_tensors(mine, theirs)


def test_the_lm_loads_the_same_weights_without_initialising_the_meta_device(repo):
    from moshi.models import loaders

    kwargs = lm_kwargs_from_config(json.loads((repo / CONFIG_NAME).read_text()))
    theirs = loaders.get_moshi_lm(str(repo / MOSHI_NAME), lm_kwargs=dict(kwargs), device="cpu",
                                  dtype=torch.float32)
    with torch_init.no_random_init():
        mine = loaders.get_moshi_lm(str(repo / MOSHI_NAME), lm_kwargs=dict(kwargs), device="cpu",
                                    dtype=torch.float32)
    _same_tensors(mine, theirs)


def test_real_tensors_are_still_initialised_unless_everywhere_and_torch_gets_its_own_back():
    own = torch.nn.init.normal_
    with torch_init.no_random_init():
        real = torch.nn.init.normal_(torch.zeros(1000))
        meta = torch.nn.init.normal_(torch.zeros(1000, device="meta"))
    assert real.std() > 0.5 and meta.is_meta
    with torch_init.no_random_init(everywhere=True):
        assert torch.count_nonzero(torch.nn.init.kaiming_uniform_(torch.zeros(8, 8))) == 0
    assert torch.nn.init.normal_ is own
    with pytest.raises(RuntimeError), torch_init.no_random_init():
        raise RuntimeError("a failed load")
    assert torch.nn.init.normal_ is own


@pytest.mark.slow  # a fresh interpreter importing torch and moshi
def test_an_lm_built_on_the_meta_device_does_not_import_torch_dynamo(repo):
    """The saving itself, in a fresh interpreter: torch's meta `normal_` would import torch._dynamo."""
    code = f"""
import json, sys
from pathlib import Path
import torch
from moshi.models import loaders
from jmoshi_cli.tiny_model import lm_kwargs_from_config
from jmoshi_cli.upstream import torch_init
kwargs = lm_kwargs_from_config(json.loads(Path({str(repo / CONFIG_NAME)!r}).read_text()))
with torch_init.no_random_init():
    loaders.get_moshi_lm({str(repo / MOSHI_NAME)!r}, lm_kwargs=kwargs, device="cpu", dtype=torch.float32)
print("torch._dynamo" in sys.modules)
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"
