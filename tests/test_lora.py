"""LoRA adapters and fine-tuned checkpoints, on real files laid out as moshi-finetune and nu-dialogue write them.

Layout and error tests write small safetensors files without torch, so they also run on moshi 0.2.2;
the fit and loading tests use adapters made with moshi's own LoRA code over the tiny model."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from jmoshi_cli.errors import ConfigError, UsageError
from jmoshi_cli.model.lora import (
    Adapter,
    Tensor,
    check_fits,
    find_adapter,
    lm_kwargs,
    local_config,
    read_header,
)

_SIZES = {"BF16": 2, "F16": 2, "F32": 4}
_PAIR = {"text_linear.lora_A.weight": Tensor("BF16", (4, 64)), "text_linear.lora_B.weight": Tensor("BF16", (218, 4))}
ADAPTER_CONFIG = {"dim": 64, "lora": True, "lora_rank": 4, "lora_scaling": 2.0}


def write_safetensors(path: Path, tensors: dict[str, Tensor]) -> Path:
    """A real safetensors file with zero-filled data, written without torch."""
    header, offset = {}, 0
    for name, (dtype, shape) in tensors.items():
        size = _SIZES[dtype] * math.prod(shape)
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps({"__metadata__": {"format": "pt"}, **header}).encode()
    raw += b" " * (-len(raw) % 8)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(offset))
    return path


def consolidated(folder: Path, config: dict | None = None, tensors: dict[str, Tensor] | None = None) -> Path:
    """A consolidated/ folder holding a LoRA checkpoint: lora.safetensors and config.json."""
    write_safetensors(folder / "lora.safetensors", _PAIR if tensors is None else tensors)
    (folder / "config.json").write_text(json.dumps(ADAPTER_CONFIG if config is None else config, indent=4))
    return folder


def full_checkpoint(folder: Path, name: str = "consolidated.safetensors") -> Path:
    write_safetensors(folder / name, {"text_linear.weight": Tensor("BF16", (218, 64))})
    (folder / "config.json").write_text(json.dumps({**ADAPTER_CONFIG, "lora": False}))
    return folder / name


def usage_error(excinfo) -> str:
    err = excinfo.value
    assert "\n" not in err.message and err.hint, (err.message, err.hint)
    return err.message


# --- headers ----------------------------------------------------------------------------------------


def test_the_header_gives_each_tensors_dtype_and_shape(tmp_path):
    tensors = {"a.weight": Tensor("BF16", (3, 5)), "b": Tensor("F32", (7,)), "c": Tensor("F16", ())}
    assert read_header(write_safetensors(tmp_path / "x.safetensors", tensors)) == tensors


def test_the_header_agrees_with_the_safetensors_library(tiny_adapter):
    safe_open = pytest.importorskip("safetensors").safe_open
    header = read_header(tiny_adapter.weight)
    with safe_open(str(tiny_adapter.weight), "pt") as real:
        assert sorted(header) == sorted(real.keys())
        assert all(tuple(real.get_slice(name).get_shape()) == header[name].shape for name in header)
    assert {t.dtype for t in header.values()} == {"BF16"}


@pytest.mark.parametrize("content", [b"", b"{}", b'{"dim": 64, "lora": true}', struct.pack("<Q", 10**12) + b"{}",
                                     struct.pack("<Q", 4) + b"[1] "])
def test_a_file_that_is_not_safetensors_is_refused(tmp_path, content):
    path = tmp_path / "config.json"
    path.write_bytes(content)
    with pytest.raises(UsageError) as excinfo:
        read_header(path)
    assert usage_error(excinfo) == f"{path} is not a safetensors file"


def test_a_truncated_file_is_refused(tmp_path):
    path = write_safetensors(tmp_path / "lora.safetensors", _PAIR)
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(UsageError) as excinfo:
        read_header(path)
    assert "truncated" in usage_error(excinfo)


# --- finding the adapter ----------------------------------------------------------------------------


def test_the_consolidated_folder_and_the_file_itself_give_the_same_adapter(tmp_path):
    folder = consolidated(tmp_path / "consolidated")
    expected = Adapter((folder / "lora.safetensors").resolve(), (folder / "config.json").resolve(), 4, 2.0)
    assert find_adapter(folder) == expected
    assert find_adapter(folder / "lora.safetensors") == expected
    assert expected.step is None


def test_a_checkpoint_folder_gives_its_consolidated_adapter(tmp_path):
    checkpoint = tmp_path / "checkpoint_000200"
    consolidated(checkpoint / "consolidated")
    adapter = find_adapter(checkpoint)
    assert adapter.weight == (checkpoint / "consolidated" / "lora.safetensors").resolve()
    assert adapter.step == 200


def test_a_run_folder_gives_its_newest_finished_checkpoint(tmp_path):
    run = tmp_path / "run"
    for step in (100, 300, 200):
        consolidated(run / "checkpoints" / f"checkpoint_{step:06d}" / "consolidated")
    consolidated(run / "checkpoints" / "checkpoint_000400" / "tmp.consolidated")  # still being written
    (run / "args.yaml").write_text("lora:\n  enable: true\n")
    assert find_adapter(run).step == 300
    assert find_adapter(run / "checkpoints").step == 300


def test_moshis_defaults_fill_a_config_without_rank_or_scaling(tmp_path):
    adapter = find_adapter(consolidated(tmp_path / "c", config={"lora": True}))
    assert (adapter.rank, adapter.scaling) == (128, 2.0)


def test_no_such_path(tmp_path):
    with pytest.raises(UsageError) as excinfo:
        find_adapter(tmp_path / "nowhere")
    assert "no such file or folder" in usage_error(excinfo)


def test_a_folder_without_an_adapter_names_the_files_expected(tmp_path):
    (tmp_path / "notes.txt").write_text("nothing here")
    with pytest.raises(UsageError) as excinfo:
        find_adapter(tmp_path)
    assert usage_error(excinfo) == f"no LoRA adapter in {tmp_path}"
    assert "lora.safetensors" in excinfo.value.hint and "config.json" in excinfo.value.hint


def test_an_adapter_without_its_config(tmp_path):
    folder = consolidated(tmp_path / "consolidated")
    (folder / "config.json").unlink()
    with pytest.raises(UsageError) as excinfo:
        find_adapter(folder)
    assert "no config.json beside it" in usage_error(excinfo)


def test_a_config_that_says_lora_false(tmp_path):
    folder = consolidated(tmp_path / "consolidated", config={**ADAPTER_CONFIG, "lora": False})
    with pytest.raises(UsageError) as excinfo:
        find_adapter(folder)
    assert "says lora: false" in usage_error(excinfo)


@pytest.mark.parametrize("config, message", [("{not json", "is not valid JSON"), ("[1, 2]", "is not a JSON object"),
                                             ('{"lora": true, "lora_rank": 0}', "lora_rank must be a positive"),
                                             ('{"lora": true, "lora_scaling": "2"}', "lora_scaling must be a number")])
def test_a_broken_config_is_a_config_error(tmp_path, config, message):
    folder = consolidated(tmp_path / "consolidated")
    (folder / "config.json").write_text(config)
    with pytest.raises(ConfigError, match=message) as excinfo:
        find_adapter(folder)
    assert excinfo.value.message.startswith(str(folder / "config.json"))


def _full_layouts(root: Path) -> list[tuple[Path, Path]]:
    """(what the user gives, the full weight file) for each way a full checkpoint can be handed over."""
    run = root / "run"
    consolidated(run / "checkpoints" / "checkpoint_000100" / "consolidated")
    newest = full_checkpoint(run / "checkpoints" / "checkpoint_000200" / "consolidated")
    folder = full_checkpoint(root / "full" / "consolidated")
    nu = full_checkpoint(root / "nu", "model.safetensors")
    (root / "nu" / "moshi_lm_kwargs.json").write_text('{"dim": 64}')
    return [(run, newest), (folder.parent, folder), (folder, folder), (root / "nu", nu), (nu, nu)]


def test_a_full_checkpoint_points_to_moshi_weight(tmp_path):
    for given, weight in _full_layouts(tmp_path):
        with pytest.raises(UsageError) as excinfo:
            find_adapter(given)
        assert usage_error(excinfo) == f"{weight} is a full checkpoint, not a LoRA adapter", given
        assert f"--moshi-weight {weight}" in excinfo.value.hint


# --- fitting the base -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_repo() -> Path:
    pytest.importorskip("moshi.modules.lora", reason="LoRA needs moshi.modules.lora, which moshi 0.2.2 lacks")
    from jmoshi_cli.tiny_model import cached_tiny_repo

    return cached_tiny_repo()


@pytest.fixture(scope="module")
def adapters(tiny_repo, tmp_path_factory) -> dict[str, Path]:
    from builders import build_misfit_lora, build_tiny_lora

    root = tmp_path_factory.mktemp("lora")
    return {"tiny": build_tiny_lora(tiny_repo, root / "tiny" / "consolidated").parent,
            "misfit": build_misfit_lora(tiny_repo, root / "misfit" / "consolidated").parent}


@pytest.fixture
def tiny_adapter(adapters) -> Adapter:
    return find_adapter(adapters["tiny"])


@pytest.fixture
def tiny_kwargs(tiny_repo) -> dict:
    return lm_kwargs(tiny_repo / "config.json")


def _copy(folder: Path, dest: Path, **config_changes) -> Path:
    shutil.copytree(folder, dest)
    config = json.loads((dest / "config.json").read_text())
    (dest / "config.json").write_text(json.dumps({**config, **config_changes}))
    return dest


def _misfit_message(adapter: Adapter, base: Path, kwargs: dict, **options) -> str:
    with pytest.raises(UsageError) as excinfo:
        check_fits(adapter, base, kwargs, **options)
    message = usage_error(excinfo)
    assert message.startswith(f"LoRA adapter {adapter.weight} does not fit "), message
    return message


def test_the_tiny_adapter_is_what_moshi_finetune_writes(tiny_adapter, tiny_repo):
    config = json.loads(tiny_adapter.config.read_text())
    assert config == {**json.loads((tiny_repo / "config.json").read_text()),
                      "lora": True, "lora_rank": 4, "lora_scaling": 2.0}
    names = read_header(tiny_adapter.weight)
    assert all(re.fullmatch(r".+\.lora_[AB]\.weight", name) for name in names)
    assert "depformer.layers.0.self_attn.in_projs.7.lora_B.weight" in names


def test_the_tiny_adapter_fits_the_tiny_model(tiny_adapter, tiny_repo, tiny_kwargs):
    check_fits(tiny_adapter, tiny_repo / "model.safetensors", tiny_kwargs)


def test_an_adapter_for_another_dim_does_not_fit(adapters, tiny_repo, tiny_kwargs):
    misfit = find_adapter(adapters["misfit"])
    message = _misfit_message(misfit, tiny_repo / "model.safetensors", tiny_kwargs, base_name="variant tiny")
    assert message.endswith("does not fit variant tiny: dim is 32 in the adapter's config.json, 64 in the base")


def test_tensors_of_another_shape_do_not_fit_whatever_the_config_says(adapters, tiny_repo, tiny_kwargs, tmp_path):
    lying = find_adapter(_copy(adapters["misfit"], tmp_path / "lying", dim=64))
    message = _misfit_message(lying, tiny_repo / "model.safetensors", tiny_kwargs)
    assert re.search(r": \S+ is \d+x32 in the adapter, \d+x64 in the base$", message), message


def test_a_rank_other_than_the_configs_does_not_fit(adapters, tiny_repo, tiny_kwargs, tmp_path):
    wrong = find_adapter(_copy(adapters["tiny"], tmp_path / "wrong", lora_rank=8))
    message = _misfit_message(wrong, tiny_repo / "model.safetensors", tiny_kwargs)
    assert message.endswith("has rank 4, its config.json says lora_rank 8"), message


def _split_names(base: dict[str, Tensor], mult_of) -> dict[str, Tensor]:
    """The base header under moshi >= 0.2.4's names: one in_projs/out_projs weight per step."""
    out = {}
    for name, tensor in base.items():
        match = re.fullmatch(r"(.+)\.(?:in_proj_weight|out_proj\.weight)", name)
        if match is None:
            out[name] = tensor
            continue
        kind = "in" if name.endswith("in_proj_weight") else "out"
        mult = mult_of(match[1])
        for i in range(mult):
            rows = tensor.shape[0] // mult
            out[f"{match[1]}.{kind}_projs.{i}.weight"] = Tensor(tensor.dtype, (rows, tensor.shape[1]))
    return out


