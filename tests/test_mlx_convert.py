"""PyTorch checkpoints -> moshi_mlx weights (jmoshi_cli.mlx.convert), on the tiny model. Needs `.[mlx]`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("moshi_mlx", reason="the MLX runtime is not installed (pip install -e '.[mlx]')")

from jmoshi_cli.errors import CacheError, UsageError  # noqa: E402
from jmoshi_cli.mlx import convert  # noqa: E402
from jmoshi_cli.model.precision import Precision  # noqa: E402
from jmoshi_cli.tiny_model import MIMI_NAME, MLX_8BIT_OVERRIDES, MOSHI_NAME, cached_tiny_repo, default_cache_root  # noqa: E402,E501

from builders import flip_a_byte  # noqa: E402

QUANTIZED = (Precision.INT8, Precision.INT4)


def mlx_tiny_repo() -> Path:
    """The tiny model's variant whose layers divide by 64 (8-bit) and whose context is 24 frames."""
    root = default_cache_root()
    return cached_tiny_repo(root.with_name(root.name + "-mlx8"), MLX_8BIT_OVERRIDES)


@pytest.fixture(scope="module")
def repo() -> Path:
    return mlx_tiny_repo()


@pytest.fixture(scope="module")
def split_repo(repo, tmp_path_factory) -> Path:
    """The same weights saved by moshi 0.2.13 itself: per-step attention names (in_projs.{i}.weight)."""
    import torch
    from moshi.models import loaders
    from safetensors.torch import save_file

    folder = tmp_path_factory.mktemp("split")
    config = json.loads((repo / "config.json").read_text())
    lm = loaders.get_moshi_lm(repo / MOSHI_NAME, lm_kwargs=config, device="cpu", dtype=torch.bfloat16)
    state = lm.state_dict()
    assert any(".in_projs.1." in name for name in state)
    save_file({k: v.contiguous() for k, v in state.items()}, str(folder / MOSHI_NAME))
    mimi = loaders.get_mimi(repo / MIMI_NAME, device="cpu")
    save_file({k: v.contiguous() for k, v in mimi.state_dict().items()}, str(folder / MIMI_NAME))
    (folder / "config.json").write_text((repo / "config.json").read_text())
    return folder


def convert_in(home: Path, repo: Path, precision: Precision) -> convert.MlxCheckpoint:
    return convert.ensure_mlx(home, repo / MOSHI_NAME, None, repo / "config.json", precision)


@pytest.mark.parametrize("precision", [Precision.BF16, *QUANTIZED])
def test_both_attention_layouts_give_the_same_bytes(repo, split_repo, tmp_path, precision):
    legacy = convert_in(tmp_path / "a", repo, precision)
    split = convert_in(tmp_path / "b", split_repo, precision)
    assert legacy.source_sha256 != split.source_sha256  # two different source files...
    assert legacy.weight.read_bytes() == split.weight.read_bytes()  # ...one MLX file


@pytest.mark.parametrize("precision", [Precision.BF16, *QUANTIZED])
def test_the_converted_file_loads_strictly_into_moshi_mlx(repo, tmp_path, precision):
    from jmoshi_cli.mlx.model import load_lm, read_lm_kwargs

    made = convert_in(tmp_path, repo, precision)
    model = load_lm(read_lm_kwargs(made.config), made.weight, convert.quantization_for(precision))
    assert model.cfg.transformer.context == MLX_8BIT_OVERRIDES["context"] - 1  # the upstream off-by-one, fixed


def test_made_once_kept_by_source_hash_and_manifest_written_last(repo, tmp_path):
    made = convert_in(tmp_path, repo, Precision.INT8)
    assert made.made_s is not None and made.weight.parent == convert.folder_for(tmp_path, made.source_sha256)
    manifest = json.loads((made.weight.parent / "int8.json").read_text())
    assert manifest["bits"] == 8 and manifest["group_size"] == 64 and manifest["size"] == made.weight.stat().st_size
    again = convert_in(tmp_path, repo, Precision.INT8)
    assert again.made_s is None and again.weight == made.weight
    assert convert.verify(again)
    # A folder whose manifest is missing (a conversion that was cut) is made again, not used.
    (made.weight.parent / "int8.json").unlink()
    assert convert.cached(made.weight.parent, Precision.INT8) is None
    assert convert_in(tmp_path, repo, Precision.INT8).made_s is not None


@pytest.mark.parametrize("precision", QUANTIZED)
def test_layer_sizes_that_do_not_divide_by_the_group_size_get_one_line(tmp_path, precision):
    repo = cached_tiny_repo()  # the default tiny model: its feed-forward is 176 wide
    with pytest.raises(UsageError) as refused:
        convert_in(tmp_path, repo, precision)
    assert "\n" not in refused.value.message and "does not divide by the group size" in refused.value.message
    assert not list((tmp_path / "mlx").glob("*/model.*"))  # refused before anything was written


def test_auto_is_decided_before_conversion(repo, tmp_path):
    with pytest.raises(UsageError):
        convert_in(tmp_path, repo, Precision.AUTO)


