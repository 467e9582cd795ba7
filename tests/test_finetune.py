"""Fine-tuned J-Moshi through serve and infer: a LoRA adapter made by moshi's own LoRA code over the tiny
model, a local checkpoint with its config beside it, and a user variant naming either.

Everything runs for real on the CPU (moshi.server, moshi's loaders); adapters need moshi >= 0.2.4,
so those tests skip on the documented runtime, where `--lora` is checked to be refused instead.
"""

from __future__ import annotations

import json
import shutil

import pytest

from conftest import TINY_VARIANTS, child_env, jmoshi
from jmoshi_cli import runtime
from jmoshi_cli.cache.artifacts import ModelFiles
from jmoshi_cli.errors import UsageError
from jmoshi_cli.model import finetune
from jmoshi_cli.model.precision import Precision
from jmoshi_cli.variants import Variant

from helpers import Served, a_wav, converse_sync, got, user_audio

RT = runtime.detect()
needs_lora = pytest.mark.skipif(not RT.has_lora, reason=f"moshi {RT.moshi} has no LoRA (0.2.4+)")


@pytest.fixture(scope="module")
def tiny_repo():
    from jmoshi_cli.tiny_model import cached_tiny_repo

    return cached_tiny_repo()


@pytest.fixture(scope="module")
def adapters(tiny_repo, tmp_path_factory):
    """A moshi-finetune run folder with one adapter that fits the tiny model, and one that does not."""
    pytest.importorskip("moshi.modules.lora")
    from builders import build_misfit_lora, build_tiny_lora

    root = tmp_path_factory.mktemp("adapters")
    build_tiny_lora(tiny_repo, root / "run" / "checkpoints" / "checkpoint_000300" / "consolidated")
    build_misfit_lora(tiny_repo, root / "misfit")
    return root


def test_lora_is_refused_on_the_documented_runtime_and_with_int8(tmp_path):
    adapter = finetune.FineTune(adapter=object())  # only its presence matters here
    old = runtime.Runtime.from_versions({**runtime.installed_versions(), "moshi": "0.2.2", "sphn": "0.1.12"})
    with pytest.raises(UsageError, match=r"--lora needs the current runtime \(moshi 0.2.13\); this is moshi 0.2.2"):
        finetune.precision_for(adapter, old, Precision.AUTO)
    new = runtime.Runtime.from_versions({**runtime.installed_versions(), "moshi": "0.2.13", "sphn": "0.2.1"})
    with pytest.raises(UsageError, match="--lora and --quantize int8 do not go together"):
        finetune.precision_for(adapter, new, Precision.INT8)
    assert finetune.precision_for(adapter, new, Precision.AUTO) is Precision.BF16  # never int8 by itself
    assert finetune.precision_for(finetune.FineTune(), new, Precision.AUTO) is Precision.AUTO


def test_a_local_checkpoint_brings_its_own_config(tiny_repo, tmp_path):
    """nu-dialogue's training writes model.safetensors + moshi_lm_kwargs.json; a folder is accepted."""
    folder = tmp_path / "ft"
    folder.mkdir()
    shutil.copy(tiny_repo / "model.safetensors", folder / "model.safetensors")
    kwargs = {k: v for k, v in json.loads((tiny_repo / "config.json").read_text()).items()
              if k not in ("moshi_name", "mimi_name", "tokenizer_name", "model_type", "lm_gen_config")}
    (folder / "moshi_lm_kwargs.json").write_text(json.dumps(kwargs))
    chosen = Variant("tiny", "jmoshi-test/tiny")
    fine_tune = finetune.resolve(chosen, folder, None)
    assert fine_tune.weight == (folder / "model.safetensors").resolve()
    files = ModelFiles(fine_tune.weight, tiny_repo / "mimi", tiny_repo / "tok", config=None)
    applied = finetune.apply(fine_tune, files, chosen, tmp_path / "home")
    assert applied.config is not None and json.loads(applied.config.read_text()) == kwargs
    with pytest.raises(UsageError, match="no model.safetensors or consolidated.safetensors"):
        finetune.resolve(chosen, tmp_path, None)


