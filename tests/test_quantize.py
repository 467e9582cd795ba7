"""int8: the checkpoint jmoshi makes with moshi's own QLinear, its cache, and serving/inferring with it.

The int8 matmuls run on the CPU with bitsandbytes >= 0.49 (the current runtime), so every step is real:
moshi's quantization code, bitsandbytes, safetensors, moshi.server. Only the GPU itself is faked, for
the memory decisions (auto-picking int8), through the same small seam test_serve.py uses.
"""

from __future__ import annotations

import json
import os
import shutil

import pytest

from conftest import child_env, jmoshi
from jmoshi_cli import preflight, runtime
from jmoshi_cli.errors import CacheError, PreflightError, UsageError
from jmoshi_cli.hardware import GPU
from jmoshi_cli.model import derived, precision, quantize
from jmoshi_cli.model.precision import Precision

from helpers import Served, a_wav, converse_sync, fake_gpus, got, user_audio

RT = runtime.detect()
needs_int8 = pytest.mark.skipif(not (RT.has_int8 and RT.bitsandbytes),
                                reason=f"int8 runs on the current runtime only (this is moshi {RT.moshi})")


@pytest.fixture(scope="module")
def tiny_repo():
    from jmoshi_cli.tiny_model import cached_tiny_repo

    return cached_tiny_repo()


def tiny_config(repo) -> dict:
    return json.loads((repo / "config.json").read_text())


@needs_int8
def test_the_int8_file_is_what_moshis_own_quantization_makes(tiny_repo, tmp_path):
    import torch
    from moshi.models import loaders
    from moshi.utils.quantize import QLinear, replace_linear_with_qlinear
    from safetensors.torch import load_file

    made = quantize.ensure_int8(tmp_path, tiny_repo / "model.safetensors", None, tiny_repo / "config.json")
    assert made.made_s is not None and made.weight.stat().st_size == made.size
    # The reference: moshi loads the bf16 model whole and swaps every Linear for its QLinear.
    kwargs = quantize.lm_kwargs(tiny_config(tiny_repo))
    reference = loaders.get_moshi_lm(tiny_repo / "model.safetensors", lm_kwargs=kwargs, device="cpu")
    replace_linear_with_qlinear(reference)
    expected, ours = reference.state_dict(), load_file(made.weight)
    assert set(ours) == set(expected)  # the model's own names: attention's in_proj_weight split by its hook
    for name, tensor in expected.items():
        assert ours[name].dtype == tensor.dtype or name.endswith("_scb") or tensor.dtype == torch.bfloat16, name
        assert torch.equal(ours[name].to(tensor.dtype), tensor), name
    assert any(n.endswith("in_projs.3.weight_scb") for n in ours)  # the depformer's per-step weights

    # moshi loads it with "quantize" in the config; the scales it cast to bfloat16 are put back.
    config = json.loads(made.config.read_text())
    assert config["quantize"] is True and config["dim"] == tiny_config(tiny_repo)["dim"]
    lm = loaders.get_moshi_lm(made.weight, lm_kwargs=quantize.lm_kwargs(config) | {"quantize": True}, device="cpu")
    assert quantize.restore_scales(lm, made.weight) == sum(isinstance(m, QLinear) for m in lm.modules()) > 0
    assert all(m.weight_scb.dtype == torch.float32 for m in lm.modules() if isinstance(m, QLinear))


@needs_int8
def test_it_is_made_once_and_a_half_written_one_is_never_used(tiny_repo, tmp_path):
    source = tiny_repo / "model.safetensors"
    first = quantize.ensure_int8(tmp_path, source, None, tiny_repo / "config.json")
    again = quantize.ensure_int8(tmp_path, source, None, tiny_repo / "config.json")
    assert again.made_s is None and again.weight == first.weight and quantize.verify(again)
    assert first.source_sha256 == derived.sha256_of(source)  # keyed by the source's content

    folder = first.weight.parent
    with open(first.weight, "r+b") as f:  # a file cut short (the machine died while renaming, a full disk)
        f.truncate(first.size // 2)
    assert quantize.cached(folder) is None
    (folder / quantize.MANIFEST).unlink()  # and a folder whose manifest never got written
    (folder / (quantize.WEIGHT + ".partial")).write_bytes(b"half")
    remade = quantize.ensure_int8(tmp_path, source, None, tiny_repo / "config.json")
    assert remade.made_s is not None and remade.weight.stat().st_size == first.size and quantize.verify(remade)
    assert not (folder / (quantize.WEIGHT + ".partial")).exists()


def test_not_enough_disk_is_one_line_and_leaves_nothing(tmp_path):
    free = shutil.disk_usage(tmp_path).free
    with pytest.raises(CacheError, match=r"not enough disk to make the int8 checkpoint: it needs .* GB is free") as e:
        derived.check_room(tmp_path, free + 10**12, "the int8 checkpoint")
    assert "JMOSHI_HOME" in e.value.hint and list(tmp_path.iterdir()) == []


def test_a_file_that_is_not_a_checkpoint_is_refused(tmp_path):
    bad = tmp_path / "model.safetensors"
    bad.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CacheError, match="cannot read .*model.safetensors: not a safetensors file"):
        quantize.open_checkpoint(bad)


def test_int8_on_the_documented_runtime_is_refused_with_the_fix():
    old = runtime.Runtime.from_versions({**runtime.installed_versions(), "moshi": "0.2.2", "sphn": "0.1.12"})
    with pytest.raises(UsageError, match="int8 needs the current runtime") as caught:
        quantize.check_runtime(old)
    assert "moshi==0.2.13" in caught.value.hint
    missing = runtime.Runtime.from_versions({**runtime.installed_versions(), "moshi": "0.2.13", "bitsandbytes": None})
    with pytest.raises(UsageError, match="bitsandbytes"):
        quantize.check_runtime(missing)
    with pytest.raises(UsageError, match="int4 is not offered by this backend"):
        precision.parse("int4", (Precision.AUTO, Precision.BF16, Precision.INT8))
    with pytest.raises(UsageError, match="is not one of auto, bf16, int8"):
        precision.parse("fp8", (Precision.AUTO, Precision.BF16, Precision.INT8))


