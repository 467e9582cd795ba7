"""`jmoshi infer` on the MLX backend gives what the PyTorch path gives, from the same recording. Needs `.[mlx]`.

Greedy decoding (temp 0 and temp_text 0: argmax in both LMGen and moshi_mlx's Sampler) in float32 on both
sides (the converted bf16 weights hold exactly the source's values): the same text id for every frame and
the same audio within float rounding, over an input longer than the tiny model's 24-frame context (two
segments). The tiny model's greedy output ignores the user's audio, which would hide a misaligned input: its
Mimi encodes every sound to the same codes and its user embeddings are tiny. So on both sides the encoder
gives codes computed from each frame's samples (:func:`frame_codes`, exact integers) and the user
embeddings are multiplied by 64 (exact in bf16 and float32); the test checks that the answer then depends
on the input. Mimi's decoder is the real one on both sides (torch's and rustymimi). In bf16 the two
backends' kernels round differently and greedy choices part after a few frames, so only lengths and
files are checked there, through the command line.
"""

from __future__ import annotations

import json
import wave
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("moshi_mlx", reason="the MLX runtime is not installed (pip install -e '.[mlx]')")

from conftest import child_env, jmoshi  # noqa: E402
from jmoshi_cli import infer  # noqa: E402
from jmoshi_cli.audio_io import FRAME_SIZE, SAMPLE_RATE  # noqa: E402
from jmoshi_cli.cache.artifacts import ModelFiles  # noqa: E402
from jmoshi_cli.infer import generation  # noqa: E402
from jmoshi_cli.infer import mlx_engine as mlx_infer  # noqa: E402
from jmoshi_cli.infer.inputs import load_user  # noqa: E402
from jmoshi_cli.mlx import convert  # noqa: E402
from jmoshi_cli.model.precision import Precision  # noqa: E402
from jmoshi_cli.sampling import Sampling  # noqa: E402
from jmoshi_cli.tiny_model import MIMI_NAME, MOSHI_NAME, TOKENIZER_NAME  # noqa: E402
from test_mlx_convert import mlx_tiny_repo  # noqa: E402

from helpers import LOAD_S, a_wav, user_audio  # noqa: E402

INPUT_S = 2.23  # 28 frames (the last one partial): two segments of the 24-frame context
USER_GAIN = 64.0
AUDIO_TOLERANCE = 1e-5  # float32 PCM in [-1, 1]
CARD = 2048  # Mimi's codebook size
GREEDY = infer.InferOptions(device="cpu", sampling=Sampling(temp=0, temp_text=0, seed=3))


def write_wav(path: Path, pcm: np.ndarray) -> Path:
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(SAMPLE_RATE)
        out.writeframes((np.clip(pcm, -1, 1) * 32767).astype("<i2").tobytes())
    return path


def frame_codes(pcm: np.ndarray, codebooks: int) -> np.ndarray:
    """(1, codebooks, 1) codes that differ from frame to frame, computed exactly from 16-bit samples."""
    level = int(np.round(np.asarray(pcm, dtype=np.float64) * 32767).astype(np.int64).sum())
    return np.array([[[(level * (k + 1) + 7 * k) % CARD] for k in range(codebooks)]], dtype=np.int64)


class FakeEncoder:
    """rustymimi's Tokenizer whose encoder is :func:`frame_codes`."""

    def __init__(self, real_class, *args, num_codebooks: int, **kwargs):
        self.real, self.codebooks = real_class(*args, num_codebooks=num_codebooks, **kwargs), num_codebooks

    def encode_step(self, pcm):
        return frame_codes(pcm, self.codebooks).astype(np.uint32)

    def decode_step(self, codes):
        return self.real.decode_step(codes)

    def reset(self) -> None:
        self.real.reset()


def torch_session(repo: Path, monkeypatch) -> infer.Session:
    import torch

    load = generation.load_modules
    monkeypatch.setattr(generation, "load_modules", lambda files, config, device, dtype, captured:
                        load(files, config, device, torch.float32, captured))
    session = infer.Session.load(ModelFiles(repo / MOSHI_NAME, repo / MIMI_NAME, repo / TOKENIZER_NAME,
                                            repo / "config.json"), GREEDY)
    assert isinstance(session.model, generation.Model)
    with torch.no_grad():
        for emb in session.model.lm.emb[session.model.lm.dep_q:]:
            emb.weight.mul_(USER_GAIN)
    session.model.mimi.encode = lambda x: torch.from_numpy(frame_codes(x.numpy(), 8))
    return session