def test_it_fits_a_base_saved_under_the_split_attention_names(tiny_adapter, tiny_repo, tiny_kwargs, tmp_path):
    legacy = read_header(tiny_repo / "model.safetensors")
    split = write_safetensors(tmp_path / "split.safetensors",
                              _split_names(legacy, lambda prefix: 8 if prefix.startswith("depformer") else 1))
    check_fits(tiny_adapter, split, tiny_kwargs)
    wrong = write_safetensors(tmp_path / "wrong.safetensors", _split_names(legacy, lambda prefix: 1))
    message = _misfit_message(tiny_adapter, wrong, tiny_kwargs)
    assert message.endswith("depformer.layers.0.self_attn.in_projs.0 is 192x64 in the adapter, 1536x64 in the base")


def test_embeddings_trained_in_full_next_to_the_adapter_must_match_the_base(tiny_adapter, tiny_repo, tiny_kwargs,
                                                                           tmp_path):
    header = read_header(tiny_adapter.weight)
    config = json.loads(tiny_adapter.config.read_text())
    rows = tiny_kwargs["text_card"] + 1  # the toy tokenizer's size depends on the sentencepiece that trained it
    good = consolidated(tmp_path / "good", config, {**header, "text_emb.weight": Tensor("BF16", (rows, 64))})
    check_fits(find_adapter(good), tiny_repo / "model.safetensors", tiny_kwargs)
    bad = consolidated(tmp_path / "bad", config, {**header, "text_emb.weight": Tensor("BF16", (rows + 81, 64))})
    message = _misfit_message(find_adapter(bad), tiny_repo / "model.safetensors", tiny_kwargs)
    assert message.endswith(f"text_emb.weight is [{rows + 81}, 64] in the adapter, [{rows}, 64] in the base")


