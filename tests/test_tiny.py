"""The tiny artifacts load with the installed moshi's own loaders and run a few real streaming steps."""

from __future__ import annotations

import json
import tarfile
import threading
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("moshi")

from jmoshi_cli import tiny_model as tiny  # noqa: E402
from jmoshi_cli.audio_io import FRAME_SIZE, SAMPLE_RATE  # noqa: E402
from jmoshi_cli.tiny_model import (  # noqa: E402
    TINY_FILES,
    build_web_ui_bundle,
    cached_tiny_repo,
)
from jmoshi_cli.upstream import moshi_private  # noqa: E402


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    return cached_tiny_repo(tmp_path_factory.mktemp("cache") / "tiny")


@pytest.fixture(scope="module")
def config(repo) -> dict:
    return json.loads((repo / "config.json").read_text())


@pytest.fixture(scope="module")
def tokenizer(repo):
    import sentencepiece

    return sentencepiece.SentencePieceProcessor(str(repo / "tokenizer_spm_32k_3.model"))


@pytest.fixture(scope="module")
def mimi(repo, config):
    from moshi.models import loaders

    return loaders.get_mimi(repo / "tokenizer-e351c8d8-checkpoint125.safetensors",
                            num_codebooks=config["dep_q"])


@pytest.fixture(scope="module")
def lm(repo, config):
    from moshi.models import loaders

    lm_kwargs = {k: v for k, v in config.items() if k not in tiny.NON_LM_KEYS}
    return loaders.get_moshi_lm(repo / "model.safetensors", lm_kwargs=lm_kwargs)


def test_files_and_sizes(repo):
    names = {p.name for p in repo.iterdir() if not p.name.startswith(".")}
    assert names == set(TINY_FILES)
    assert (repo / "model.safetensors").stat().st_size < 30e6
    mimi_size = (repo / "tokenizer-e351c8d8-checkpoint125.safetensors").stat().st_size
    assert 150e6 < mimi_size < 250e6  # fp16


def test_config_is_moshi_config_with_sizes_shrunk(config, tokenizer):
    builtin = moshi_private.builtin_lm_kwargs()
    assert set(config) == set(builtin)
    changed = {k for k in config if config[k] != builtin[k]}
    assert changed <= set(tiny.LM_SIZE_OVERRIDES) | {"text_card"}
    assert config["dim"] <= 128 and config["num_layers"] <= 4
    assert 25 <= config["text_card"] <= tokenizer.get_piece_size()
    for key in ("n_q", "dep_q", "card", "existing_text_padding_id", "delays"):
        assert config[key] == builtin[key]


def test_tokenizer_japanese(tokenizer):
    assert (tokenizer.unk_id(), tokenizer.bos_id(), tokenizer.eos_id(), tokenizer.pad_id()) == (0, 1, 2, 3)
    text = "うん、そうですね。今日はいい天気ですね。"
    ids = tokenizer.encode(text)
    assert ids and all(0 <= i < tokenizer.get_piece_size() for i in ids)
    assert 0 not in ids  # every character is covered
    assert tokenizer.decode(ids) == text
    # Pieces longer than a character are learnt (which ones depends on sentencepiece: 0.2.0, pinned by
    # moshi 0.2.2, learns 'そう' and 'ですね' here; 0.2.1+ under moshi 0.2.13 a smaller vocabulary).
    assert any(len(tokenizer.id_to_piece(i).lstrip("\u2581")) > 1 for i in ids)


def test_mimi_codebooks_random_and_decode_not_silent(mimi):
    from moshi.quantization.core_vq import EuclideanCodebook

    books = [m for m in mimi.modules() if isinstance(m, EuclideanCodebook)]
    assert len(books) == 32
    emb = books[0].embedding
    assert emb.abs().sum() > 0 and torch.unique(emb[:16], dim=0).shape[0] == 16
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        codes = torch.randint(0, 2048, (1, 8, 4), generator=gen)
        pcm = mimi.decode(codes)
    assert pcm.shape == (1, 1, 4 * FRAME_SIZE)
    assert torch.isfinite(pcm).all()
    assert pcm.pow(2).mean().sqrt().item() > 1e-4


