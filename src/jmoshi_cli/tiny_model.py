"""Small but real model artifacts that moshi's own loaders accept (0.2.2 and 0.2.13 alike).

``build_tiny_repo`` writes the four files of a J-Moshi style repository:

- ``config.json``: moshi's built-in LM config with only the sizes shrunk;
- ``model.safetensors``: an ``LMModel`` built from that config, random weights, bf16 (a few MB), saved
  under moshi 0.2.2's key names as J-Moshi's checkpoints are (see :func:`legacy_key_names`), so a
  repository built under either runtime loads in both;
- ``tokenizer_spm_32k_3.model``: a SentencePiece unigram model trained on a few dozen Japanese
  sentences (ids unk=0, bos=1, eos=2, pad=3);
- ``tokenizer-e351c8d8-checkpoint125.safetensors``: Mimi with its real architecture, random
  weights and random codebooks, fp16 (about 192 MB).

The weights are random: the model talks nonsense, but every code path of the server (loading,
streaming encode, LM steps, decode, text pieces, Opus) runs for real, on CPU, in seconds.

``build_web_ui_bundle`` writes a small ``dist.tgz`` shaped like the one in
``kyutai/moshi-artifacts`` and ``cached_tiny_repo`` keeps one built repository on disk.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import tarfile
import tempfile
import time
import typing as tp
import uuid
from pathlib import Path

from .fsutil import atomic_write
from .upstream.moshi_private import builtin_lm_kwargs, mimi_kwargs

if tp.TYPE_CHECKING:
    import torch

CONFIG_NAME = "config.json"
MOSHI_NAME = "model.safetensors"
TOKENIZER_NAME = "tokenizer_spm_32k_3.model"
MIMI_NAME = "tokenizer-e351c8d8-checkpoint125.safetensors"
TINY_FILES = (CONFIG_NAME, MOSHI_NAME, TOKENIZER_NAME, MIMI_NAME)

# Keys of config.json that moshi's loaders pop before passing the rest to LMModel(...).
NON_LM_KEYS = ("moshi_name", "mimi_name", "tokenizer_name", "model_type", "lm_gen_config")

# Bump when the recipe changes, so that cached copies are rebuilt.
RECIPE_VERSION = 1
_COMPLETE_MARKER = ".complete.json"
WEB_UI_TITLE = "J-Moshi test UI"

# Sizes that replace those of moshi's built-in 7B config; every other key is kept as is.
LM_SIZE_OVERRIDES: dict[str, tp.Any] = {
    "dim": 64,
    "num_heads": 4,
    "num_layers": 2,
    "depformer_dim": 64,
    "depformer_num_heads": 2,
    "depformer_num_layers": 1,
    "depformer_dim_feedforward": int(4.125 * 64),
}
# A variant whose every MLX-quantized layer divides by 64 (8-bit) and 32 (4-bit) and whose attention
# context is short, so that tests run past it within seconds (jmoshi_cli.mlx).
MLX_8BIT_OVERRIDES: dict[str, tp.Any] = {
    "dim": 256,
    "depformer_dim": 64,
    "depformer_dim_feedforward": 384,
    "context": 24,
}
_SPM_VOCAB_REQUEST = 320  # an upper bound: hard_vocab_limit=False lets training stop below it
_MIN_TEXT_CARD = 25  # LMGen's default top_k_text

# Everyday conversational Japanese, with plenty of aizuchi, for the toy tokenizer.
JA_SENTENCES = (
    "こんにちは、今日はいい天気ですね。",
    "うん、そうですね。",
    "うんうん、なるほど。",
    "へえ、そうなんだ。",
    "ええ、わかります。",
    "はい、はい、それで？",
    "そうそう、それそれ。",
    "えっと、ちょっと待ってください。",
    "あのー、すみません、駅はどこですか。",
    "昨日は何をしていましたか。",
    "週末は家でゆっくり映画を見ていました。",
    "最近、料理にはまっているんです。",
    "へえ、どんな料理を作るんですか。",
    "カレーとか、簡単なものばかりですけど。",
    "いいですね、私もカレーが大好きです。",
    "お仕事は忙しいですか。",
    "まあまあですね、今週はちょっと忙しいです。",
    "あ、そうなんですか、大変ですね。",
    "明日は雨が降るらしいですよ。",
    "本当ですか、傘を持っていかないと。",
    "朝ごはんはもう食べましたか。",
    "いいえ、まだです。お腹がすきました。",
    "じゃあ、一緒にパンでも食べに行きましょうか。",
    "ありがとうございます。",
    "どういたしまして。",
    "夏休みはどこかに行きますか。",
    "家族と北海道に行く予定です。",
    "わあ、楽しそうですね。",
    "うーん、どうしようかな。",
    "なるほどね、それはいい考えだと思います。",
    "たしかに、そうかもしれません。",
    "犬と猫、どっちが好きですか。",
    "私は猫派です。うちにも一匹いますよ。",
    "かわいいですね、名前は何ていうんですか。",
    "電車が遅れていて、少し遅刻しそうです。",
    "大丈夫ですよ、気をつけて来てくださいね。",
    "最近よく眠れていますか。",
    "あんまり眠れなくて、ちょっと疲れています。",
    "それは心配ですね、無理しないでください。",
    "趣味は何ですか。",
    "休みの日はよく散歩をしたり、本を読んだりします。",
    "いいなあ、私も本を読むのが好きです。",
    "はい、もしもし、田中です。",
    "あ、もしもし、山田です。今ちょっといいですか。",
    "ええ、どうぞ。",
    "また今度ゆっくり話しましょう。",
    "うん、じゃあね、またね。",
    "おやすみなさい。",
)


# --------------------------------------------------------------------------------------------
# Pieces
# --------------------------------------------------------------------------------------------


def train_tokenizer_bytes(seed: int = 0) -> bytes:
    """Train the toy SentencePiece unigram model in memory and return its serialized bytes."""
    import sentencepiece as spm

    del seed  # training is deterministic with one thread; kept for symmetry
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(JA_SENTENCES),
        model_writer=model,
        model_type="unigram",
        vocab_size=_SPM_VOCAB_REQUEST,
        hard_vocab_limit=False,
        character_coverage=1.0,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=3,
        num_threads=1,
        minloglevel=2,
    )
    return model.getvalue()


def tiny_lm_config(text_card: int, overrides: dict[str, tp.Any] | None = None) -> dict[str, tp.Any]:
    """moshi's built-in LM kwargs, sizes shrunk, ``text_card`` set (fits the toy tokenizer); ``overrides``
    replace more keys (a variant of the tiny model, e.g. MLX_8BIT_OVERRIDES)."""
    if text_card < _MIN_TEXT_CARD:
        raise ValueError(f"text_card {text_card} < {_MIN_TEXT_CARD} (LMGen's top_k_text)")
    config = builtin_lm_kwargs()
    config.update(LM_SIZE_OVERRIDES)
    config.update(overrides or {})
    config["text_card"] = int(text_card)
    return config


def lm_kwargs_from_config(config: dict[str, tp.Any]) -> dict[str, tp.Any]:
    """What moshi's CheckpointInfo passes to ``LMModel``: config.json minus the popped keys."""
    return {k: v for k, v in config.items() if k not in NON_LM_KEYS}


