"""The batched engine on the tiny model (CPU, float32, greedy): a conversation in a slot gives the same
text tokens, audio codes and voice as the same conversation alone, stepped the way moshi.server steps
one, whoever else talks beside it, stalls, hangs up or starts over."""

from __future__ import annotations

import numpy as np
import pytest

from jmoshi_cli import runtime
from jmoshi_cli.audio_io import FRAME_SIZE
from jmoshi_cli.selftest import speech_like

pytestmark = pytest.mark.slow
FRAMES = 16


@pytest.fixture(scope="module")
def model():
    if not runtime.detect().has_slot_masks:
        pytest.skip("this moshi predates per-slot reset and exec masks (0.2.5)")
    import torch
    from moshi.models import loaders

    from jmoshi_cli.tiny_model import cached_tiny_repo
    from jmoshi_cli.upstream import torch_cpu

    torch.manual_seed(0)
    repo = cached_tiny_repo()
    info = loaders.CheckpointInfo.from_hf_repo(
        "jmoshi-test/tiny", repo / "model.safetensors", repo / "tokenizer-e351c8d8-checkpoint125.safetensors",
        repo / "tokenizer_spm_32k_3.model", config_path=repo / "config.json")
    mimi = info.get_mimi(device="cpu")
    torch_cpu.fast_transposed_convs(mimi)  # as the conversation child's Mimi (moshi_server.apply)
    return mimi, info.get_moshi(device="cpu", dtype=torch.float32)


def _voices() -> list[np.ndarray]:
    base = speech_like(FRAMES * FRAME_SIZE / 24000)
    rng = np.random.default_rng(3)
    return [base, base[::-1].copy(), (0.3 * base + 0.05 * rng.standard_normal(base.shape)).astype(np.float32)]


def _alone(mimi, lm, pcm: np.ndarray) -> list[tuple[int, np.ndarray, np.ndarray]]:
    """One conversation as moshi.server runs it: (text id, codes, voice) for each frame that has them."""
    import torch
    from moshi.models import LMGen

    lm_gen = LMGen(lm, use_sampling=False)
    out = []
    with torch.no_grad(), mimi.streaming(1), lm_gen.streaming(1):
        for i in range(len(pcm) // FRAME_SIZE):
            codes = mimi.encode(torch.from_numpy(pcm[i * FRAME_SIZE:(i + 1) * FRAME_SIZE])[None, None])
            if i == 0:
                mimi.reset_streaming()
            tokens = lm_gen.step(codes)
            if tokens is not None:
                voice = mimi.decode(tokens[:, 1:]).numpy()[0, 0]
                out.append((int(tokens[0, 0, 0]), tokens[0, 1:, 0].numpy(), voice))
    return out


def test_each_slot_talks_as_if_alone_through_stalls_hang_ups_and_new_conversations(model):
    from jmoshi_cli.engine.torch_batched import BatchedEngine, SlotsFull

    mimi, lm = model
    voices = _voices()
    alone = [_alone(mimi, lm, pcm) for pcm in voices]
    with BatchedEngine(mimi, lm, slots=3, use_sampling=False) as engine:
        got = _run_schedule(engine, voices, SlotsFull)
    for name, reference in (("a", alone[0]), ("b", alone[1]), ("c again", alone[2])):
        assert len(got[name]) == len(reference), name
        assert [t for t, _, _ in got[name]] == [t for t, _, _ in reference], name
        pairs = list(zip(got[name], reference, strict=True))
        assert all(np.array_equal(x, y) for (_, x, _), (_, y, _) in pairs), name
        assert all(np.allclose(x, y, atol=1e-4) for (_, _, x), (_, _, y) in pairs), name


def _run_schedule(engine, voices: list[np.ndarray], full: type[Exception]) -> dict[str, list]:
    """a and c talk from the start; b joins at tick 3 and its audio is late at ticks 8-11; c hangs up at tick
    6 and a new conversation ("c again") takes its slot."""
    got: dict[str, list] = {"a": [], "b": [], "c": [], "c again": []}
    slot_of, sent = {"a": engine.open(), "c": engine.open()}, {"a": 0, "b": 0, "c": 0, "c again": 0}
    source = {"a": voices[0], "b": voices[1], "c": voices[2], "c again": voices[2]}
    for tick in range(60):
        if tick == 3:
            slot_of["b"] = engine.open()  # a conversation starts beside two running ones
            with pytest.raises(full):
                engine.open()
        if tick == 6:  # c hangs up mid-way; a new conversation takes its slot and starts from a clean state
            engine.close(slot_of.pop("c"))
            slot_of["c again"] = engine.open()
        for name, slot in slot_of.items():
            stalled = name == "b" and 8 <= tick < 12  # its audio is late: the others go on without it
            if not stalled and sent[name] < FRAMES:
                pcm = source[name]
                engine.feed(slot, pcm[sent[name] * FRAME_SIZE:(sent[name] + 1) * FRAME_SIZE])
                sent[name] += 1
        by_slot = engine.step()
        for name, slot in slot_of.items():
            said = by_slot.get(slot)
            if said is not None and said.pcm is not None:
                got[name].append((said.text_id, said.codes, said.pcm))
        if all(count == FRAMES for name, count in sent.items() if name != "c"):
            break
    return got


def _seeded(engine, pcm: np.ndarray, others: list[np.ndarray], stall: range = range(0)) -> list:
    """The conversation in `pcm`, opened first, beside `others` (each in a slot of its own): (text id, codes)."""
    mine, theirs = engine.open(), [engine.open() for _ in others]
    out, sent, tick = [], 0, 0
    while sent < FRAMES:
        if tick not in stall:
            engine.feed(mine, pcm[sent * FRAME_SIZE:(sent + 1) * FRAME_SIZE])
            sent += 1
        for slot, other in zip(theirs, others, strict=True):
            frame = tick % FRAMES
            engine.feed(slot, other[frame * FRAME_SIZE:(frame + 1) * FRAME_SIZE])
        said = engine.step().get(mine)
        if said is not None and said.pcm is not None:
            out.append((said.text_id, said.codes))
        tick += 1
    return out


def test_a_seeded_conversation_samples_the_same_alone_and_beside_three_others(model):
    from jmoshi_cli.engine.torch_batched import BatchedEngine

    mimi, lm = model
    voices = _voices()
    sampling = {"use_sampling": True, "temp": 0.8, "temp_text": 0.7, "top_k": 250, "top_k_text": 25}
    with BatchedEngine(mimi, lm, slots=1, seed=11, **sampling) as engine:
        alone = _seeded(engine, voices[0], [])
    with BatchedEngine(mimi, lm, slots=4, seed=11, **sampling) as engine:
        beside = _seeded(engine, voices[0], [voices[1], voices[2], voices[1][::-1].copy()], stall=range(5, 8))
    assert len(alone) == len(beside) > 0
    assert [t for t, _ in alone] == [t for t, _ in beside]
    assert all(np.array_equal(x, y) for (_, x), (_, y) in zip(alone, beside, strict=True))
    # Sampling, not greedy decoding: another seed says something else.
    with BatchedEngine(mimi, lm, slots=1, seed=12, **sampling) as engine:
        other = _seeded(engine, voices[0], [])
    assert [(t, c.tolist()) for t, c in other] != [(t, c.tolist()) for t, c in alone]