@pytest.mark.slow
def test_streaming_lmgen_steps(mimi, lm, tokenizer, config):
    from moshi.models import LMGen

    frame = FRAME_SIZE
    steps = 6
    t = torch.arange(frame * steps, dtype=torch.float32) / SAMPLE_RATE
    audio = (0.3 * torch.sin(2 * torch.pi * (200 + 400 * t) * t))[None, None]
    gen = LMGen(lm)
    out, texts = [], []
    with torch.no_grad(), gen.streaming(1), mimi.streaming(1):
        for i in range(steps):
            codes = mimi.encode(audio[:, :, i * frame:(i + 1) * frame])
            assert codes.shape == (1, config["dep_q"], 1)
            tokens = gen.step(codes)
            if tokens is None:
                continue
            assert tokens.shape == (1, config["dep_q"] + 1, 1)
            out.append(mimi.decode(tokens[:, 1:]))
            texts.append(int(tokens[0, 0, 0]))
    assert len(out) >= steps - 2  # the acoustic delay swallows the first step(s)
    pcm = torch.cat(out, dim=-1)
    assert pcm.shape == (1, 1, len(out) * frame)
    assert pcm.pow(2).mean().sqrt().item() > 0
    assert all(0 <= i < config["text_card"] <= tokenizer.get_piece_size() for i in texts)
    pieces = [tokenizer.id_to_piece(i) for i in texts if i not in (0, 3)]
    assert pieces


def _fake_build(calls: list, delay: float = 0.0):
    """Stand-in for build_tiny_repo (the real one runs in the module fixture): tiny files, same names."""

    def build(dest, seed=0, lm_overrides=None):
        import time

        calls.append(Path(dest))
        dest = Path(dest)
        dest.mkdir(parents=True, exist_ok=True)
        time.sleep(delay)
        out = {}
        for i, name in enumerate(TINY_FILES):
            (dest / name).write_bytes(b"x" * (i + 1))
            out[name] = dest / name
        return out

    return build


def test_cache_reused_and_rebuilt(tmp_path, monkeypatch):
    calls: list = []
    monkeypatch.setattr(tiny, "build_tiny_repo", _fake_build(calls))
    root = tmp_path / "tiny"
    assert cached_tiny_repo(root) == root and tiny.is_complete(root)
    assert len(calls) == 1 and calls[0] != root  # built elsewhere, then renamed into place
    assert cached_tiny_repo(root) == root
    assert len(calls) == 1  # reused

    (root / "config.json").unlink()  # damaged: the next call rebuilds in full
    assert not tiny.is_complete(root)
    assert cached_tiny_repo(root) == root
    assert len(calls) == 2 and tiny.is_complete(root)
    assert {p.name for p in root.iterdir() if not p.name.startswith(".")} == set(TINY_FILES)

    (root / "model.safetensors").write_bytes(b"truncated")  # wrong size: rebuilt too
    assert cached_tiny_repo(root) == root
    assert len(calls) == 3 and tiny.is_complete(root)
    leftovers = [p.name for p in tmp_path.iterdir()
                 if p.name.startswith(".tiny.") and not p.name.endswith(".lock")]
    assert leftovers == []


def test_cache_env_default(monkeypatch, tmp_path):
    monkeypatch.setenv("JMOSHI_TINY_CACHE", str(tmp_path / "from-env"))
    assert tiny.default_cache_root() == tmp_path / "from-env"
    monkeypatch.delenv("JMOSHI_TINY_CACHE")
    assert tiny.default_cache_root() == Path.home() / ".cache" / "jmoshi" / "tiny-v1"


def test_cache_race_builds_once(tmp_path, monkeypatch):
    calls: list = []
    monkeypatch.setattr(tiny, "build_tiny_repo", _fake_build(calls, delay=0.5))
    root = tmp_path / "race"
    results, errors = [], []

    def worker():
        try:
            results.append(cached_tiny_repo(root))
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(3)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors
    assert results == [root] * 3
    assert len(calls) == 1
    assert tiny.is_complete(root)


def test_web_ui_bundle_layout(tmp_path):
    tgz = build_web_ui_bundle(tmp_path / "dist.tgz")
    assert tgz == tmp_path / "dist.tgz"
    with tarfile.open(tgz, "r:gz") as tar:
        names = tar.getnames()
        assert all(n == "dist" or n.startswith("dist/") for n in names)
        assert "dist/index.html" in names
        assets = [m for m in tar.getmembers() if m.isfile() and m.name != "dist/index.html"]
        assert len(assets) == 1
        tar.extractall(tmp_path)  # noqa: S202 - our own bundle; what moshi.server does next to dist.tgz
    html = (tmp_path / "dist" / "index.html").read_text()
    assert "<title>J-Moshi test UI</title>" in html
    asset = tmp_path / assets[0].name
    assert asset.is_file() and asset.name in html