def _build_mimi_module(device: tp.Any = "cpu"):
    """The same modules as ``moshi.models.loaders.get_mimi``, without loading any weights."""
    from moshi.models import MimiModel, loaders
    from moshi.modules import SEANetDecoder, SEANetEncoder, transformer
    from moshi.quantization import SplitResidualVectorQuantizer

    kwargs = mimi_kwargs()
    encoder = SEANetEncoder(**kwargs["seanet"])
    decoder = SEANetDecoder(**kwargs["seanet"])
    encoder_transformer = transformer.ProjectedTransformer(device=device, **kwargs["transformer"])
    decoder_transformer = transformer.ProjectedTransformer(device=device, **kwargs["transformer"])
    quantizer = SplitResidualVectorQuantizer(**kwargs["quantizer"])
    model = MimiModel(
        encoder,
        decoder,
        quantizer,
        channels=1,
        sample_rate=loaders.SAMPLE_RATE,
        frame_rate=loaders.FRAME_RATE,
        encoder_frame_rate=loaders.SAMPLE_RATE / encoder.hop_length,
        causal=True,
        resample_method="conv",
        encoder_transformer=encoder_transformer,
        decoder_transformer=decoder_transformer,
    ).to(device=device)
    model.eval()
    return model


def _randomize_codebooks(mimi, generator) -> int:
    """Give every codebook random, distinct entries (the defaults are all zeros)."""
    import torch
    from moshi.quantization.core_vq import EuclideanCodebook

    count = 0
    for module in mimi.modules():
        if isinstance(module, EuclideanCodebook):
            size, dim = module.embedding_sum.shape
            emb = torch.randn(size, dim, generator=generator)
            module.embedding_sum.data.copy_(emb)
            module.cluster_usage.data.fill_(1.0)  # embedding = embedding_sum / cluster_usage
            module._initialized.data.fill_(1.0)
            module.register_buffer("_embedding", None, persistent=False)
            count += 1
    return count