def test_a_file_that_is_not_this_model_is_refused_by_name(repo, tmp_path):
    import numpy as np
    from safetensors.numpy import save_file

    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text((repo / "config.json").read_text())
    save_file({"text_emb.weight": np.zeros((4, 4), dtype=np.float32)}, str(other / MOSHI_NAME))
    with pytest.raises(CacheError, match="shape"):
        convert_in(tmp_path, other, Precision.BF16)


def test_the_builtin_7b_config_builds_moshi_mlx_own_7b_apart_from_the_context_fix():
    """J-Moshi has no config.json: moshi's built-in kwargs must give the model of Kyutai's config_v0_1."""
    from mlx.utils import tree_flatten
    from moshi_mlx import models

    from jmoshi_cli.mlx.model import mlx_config
    from jmoshi_cli.model.lm_config import lm_kwargs

    ours, kyutai = mlx_config(lm_kwargs(None)), models.config_v0_1()
    assert (ours.transformer.context, ours.transformer.max_seq_len) == (2999, 3000)
    assert kyutai.transformer.context == 3000

    def shapes(config):  # built lazily: nothing is allocated
        return {name: tuple(a.shape) for name, a in tree_flatten(models.Lm(config).parameters())}

    assert shapes(ours) == shapes(kyutai)


def test_mimi_gets_the_names_rustymimi_reads(repo, split_repo, tmp_path):
    import numpy as np
    import rustymimi

    assert convert.ensure_mimi(tmp_path, repo / MIMI_NAME, None) == repo / MIMI_NAME  # legacy: used as it is
    renamed = convert.ensure_mimi(tmp_path, split_repo / MIMI_NAME, None)
    assert renamed.parent.parent == tmp_path / "mlx" / "mimi"
    before = convert.Reader(split_repo / MIMI_NAME).keys()
    assert sum(".in_projs." in k or ".out_projs." in k for k in before) == 32
    pcm = np.random.default_rng(0).standard_normal((1, 1, 1920 * 4)).astype(np.float32) * 0.1
    codes = [rustymimi.Tokenizer(str(path), num_codebooks=8).encode_step(pcm) for path in (repo / MIMI_NAME, renamed)]
    assert np.array_equal(codes[0], codes[1])


# --- a converted file is checked against the sha256 it was written with -----------------------------------------


def test_a_flipped_byte_in_the_converted_weights_is_refused_removed_and_made_again(repo, tmp_path):
    made = convert_in(tmp_path, repo, Precision.INT4)
    flip_a_byte(made.weight)
    with pytest.raises(CacheError, match="the MLX int4 weights .* no longer has the sha256") as refused:
        convert_in(tmp_path, repo, Precision.INT4)
    assert "run the command again" in refused.value.hint
    assert not made.weight.exists() and convert.cached(made.weight.parent, Precision.INT4) is None
    remade = convert_in(tmp_path, repo, Precision.INT4)
    assert remade.made_s is not None and convert.verify(remade)


def test_a_flipped_byte_in_the_renamed_mimi_is_refused(split_repo, tmp_path):
    renamed = convert.ensure_mimi(tmp_path, split_repo / MIMI_NAME, None)
    flip_a_byte(renamed)
    with pytest.raises(CacheError, match="the MLX Mimi .* no longer has the sha256"):
        convert.ensure_mimi(tmp_path, split_repo / MIMI_NAME, None)
    assert not renamed.exists()
    assert convert.ensure_mimi(tmp_path, split_repo / MIMI_NAME, None) == renamed
    assert convert.verify_mimi(renamed.parent)


def test_recheck_hashes_every_converted_file_and_removes_the_bad_ones(repo, split_repo, tmp_path):
    from jmoshi_cli.model import derived

    made = {p: convert_in(tmp_path, repo, p) for p in (Precision.BF16, Precision.INT8)}
    mimi = convert.ensure_mimi(tmp_path, split_repo / MIMI_NAME, None)
    lm_sha, mimi_sha = made[Precision.BF16].source_sha256, derived.sha256_of(split_repo / MIMI_NAME)

    def rechecked() -> dict[str, derived.Rechecked]:
        found = convert.recheck_lm(tmp_path, lm_sha) + convert.recheck_mimi(tmp_path, mimi_sha)
        return {r.kind: r for r in found}

    assert {(r.kind, r.path, r.intact) for r in rechecked().values()} == {
        ("mlx-bf16", made[Precision.BF16].weight, True), ("mlx-int8", made[Precision.INT8].weight, True),
        ("mlx-mimi", mimi, True)}
    flip_a_byte(made[Precision.INT8].weight)
    again = rechecked()
    assert not again["mlx-int8"].intact and again["mlx-bf16"].intact and again["mlx-mimi"].intact
    assert again["mlx-int8"].status.value == "corrupt" and not made[Precision.INT8].weight.exists()
    assert set(rechecked()) == {"mlx-bf16", "mlx-mimi"}  # the bad one is gone: the next start makes it again
    assert convert.recheck_lm(tmp_path, "0" * 64) == convert.recheck_mimi(tmp_path, "0" * 64) == []