# --- which precision a GPU gets (the GPU faked, as in test_serve.py) ---------------------------------------


def _current(monkeypatch):
    current = runtime.Runtime.from_versions({**runtime.installed_versions(), "moshi": "0.2.13", "sphn": "0.2.1",
                                             "bitsandbytes": "0.49.2"})
    monkeypatch.setattr(runtime, "detect", lambda: current)


def test_a_16_gb_gpu_gets_int8_with_a_note_and_a_24_gb_one_bf16(monkeypatch):
    _current(monkeypatch)
    fake_gpus(monkeypatch, GPU(0, "NVIDIA GeForce RTX 5080", int(17.1e9), int(15.6e9), (12, 0)))
    check = preflight.check_device("cuda", 18.7, "ext", Precision.AUTO, 11.0)
    assert check.precision is Precision.INT8
    assert "15.6 GB free, too little for bf16 (~18.7 GB): serving int8 (~11 GB" in check.notes[0]
    with pytest.raises(PreflightError, match="15.6 GB free; ext needs about 18.7 GB"):
        preflight.check_device("cuda", 18.7, "ext", Precision.BF16, 11.0)
    fake_gpus(monkeypatch, GPU(0, "NVIDIA GeForce RTX 4090", int(25.4e9), int(24.9e9), (8, 9)))
    check = preflight.check_device("cuda", 18.7, "ext", Precision.AUTO, 11.0)
    assert check.precision is Precision.BF16
    assert preflight.check_device("cuda", 18.7, "ext", Precision.INT8, 11.0).precision is Precision.INT8


def test_a_gpu_too_small_for_int8_too_is_refused_naming_both(monkeypatch):
    _current(monkeypatch)
    fake_gpus(monkeypatch, GPU(0, "NVIDIA GeForce RTX 4060", int(8.6e9), int(7.9e9), (8, 9)))
    with pytest.raises(PreflightError, match=r"7.9 GB free; ext needs about 18.7 GB \(bf16\) or about 11 GB \(int8\)"):
        preflight.check_device("cuda", 18.7, "ext", Precision.AUTO, 11.0)
    with pytest.raises(PreflightError, match="ext in int8 needs about 11 GB"):
        preflight.check_device("cuda", 18.7, "ext", Precision.INT8, 11.0)


def test_serve_quantize_int8_on_the_documented_runtime_is_one_line(tiny_env):
    if RT.has_int8:
        pytest.skip("this is the current runtime: the refusal is checked above with its versions")
    done = jmoshi("serve", "--variant", "tiny", "--device", "cpu", "--quantize", "int8", env=child_env(tiny_env))
    assert done.returncode == 2 and "int8 needs the current runtime" in done.stderr
    assert "Traceback" not in done.stderr and "downloading" not in done.stderr


# --- end to end on the CPU ---------------------------------------------------------------------------------


@pytest.mark.usefixtures("tiny_downloaded")
@pytest.mark.slow
@needs_int8
def test_serve_int8_on_the_cpu_makes_it_once_and_talks(tiny_env, tmp_path):
    from jmoshi_cli.selftest import free_port

    port = free_port()
    served = Served(["--variant", "tiny", "--device", "cpu", "--quantize", "int8", "--port", str(port),
                     "--record", str(tmp_path / "rec")], tiny_env)
    try:
        served.wait_ready()
        result = converse_sync(f"ws://127.0.0.1:{port}/api/chat", user_audio(2.0), until=got(samples=1, pieces=1))
    finally:
        code, err = served.stop()
    assert "making the int8 checkpoint" in err and "sha256 verified" in err, err
    assert result.audio_samples > 0 and result.text_pieces, result
    assert "Traceback" not in err and code == 143
    [session] = [p for p in (tmp_path / "rec").iterdir() if p.is_dir()]
    assert json.loads((session / "meta.json").read_text())["precision"] == "int8"
    int8_root = os.path.join(tiny_env["JMOSHI_HOME"], "int8")
    assert len([d for d in os.listdir(int8_root) if len(d) == 64]) == 1

    again = Served(["--variant", "tiny", "--device", "cpu", "--quantize", "int8", "--offline", "--port", str(port)],
                   tiny_env)
    try:
        again.wait_ready()
    finally:
        _, err = again.stop()
    assert "making the int8 checkpoint" not in err  # the one made before, found by the source's sha256


@pytest.mark.usefixtures("tiny_downloaded")
@pytest.mark.slow
@needs_int8
def test_infer_int8_on_the_cpu(tiny_env, tmp_path):
    compiled = tmp_path / "inductor"  # where torch.compile would write what it compiled
    done = jmoshi("infer", str(a_wav(tmp_path)), "--variant", "tiny", "--device", "cpu", "--quantize", "int8",
                  "--out", str(tmp_path / "out"), "--seed", "1", "--json",
                  env={**child_env(tiny_env), "TORCHINDUCTOR_CACHE_DIR": str(compiled)}, timeout=300)
    assert done.returncode == 0, done.stderr
    [result] = json.loads(done.stdout)["files"]
    assert result["ok"] and "making the int8 checkpoint" in done.stderr
    # Making the checkpoint imports moshi before the model loads: torch.compile stays off on the CPU all the same.
    assert not [p for p in compiled.rglob("*") if p.is_file()]