_SPLIT_PROJ = re.compile(r"^(?P<prefix>.*)\.(?P<kind>in|out)_projs\.(?P<step>\d+)\.weight$")


def legacy_key_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The attention weights under moshi 0.2.2's names, which every moshi version loads.

    moshi 0.2.4+ keeps one Linear per step (``self_attn.in_projs.{i}.weight``, ``out_projs.{i}.weight``)
    and splits 0.2.2's ``in_proj_weight`` / ``out_proj.weight`` (the steps stacked on dim 0) when
    loading them; 0.2.2 cannot load the split names. J-Moshi's own checkpoints use 0.2.2's names.
    """
    out: dict[str, torch.Tensor] = {}
    stacked: dict[str, dict[int, torch.Tensor]] = {}
    for name, tensor in state.items():
        match = _SPLIT_PROJ.match(name)
        if match is None:
            out[name] = tensor
            continue
        legacy = (f"{match['prefix']}.in_proj_weight" if match["kind"] == "in"
                  else f"{match['prefix']}.out_proj.weight")
        stacked.setdefault(legacy, {})[int(match["step"])] = tensor
    if stacked:
        import torch

        for legacy, steps in stacked.items():
            out[legacy] = torch.cat([steps[i] for i in range(len(steps))], dim=0)
    return out


def _save_state_dict(module, path: Path, dtype) -> None:
    """Save a module's state dict with safetensors (0.2.2 key names), casting floating tensors to ``dtype``."""
    from safetensors.torch import save

    tensors = {}
    seen: dict[int, str] = {}
    for name, tensor in module.state_dict().items():
        ptr = tensor.untyped_storage().data_ptr()
        if tensor.numel() and ptr in seen:
            raise RuntimeError(f"{name} shares memory with {seen[ptr]}")
        seen[ptr] = name
        if tensor.is_floating_point():
            tensor = tensor.to(dtype)
        tensors[name] = tensor.contiguous()
    tensors = {name: tensor.contiguous() for name, tensor in legacy_key_names(tensors).items()}
    atomic_write(path, save(tensors, metadata={"format": "pt"}))
    del tensors


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


def build_tiny_repo(dest: Path, seed: int = 0, lm_overrides: dict[str, tp.Any] | None = None) -> dict[str, Path]:
    """Write the four files into dest (created), return name->path. Deterministic for a seed (and
    ``lm_overrides``, LM config keys that make a variant; see tiny_lm_config)."""
    import sentencepiece as spm
    import torch
    from moshi.models.lm import LMModel

    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    paths = {name: dest / name for name in TINY_FILES}

    # Tokenizer first: its size decides text_card.
    spm_bytes = train_tokenizer_bytes(seed)
    sp = spm.SentencePieceProcessor()
    sp.LoadFromSerializedProto(spm_bytes)
    vocab = sp.get_piece_size()
    if vocab < _MIN_TEXT_CARD:
        raise RuntimeError(f"toy tokenizer too small: {vocab} pieces")
    atomic_write(paths[TOKENIZER_NAME], spm_bytes)

    config = tiny_lm_config(text_card=vocab, overrides=lm_overrides)
    atomic_write(paths[CONFIG_NAME], (json.dumps(config, indent=2) + "\n").encode())

    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed)
        lm = LMModel(device="cpu", dtype=torch.bfloat16, **lm_kwargs_from_config(config))
        lm.eval()
        _save_state_dict(lm, paths[MOSHI_NAME], torch.bfloat16)
        del lm

        torch.manual_seed(seed + 1)
        mimi = _build_mimi_module("cpu")
        gen = torch.Generator().manual_seed(seed + 2)
        if _randomize_codebooks(mimi, gen) == 0:
            raise RuntimeError("no codebook found in Mimi")
        _save_state_dict(mimi, paths[MIMI_NAME], torch.float16)
        del mimi
    return paths


_INDEX_HTML = """<!doctype html>
<html lang="ja">
<head>
<meta charset="utf-8">
<title>{title}</title>
<link rel="stylesheet" href="/assets/index.css">
</head>
<body>
<h1>{title}</h1>
<p>moshi.server static content used by the jmoshi tests.</p>
</body>
</html>
"""
_INDEX_CSS = "body { font-family: sans-serif; margin: 2em; }\n"