@needs_lora
def test_an_adapter_for_another_model_is_one_line_before_anything_loads(tiny_env, adapters):
    done = jmoshi("serve", "--variant", "tiny", "--device", "cpu", "--lora", str(adapters / "misfit"),
                  env=child_env(tiny_env))
    assert done.returncode == 2, done.stderr
    assert "does not fit variant tiny: " in done.stderr and "Traceback" not in done.stderr
    assert "starting moshi.server" not in done.stderr
    both = jmoshi("serve", "--variant", "tiny", "--device", "cpu", "--lora", str(adapters / "run"),
                  "--quantize", "int8", env=child_env(tiny_env))
    assert both.returncode == 2 and "do not go together" in both.stderr and "downloading" not in both.stderr


def test_lora_on_the_documented_runtime_is_one_line(tiny_env, tmp_path):
    if RT.has_lora:
        pytest.skip("this runtime has LoRA: the refusal is checked above with 0.2.2's versions")
    (tmp_path / "lora.safetensors").write_bytes(b"x")
    done = jmoshi("serve", "--variant", "tiny", "--device", "cpu", "--lora", str(tmp_path), env=child_env(tiny_env))
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr


@pytest.mark.usefixtures("tiny_downloaded")
@pytest.mark.slow
@needs_lora
def test_serve_lora_on_the_cpu_talks_with_the_adapter(tiny_env, adapters):
    from jmoshi_cli.selftest import free_port

    port = free_port()
    served = Served(["--variant", "tiny", "--device", "cpu", "--lora", str(adapters / "run"), "--port", str(port)],
                    tiny_env)
    try:
        served.wait_ready()
        result = converse_sync(f"ws://127.0.0.1:{port}/api/chat", user_audio(2.0), until=got(samples=1, pieces=1))
    finally:
        code, err = served.stop()
    assert "LoRA adapter" in err and "(checkpoint 300), rank 4, over variant tiny" in err, err
    assert result.audio_samples > 0 and result.text_pieces, result
    assert code == 143 and "Traceback" not in err


@pytest.mark.usefixtures("tiny_downloaded")
@pytest.mark.slow
@needs_lora
def test_a_user_variant_naming_an_adapter_changes_what_jmoshi_says(tiny_env, adapters, tmp_path):
    # The adapter's path is relative to the variants file, as a lab would keep them side by side.
    shutil.copytree(adapters / "run", tmp_path / "vars" / "run")
    variants = tmp_path / "vars" / "variants.toml"
    variants.write_text(TINY_VARIANTS + '\n[variants.tiny-ft]\nrepo = "jmoshi-test/tiny"\nlora = "run"\n'
                        'vram_gb = 0\nvram_min_gb = 0\nlicense = "test"\n')
    env = {**child_env(tiny_env), "JMOSHI_VARIANTS": str(variants)}
    wav = a_wav(tmp_path / "in")
    outputs = {}
    for name in ("tiny", "tiny-ft"):
        done = jmoshi("infer", str(wav), "--variant", name, "--device", "cpu", "--seed", "3",
                      "--out", str(tmp_path / name), "--json", env=env, timeout=300)
        assert done.returncode == 0, done.stderr
        [result] = json.loads(done.stdout)["files"]
        outputs[name] = open(result["outputs"]["jmoshi"], "rb").read()
        assert ("LoRA adapter" in done.stderr) == (name == "tiny-ft")
    assert outputs["tiny"] != outputs["tiny-ft"]  # same seed and input: only the adapter differs


def test_a_checkpoint_whose_config_contradicts_its_weights_is_one_line(tiny_env, tiny_repo, tmp_path):
    folder = tmp_path / "ft"
    folder.mkdir()
    shutil.copy(tiny_repo / "model.safetensors", folder / "model.safetensors")
    config = json.loads((tiny_repo / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "num_layers": config["num_layers"] + 1}))
    done = jmoshi("serve", "--variant", "tiny", "--device", "cpu", "--moshi-weight", str(folder),
                  env=child_env(tiny_env))
    assert done.returncode == 2, done.stderr
    assert f"num_layers is {config['num_layers'] + 1} there, {config['num_layers']} in the weights" in done.stderr
    assert "Traceback" not in done.stderr and "starting moshi.server" not in done.stderr
