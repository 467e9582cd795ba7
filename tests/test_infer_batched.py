"""`jmoshi infer --batch N`: inputs N at a time on one loaded model (the batched engine), each saying
what the same input says alone (the same text tokens at the same frames, seeded sampling included;
its voice decoded from the same codes), through long inputs split at the context, a bad file among
good ones, and files that finish at different times."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from jmoshi_cli import audio_io, runtime
from jmoshi_cli.infer import InferOptions, Session
from jmoshi_cli.sampling import Sampling
from test_infer import SEED, _model_files, synthetic, write_clip

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    if not runtime.detect().has_slot_masks:
        pytest.skip("this moshi predates per-slot reset and exec masks (0.2.5)")
    from jmoshi_cli.tiny_model import cached_tiny_repo

    # A context of 8 frames, so that the longer inputs go through in segments (as test_infer's long input).
    tmp = tmp_path_factory.mktemp("batched")
    repo = cached_tiny_repo()
    config = json.loads((repo / "config.json").read_text())
    config["context"] = 8
    (tmp / "config.json").write_text(json.dumps(config))
    return _model_files(repo, config=tmp / "config.json")


def _inputs(folder: Path) -> list[Path]:
    folder.mkdir()
    seconds = (1.5, 0.4, 0.9, 0.25, 1.1)  # 19, 5, 12, 4 and 14 frames: some in several segments
    paths = [write_clip(folder / f"in{i}.wav", synthetic(s, 24000, seed=i), 24000)
             for i, s in enumerate(seconds)]
    (folder / "broken.wav").write_bytes(b"RIFF....WAVEfmt nothing")
    return [paths[0], paths[1], folder / "broken.wav", *paths[2:]]


def _outputs(results) -> dict[str, tuple]:
    """Per input: whether it went through, its frames, segments, text and timed pieces."""
    return {r.source.name: (r.ok, r.frames, r.segments, r.text,
                            json.loads(r.outputs["transcript"].read_text())["pieces"] if r.ok else None)
            for r in results}


def _voices(result) -> tuple:
    return tuple(audio_io.read_audio(result.outputs[key]).pcm for key in ("jmoshi", "dialogue"))


def test_a_batch_gives_each_input_exactly_what_it_gives_alone(files, tmp_path):
    sources = _inputs(tmp_path / "in")
    options = InferOptions(device="cpu", sampling=Sampling(seed=SEED))
    alone = Session.load(files, options).run_many(sources, tmp_path / "alone")
    session = Session.load(files, replace(options, batch=3))
    assert session.model.batch == 3
    batched = session.run_many(sources, tmp_path / "batched")
    assert [r.source for r in batched] == sources
    assert _outputs(batched) == _outputs(alone)
    for one, many in zip(alone, batched, strict=True):
        if one.ok:
            # The same audio codes, decoded by Mimi in a batch: float32 rounding moves a sample by at most
            # one step of 16 bits.
            for x, y in zip(_voices(one), _voices(many), strict=True):
                assert x.shape == y.shape and np.abs(x - y).max() <= 1 / 32768, one.source
    assert [r.ok for r in batched] == [True, True, False, True, True, True]
    assert "broken.wav" in batched[2].error
    assert max(r.segments for r in batched) == 3 and all(r.rtf > 0 for r in batched if r.ok)