def build_web_ui_bundle(dest_tgz: Path) -> Path:
    """A small dist.tgz like kyutai/moshi-artifacts's: a top-level `dist/` folder with index.html (a small
    page, title 'J-Moshi test UI') and one asset; what moshi.server unpacks and serves with --static."""
    dest_tgz = Path(dest_tgz)
    dest_tgz.parent.mkdir(parents=True, exist_ok=True)
    entries = [
        ("dist", None),
        ("dist/index.html", _INDEX_HTML.format(title=WEB_UI_TITLE).encode()),
        ("dist/assets", None),
        ("dist/assets/index.css", _INDEX_CSS.encode()),
    ]
    bundle = io.BytesIO()
    with tarfile.open(fileobj=bundle, mode="w:gz") as tar:
        for name, data in entries:
            info = tarfile.TarInfo(name)
            info.mtime = 0
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            if data is None:
                info.type = tarfile.DIRTYPE
                info.mode = 0o755
                tar.addfile(info)
            else:
                info.mode = 0o644
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    atomic_write(dest_tgz, bundle.getvalue())
    return dest_tgz


def default_cache_root() -> Path:
    env = os.environ.get("JMOSHI_TINY_CACHE")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "jmoshi" / "tiny-v1"


def is_complete(folder: Path, lm_overrides: dict[str, tp.Any] | None = None) -> bool:
    """True when folder holds the four files as recorded by a finished build (of that variant)."""
    folder = Path(folder)
    try:
        marker = json.loads((folder / _COMPLETE_MARKER).read_text())
    except (OSError, ValueError):
        return False
    if marker.get("recipe") != RECIPE_VERSION or marker.get("lm_overrides", {}) != (lm_overrides or {}):
        return False
    sizes = marker.get("sizes", {})
    for name in TINY_FILES:
        try:
            if (folder / name).stat().st_size != sizes.get(name):
                return False
        except OSError:
            return False
    return True


@contextlib.contextmanager
def _build_lock(lock_path: Path):
    """An advisory inter-process lock, so racing processes build once (best effort)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - non-POSIX
        yield
        return
    with open(lock_path, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _remove_tree_quietly(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def cached_tiny_repo(cache_root: Path | None = None, lm_overrides: dict[str, tp.Any] | None = None) -> Path:
    """build_tiny_repo once into a cache folder (default: $JMOSHI_TINY_CACHE or ~/.cache/jmoshi/tiny-v1)
    and return the folder; rebuild atomically (temp dir + rename) if incomplete; safe if two processes race.
    A variant (``lm_overrides``) needs a cache_root of its own: a folder holds one variant."""
    final = Path(cache_root).expanduser() if cache_root is not None else default_cache_root()
    if is_complete(final, lm_overrides):
        return final
    parent = final.parent
    parent.mkdir(parents=True, exist_ok=True)
    with _build_lock(parent / f".{final.name}.lock"):
        if is_complete(final, lm_overrides):  # another process finished while we waited
            return final
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.build-", dir=parent))
        try:
            paths = build_tiny_repo(tmp, lm_overrides=lm_overrides)
            marker = {
                "recipe": RECIPE_VERSION,
                **({"lm_overrides": lm_overrides} if lm_overrides else {}),
                "built_at": time.time(),
                "sizes": {name: p.stat().st_size for name, p in paths.items()},
            }
            (tmp / _COMPLETE_MARKER).write_text(json.dumps(marker, indent=2))
            # Move an incomplete leftover out of the way, then rename the new build into place.
            if final.exists() or final.is_symlink():
                trash = parent / f".{final.name}.trash-{uuid.uuid4().hex}"
                try:
                    os.rename(final, trash)
                except FileNotFoundError:
                    pass
                else:
                    _remove_tree_quietly(trash)
            try:
                os.rename(tmp, final)
            except OSError:
                # Someone without the lock (another filesystem view, no fcntl) won the race.
                if not is_complete(final, lm_overrides):
                    raise
        finally:
            if tmp.exists():
                _remove_tree_quietly(tmp)
    return final


__all__ = [
    "TINY_FILES",
    "CONFIG_NAME",
    "MOSHI_NAME",
    "MIMI_NAME",
    "TOKENIZER_NAME",
    "NON_LM_KEYS",
    "JA_SENTENCES",
    "MLX_8BIT_OVERRIDES",
    "WEB_UI_TITLE",
    "build_tiny_repo",
    "build_web_ui_bundle",
    "cached_tiny_repo",
    "default_cache_root",
    "is_complete",
    "lm_kwargs_from_config",
    "tiny_lm_config",
    "train_tokenizer_bytes",
]