def mlx_session(repo: Path, home: Path, monkeypatch) -> infer.Session:
    import functools

    import mlx.core as mx
    import rustymimi

    monkeypatch.setattr(rustymimi, "Tokenizer", functools.partial(FakeEncoder, rustymimi.Tokenizer))

    made = convert.ensure_mlx(home, repo / MOSHI_NAME, None, repo / "config.json", Precision.BF16)
    mimi = convert.ensure_mimi(home, repo / MIMI_NAME, None)
    files = ModelFiles(made.weight, mimi, repo / TOKENIZER_NAME, made.config)
    session = infer.Session(mlx_infer.load(files, GREEDY, "cpu"), GREEDY)
    assert isinstance(session.model, mlx_infer.MlxModel)
    lm = session.model.engine.lm
    lm.set_dtype(mx.float32)
    for emb in lm.audio_embs[lm.cfg.depformer.num_slices:]:
        emb.weight = emb.weight * USER_GAIN
    return session


def generated(session: infer.Session, pcm: np.ndarray) -> tuple[np.ndarray, list[int]]:
    segments = generation.segment_bounds(pcm.shape[0] // FRAME_SIZE, session.model.max_frames)
    return session.model.generate(pcm, segments, GREEDY.sampling.seed)


def test_greedy_float32_outputs_equal_the_torch_path(tmp_path, monkeypatch):
    repo = mlx_tiny_repo()
    source = write_wav(tmp_path / "talk.wav", user_audio(INPUT_S))
    sessions = {"torch": torch_session(repo, monkeypatch), "mlx": mlx_session(repo, tmp_path / "home", monkeypatch)}
    results = {name: s.run_many([source], tmp_path / name)[0] for name, s in sessions.items()}
    for name, result in results.items():
        assert result.ok, (name, result.error)
        assert (result.frames, result.segments) == (28, 2)
    keep = ("audio_s", "frames", "segments", "text", "channel", "sample_rate", "note")
    assert {k: getattr(results["mlx"], k) for k in keep} == {k: getattr(results["torch"], k) for k in keep}
    docs = {name: json.loads(r.outputs["transcript"].read_text()) for name, r in results.items()}
    for doc in docs.values():
        doc.pop("source")
    assert docs["mlx"] == docs["torch"]

    pcm = load_user(source, "left").pcm
    (torch_pcm, torch_ids), (mlx_pcm, mlx_ids) = (generated(s, pcm) for s in sessions.values())
    assert mlx_ids == torch_ids and len(mlx_ids) == 28
    assert mlx_pcm.shape == torch_pcm.shape == pcm.shape
    assert float(np.abs(mlx_pcm - torch_pcm).max()) < AUDIO_TOLERANCE
    assert float(np.abs(torch_pcm).max()) > 100 * AUDIO_TOLERANCE
    # The comparison sees the user's audio: silence gives another answer.
    silent_pcm, silent_ids = generated(sessions["mlx"], np.zeros_like(pcm))
    assert silent_ids != mlx_ids or float(np.abs(silent_pcm - mlx_pcm).max()) > 100 * AUDIO_TOLERANCE


def test_cli_infer_on_mlx_writes_the_three_files(tiny_env, tmp_path):
    source = a_wav(tmp_path / "in")
    out = tmp_path / "out"
    run = jmoshi("infer", str(source), "--backend", "mlx", "--variant", "tiny", "--out", str(out), "--json",
                 env=child_env(tiny_env), timeout=LOAD_S)
    assert run.returncode == 0, run.stdout + run.stderr
    document = json.loads(run.stdout)  # the one JSON document on stdout
    assert document["jmoshi_result_version"] == 1 and [f["ok"] for f in document["files"]] == [True]
    names = sorted(p.name for p in out.iterdir())
    assert names == ["in.dialogue.wav", "in.jmoshi.wav", "in.transcript.json"]
    with wave.open(str(out / "in.dialogue.wav")) as dialogue:
        assert (dialogue.getnchannels(), dialogue.getframerate()) == (2, SAMPLE_RATE)
        assert dialogue.getnframes() == 13 * FRAME_SIZE  # 1 s rounded up to whole 80 ms frames
    assert json.loads((out / "in.transcript.json").read_text())["frames"] == 13
