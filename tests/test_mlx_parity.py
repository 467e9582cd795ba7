"""The converted model is exactly PyTorch moshi's: float32 logits within 1e-5, past the attention context.

Same input tokens (teacher forced), one frame at a time: the main transformer's text logits and every
depformer step's audio logits, from PyTorch moshi (the source checkpoint) and from moshi_mlx (the
converted bf16 file, run in float32). The tiny model's context is 24 frames; 60 are compared, so the
KV caches wrap. Needs `.[mlx]`.
"""

from __future__ import annotations

import json

import pytest

pytest.importorskip("moshi_mlx", reason="the MLX runtime is not installed (pip install -e '.[mlx]')")

from jmoshi_cli.mlx import convert  # noqa: E402
from jmoshi_cli.model.precision import Precision  # noqa: E402
from jmoshi_cli.tiny_model import MOSHI_NAME  # noqa: E402
from test_mlx_convert import mlx_tiny_repo  # noqa: E402

STEPS = 60
TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    import torch
    from moshi.models import loaders

    repo = mlx_tiny_repo()
    kwargs = json.loads((repo / "config.json").read_text())
    made = convert.ensure_mlx(tmp_path_factory.mktemp("home"), repo / MOSHI_NAME, None, repo / "config.json",
                              Precision.BF16)
    torch_lm = loaders.get_moshi_lm(repo / MOSHI_NAME, lm_kwargs=kwargs, device="cpu", dtype=torch.float32).eval()
    return kwargs, torch_lm, made.weight


def mlx_lm(kwargs, weight, fixed: bool):
    import mlx.core as mx
    from moshi_mlx import models

    from jmoshi_cli.mlx.model import load_lm

    if fixed:
        model = load_lm(kwargs, weight, None)
    else:  # moshi_mlx's own config, as local_web builds it
        model = models.Lm(models.LmConfig.from_config_dict(kwargs))
        model.load_weights(str(weight), strict=True)
    model.set_dtype(mx.float32)
    return model


def tokens(kwargs):
    import numpy as np

    rng = np.random.default_rng(0)
    text = rng.integers(0, kwargs["text_card"], STEPS)
    return np.stack([text] + [rng.integers(0, kwargs["card"], STEPS) for _ in range(kwargs["n_q"])])


def torch_logits(lm, frame, dep_q):
    """Text logits and each depformer step's logits for one frame ((1, 17, 1) tokens), streaming."""
    import torch

    with torch.no_grad():
        out, text = lm.forward_text(torch.tensor(frame))
        audio = []
        with lm.depformer.streaming(1):
            for cb in range(dep_q):
                audio.append(lm.forward_depformer(cb, torch.tensor(frame[:, cb: cb + 1]), out)[0, 0, 0].numpy())
    return text[0, 0, 0].numpy(), audio


def mlx_logits(model, frame):
    import mlx.core as mx
    import numpy as np

    xs = model.text_emb(mx.array(frame[:, 0]))
    for cb, emb in enumerate(model.audio_embs):
        xs = xs + emb(mx.array(frame[:, cb + 1]))
    out = model.out_norm(model.transformer(xs, cache=model.transformer_cache))
    text = np.array(model.text_linear(out))[0, 0]
    for cache in model.depformer_cache:
        cache.reset()
    audio = []
    for cb, piece in enumerate(model.depformer.slices):
        hidden = piece.linear_in(out) + piece.emb(mx.array(frame[:, cb]))
        hidden = piece.transformer(hidden, cache=model.depformer_cache)
        audio.append(np.array(piece.linear_out(hidden))[0, 0])
    return text, audio


def worst_differences(kwargs, torch_lm, model) -> list[float]:
    import numpy as np

    sequence = tokens(kwargs)
    worst = []
    with torch_lm.streaming(1):
        for t in range(STEPS):
            frame = sequence[None, :, t: t + 1]
            expected, got = torch_logits(torch_lm, frame, kwargs["dep_q"]), mlx_logits(model, frame)
            pairs = [(expected[0], got[0]), *zip(expected[1], got[1], strict=True)]
            diffs = [np.abs(a - b).max() for a, b in pairs]
            worst.append(float(max(diffs)))
    return worst


def test_float32_logits_match_pytorch_moshi_past_the_context(models):
    kwargs, torch_lm, weight = models
    assert STEPS > 2 * kwargs["context"]
    worst = worst_differences(kwargs, torch_lm, mlx_lm(kwargs, weight, fixed=True))
    assert max(worst) < TOLERANCE, f"step {worst.index(max(worst))}: {max(worst):.2e}"


def test_moshi_mlx_as_shipped_drifts_once_past_the_context(models):
    """Why mlx_config changes the context: without it the same weights are another model after 24 frames."""
    kwargs, torch_lm, weight = models
    worst = worst_differences(kwargs, torch_lm, mlx_lm(kwargs, weight, fixed=False))
    context = kwargs["context"]
    assert max(worst[:context]) < TOLERANCE
    assert max(worst[context:]) > 1e-2