def test_stacked_legacy_adapter_names_fit(tiny_adapter, tiny_repo, tiny_kwargs, tmp_path):
    stacked: dict[str, Tensor] = {}
    for name, tensor in read_header(tiny_adapter.weight).items():
        match = re.fullmatch(r"(depformer\..+)\.(in|out)_projs\.\d+\.lora_([AB])\.weight", name)
        if match is None:
            stacked[name] = tensor
            continue
        key = f"{match[1]}.{match[2]}_proj.lora_{match[3]}.weight"
        rows = stacked[key].shape[0] if key in stacked else 0
        stacked[key] = Tensor(tensor.dtype, (rows + tensor.shape[0], tensor.shape[1]))
    folder = consolidated(tmp_path / "stacked", json.loads(tiny_adapter.config.read_text()), stacked)
    check_fits(find_adapter(folder), tiny_repo / "model.safetensors", tiny_kwargs)


# --- moshi 0.2.13 loads what check_fits accepts -----------------------------------------------------


def _logits(lm, codes):
    import torch

    with torch.no_grad():
        out = lm(codes)
    return torch.cat([out.text_logits.flatten(), out.logits.nan_to_num().flatten()])


@pytest.mark.slow
def test_moshi_serves_the_adapter_and_it_changes_the_output(adapters, tiny_adapter, tiny_repo, tiny_kwargs,
                                                            monkeypatch):
    import torch
    from moshi.models import loaders

    monkeypatch.setenv("NO_TORCH_COMPILE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # Every code below text_card: text tokens and audio codes alike index their embeddings.
    high = min(200, tiny_kwargs["text_card"], tiny_kwargs["card"])
    codes = torch.randint(0, high, (1, tiny_kwargs["n_q"] + 1, 6), generator=torch.Generator().manual_seed(0))
    base = loaders.get_moshi_lm(tiny_repo / "model.safetensors", lm_kwargs=tiny_kwargs, dtype=torch.float32)
    # What moshi.server does with --moshi-weight, --config-path and --lora-weight.
    info = loaders.CheckpointInfo.from_hf_repo(
        "jmoshi/tiny", moshi_weights=tiny_repo / "model.safetensors", mimi_weights=tiny_repo / "unused",
        tokenizer=tiny_repo / "unused", config_path=tiny_adapter.config, lora_weights=tiny_adapter.weight)
    fused = info.get_moshi(device="cpu", dtype=torch.float32, fuse_lora=True)
    unfused = info.get_moshi(device="cpu", dtype=torch.float32, fuse_lora=False)
    reference = _logits(base, codes)
    assert (_logits(fused, codes) - reference).abs().max() > 0.05
    assert torch.allclose(_logits(fused, codes), _logits(unfused, codes), atol=1e-4)

    with pytest.raises(RuntimeError, match="size mismatch"):
        misfit = find_adapter(adapters["misfit"])
        loaders.get_moshi_lm(tiny_repo / "model.safetensors", lm_kwargs={**tiny_kwargs, "lora": True, "lora_rank": 4},
                             dtype=torch.float32, lora_weights=misfit.weight)


# --- the config beside a full checkpoint ------------------------------------------------------------


def test_a_config_json_beside_the_weight_is_used_as_is(tmp_path):
    weight = full_checkpoint(tmp_path / "ckpt", "model.safetensors")
    (weight.parent / "config.json").write_text('{"dim": 64, "moshi_name": "model.safetensors"}')
    (weight.parent / "moshi_lm_kwargs.json").write_text('{"dim": 32}')
    assert local_config(weight, tmp_path / "data") == weight.parent / "config.json"
    assert not (tmp_path / "data").exists()


def test_lora_keys_are_dropped_from_a_merged_checkpoints_config(tmp_path):
    weight = full_checkpoint(tmp_path / "consolidated")  # moshi-finetune keeps lora: true after merging
    (weight.parent / "config.json").write_text(json.dumps({**ADAPTER_CONFIG, "lm_gen_config": {"temp": 0.7}}))
    made = local_config(weight, tmp_path / "data")
    assert made.parent == tmp_path / "data" / "lm-configs"
    assert json.loads(made.read_text()) == {"dim": 64, "lm_gen_config": {"temp": 0.7}}
    assert local_config(weight, tmp_path / "data") == made


def test_nu_dialogues_lm_kwargs_become_a_moshi_config(tmp_path):
    weight = write_safetensors(tmp_path / "step_10000_cleaned" / "model.safetensors", _PAIR)
    kwargs = {"dim": 4096, "dep_q": 8, "depformer_context": 8, "delays": [0, 0, 1], "depformer_causal": True}
    (weight.parent / "moshi_lm_kwargs.json").write_text(json.dumps(kwargs, indent=4))
    made = local_config(weight, tmp_path / "data")
    assert re.fullmatch(r"[0-9a-f]{16}\.json", made.name) and made.parent == tmp_path / "data" / "lm-configs"
    assert json.loads(made.read_text()) == kwargs
    assert local_config(weight, tmp_path / "data") == made
    assert sorted(os.listdir(made.parent)) == [made.name]  # no temp file left behind


def test_no_config_beside_the_weight(tmp_path):
    weight = write_safetensors(tmp_path / "model.safetensors", _PAIR)
    assert local_config(weight, tmp_path / "data") is None


@pytest.mark.parametrize("name", ["config.json", "moshi_lm_kwargs.json"])
def test_an_invalid_config_beside_the_weight_names_the_file(tmp_path, name):
    weight = write_safetensors(tmp_path / "model.safetensors", _PAIR)
    (tmp_path / name).write_text('{"dim": 64,')
    with pytest.raises(ConfigError) as excinfo:
        local_config(weight, tmp_path / "data")
    assert str(tmp_path / name) in excinfo.value.message


def test_moshi_reads_the_converted_config_as_its_lm_kwargs(tmp_path, tiny_repo):
    from moshi.models import loaders

    kwargs = json.loads((tiny_repo / "config.json").read_text())
    (tmp_path / "moshi_lm_kwargs.json").write_text(json.dumps(kwargs))
    made = local_config(tmp_path / "model.safetensors", tmp_path / "data")
    info = loaders.CheckpointInfo.from_hf_repo("jmoshi/tiny", moshi_weights=tmp_path / "model.safetensors",
                                               mimi_weights=tmp_path / "m", tokenizer=tmp_path / "t",
                                               config_path=made)
    assert info.lm_config == kwargs


def test_importing_it_loads_no_heavy_module():
    code = ("import sys, jmoshi_cli.model.lora; print(','.join(m for m in ('torch', 'moshi', 'safetensors', "
            "'huggingface_hub', 'numpy') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert done.stdout.strip() == ""
