"""`serve --conversations`, the pieces without a server: what one conversation's state costs (checked
against the tensors moshi holds for the tiny model), how many fit a GPU, the flag's parsing and refusals,
`auto`, HAProxy's maxconn per replica, and doctor's conversations row."""

from __future__ import annotations

import dataclasses

import pytest

from conftest import run_cli
from jmoshi_cli import runtime
from jmoshi_cli.backends.base import Features
from jmoshi_cli.engine import memory
from jmoshi_cli.errors import PreflightError, UsageError
from jmoshi_cli.hardware import GPU, Probe
from jmoshi_cli.reporter import Reporter
from jmoshi_cli.serving import haproxy, replicas, serve
from jmoshi_cli.upstream.moshi_private import streaming_state_bytes

from helpers import fake_gpus

J_MOSHI_BYTES = 1_589_444_608  # 32 x 2 x 3000 x 4096 x 2 (LM) + 6 x 2 x 8 x 1024 x 2 (depformer) + Mimi's


class Notes(Reporter):
    def __init__(self) -> None:
        self.notes: list[str] = []

    def note(self, text: str) -> None:
        self.notes.append(text)


# --- what a conversation costs --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny():
    import torch
    from moshi.models import loaders

    from jmoshi_cli.tiny_model import cached_tiny_repo

    torch.manual_seed(0)
    repo = cached_tiny_repo()
    info = loaders.CheckpointInfo.from_hf_repo(
        "jmoshi-test/tiny", repo / "model.safetensors", repo / "tokenizer-e351c8d8-checkpoint125.safetensors",
        repo / "tokenizer_spm_32k_3.model", config_path=repo / "config.json")
    return repo, info.get_mimi(device="cpu"), info.get_moshi(device="cpu", dtype=torch.float32)


def _state_bytes(mimi, lm, slots: int) -> int:
    import torch
    from moshi.models import LMGen

    lm_gen = LMGen(lm, use_sampling=False)  # its streaming enters the LM's and the depformer's
    with torch.no_grad(), mimi.streaming(slots), lm_gen.streaming(slots):
        return streaming_state_bytes(mimi, lm_gen)


@pytest.mark.slow  # loads the tiny model (moshi, torch)
def test_per_conversation_bytes_is_what_moshi_holds_for_one_more_conversation(tiny):
    from jmoshi_cli.model import lm_config

    repo, mimi, lm = tiny
    measured = (_state_bytes(mimi, lm, 3) - _state_bytes(mimi, lm, 1)) / 2
    formula = memory.per_conversation_bytes(lm_config.lm_kwargs(repo / "config.json"), kv_bytes=4)  # float32
    assert abs(formula - measured) / measured < 0.10, (formula, measured)
    # Most of the tiny model's is Mimi's (real Mimi, float32): its part alone agrees too.
    mimi_measured = (_held_bytes_streaming(mimi, 3) - _held_bytes_streaming(mimi, 1)) / 2
    assert abs(memory.MIMI_BYTES - mimi_measured) / mimi_measured < 0.02, (memory.MIMI_BYTES, mimi_measured)


def _held_bytes_streaming(module, slots: int) -> int:
    import torch

    with torch.no_grad(), module.streaming(slots):
        return streaming_state_bytes(module)


def test_mimi_constant_is_the_tiny_models_real_mimi_config():
    from jmoshi_cli.upstream.moshi_private import mimi_kwargs

    transformer = mimi_kwargs()["transformer"]
    assert (transformer["num_layers"], transformer["context"], transformer["d_model"]) == (
        memory.MIMI_LAYERS, memory.MIMI_CONTEXT, memory.MIMI_DIM)
    assert memory.MIMI_BYTES == 16_384_000


def test_j_moshi_costs_1_59_gb_a_conversation_and_how_many_fit():
    from jmoshi_cli.model import lm_config

    per = memory.per_conversation_bytes(lm_config.lm_kwargs(None))
    assert per == J_MOSHI_BYTES and round(per / 1e9, 2) == 1.59
    weights_bf16 = 15.8e9  # the LM's bf16 safetensors and Mimi, as `serve --conversations auto` counts them
    assert memory.fit(80e9, weights_bf16, per) == 35 >= 16  # an 80 GB H100
    assert memory.fit(24e9, weights_bf16, per) == 3  # a 24 GB card (0.9 x 24 - 15.8 = 5.8 GB of room)
    assert memory.fit(16e9, weights_bf16, per) == 0  # not even the weights and one conversation
    assert memory.fit(1000e9, weights_bf16, per) == memory.MOST


# --- the flag -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "count"), [("4", 4), ("auto", None), ("AUTO", None), (None, 1), ("64", 64)])
def test_parse_conversations(text, count):
    assert memory.parse_count(text, "--conversations") == count


@pytest.mark.parametrize("text", ["0", "x", "65", "-1", ""])
def test_parse_conversations_refuses_what_is_not_a_count(text):
    with pytest.raises(UsageError) as caught:
        memory.parse_count(text, "--conversations")
    assert caught.value.exit_code == 2 and "--conversations 4" in caught.value.hint


def test_cli_refuses_a_bad_count_in_one_line(env):
    result = run_cli("serve", "--conversations", "x", env=env)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr + result.stdout
    lines = result.stderr.strip().splitlines()
    assert lines[0] == "error: --conversations 'x' is not a number from 1 to 64, or auto", lines
    assert lines[1:] == ["hint: e.g. --conversations 4 (auto: as many as fit the GPU's memory)"]



def test_infer_refuses_a_bad_batch_and_a_batch_on_mlx_in_one_line(env, tmp_path):
    wav = tmp_path / "in.wav"
    wav.write_bytes(b"")
    result = run_cli("infer", str(wav), "--batch", "many", env=env)
    assert result.returncode == 2 and "Traceback" not in result.stderr + result.stdout
    assert result.stderr.strip().splitlines()[0] == "error: --batch 'many' is not a number from 1 to 64, or auto"
    result = run_cli("infer", str(wav), "--batch", "2", "--backend", "mlx", env=env)
    assert result.returncode == 2 and "--conversations is not offered on the MLX backend" not in result.stderr
    assert result.stderr.startswith("error: --batch is not offered on the MLX backend"), result.stderr

def _real_runtime() -> runtime.Runtime:
    return runtime.Runtime.from_versions(runtime.installed_versions())


def test_auto_with_replicas_is_refused(monkeypatch):
    monkeypatch.setattr(runtime, "detect", lambda: dataclasses.replace(_real_runtime(), has_slot_masks=True))
    with pytest.raises(UsageError, match="--conversations auto with --replicas"):
        serve.prepare(serve.ServeOptions(replicas="2", conversations="auto", device="cpu"), Reporter())


# --- the backends' refusals -----------------------------------------------------------------------------


def test_mlx_refuses_conversations():
    from jmoshi_cli.backends.mlx import MlxBackend

    with pytest.raises(UsageError, match="--conversations"):
        MlxBackend().refuse(Features(conversations="--conversations"))


@pytest.mark.parametrize("slot_masks", [False, True])
def test_torch_refuses_conversations_on_a_moshi_without_slot_masks(monkeypatch, slot_masks):
    from jmoshi_cli.backends.pytorch import TorchBackend

    faked = dataclasses.replace(_real_runtime(), has_slot_masks=slot_masks)
    monkeypatch.setattr(runtime, "detect", lambda: faked)
    if slot_masks:
        TorchBackend().refuse(Features(conversations="--conversations"))
    else:
        with pytest.raises(PreflightError, match="--conversations needs moshi 0.2.5"):
            TorchBackend().refuse(Features(conversations="--conversations"))
    TorchBackend().refuse(Features(conversations=False))  # one conversation: any runtime


def test_torch_refusal_follows_the_installed_runtime():
    from jmoshi_cli.backends.pytorch import TorchBackend

    if runtime.detect().has_slot_masks:
        TorchBackend().refuse(Features(conversations="--conversations"))
    else:  # moshi 0.2.2 (.venv-022): the refusal is real
        with pytest.raises(PreflightError):
            TorchBackend().refuse(Features(conversations="--conversations"))


# --- auto -----------------------------------------------------------------------------------------------


def test_auto_fills_the_gpus_free_memory_beside_the_models_measured_need(monkeypatch):
    fake_gpus(monkeypatch, GPU(0, "NVIDIA H100 80GB HBM3", int(85e9), int(80e9), (9, 0)),
              GPU(1, "NVIDIA GeForce RTX 4090", int(25e9), int(24e9), (8, 9)))
    # The catalogue's need (18.7 GB in bf16) holds one conversation; each more costs 1.59 GB, in 90 % of the free.
    room = memory.auto("cuda", 18.7, J_MOSHI_BYTES, "--conversations")
    count, note = room.count, room.says("--conversations")
    assert count == memory.fit(80e9, 18.7e9 - J_MOSHI_BYTES, J_MOSHI_BYTES) == 34
    assert "--conversations auto: 34 at once (1.59 GB each" in note and "GPU 0" in note
    assert memory.auto("cuda:1", 18.7, J_MOSHI_BYTES, "--conversations").count == 2
    assert memory.auto("cuda:1", 11.0, J_MOSHI_BYTES, "--conversations").count == 7  # int8's need


def test_auto_refuses_a_gpu_where_none_fits(monkeypatch):
    fake_gpus(monkeypatch, GPU(0, "NVIDIA GeForce RTX 4060", int(8.6e9), int(7.9e9), (8, 9)))
    with pytest.raises(UsageError, match="not even one conversation fits"):
        memory.auto("cuda:0", 18.7, J_MOSHI_BYTES, "--conversations")


def test_auto_is_one_on_the_cpu_with_a_note():
    room = memory.auto("cpu", 18.7, J_MOSHI_BYTES, "--conversations")
    count, note = room.count, room.says("--conversations")
    assert count == 1 and "1 on the CPU" in note


# --- the front ------------------------------------------------------------------------------------------


def test_each_replica_takes_as_many_conversations_as_it_holds(tmp_path):
    placements = [replicas.Placement("r0", "cuda:0", 9001), replicas.Placement("r1", "cuda:1", 9002)]
    backends = replicas.backends_for(placements, 3)
    cfg = haproxy.FrontConfig("127.0.0.1", 8998, tuple(backends), tmp_path / "runtime.sock", tmp_path / "busy.http")
    text = haproxy.render_config(cfg)
    for name, port in (("r0", 9001), ("r1", 9002)):
        server = next(line for line in text.splitlines() if line.strip().startswith(f"server {name} "))
        assert f"127.0.0.1:{port}" in server and server.endswith("maxconn 3")
    assert all(b.slots == 1 for b in replicas.backends_for(placements))


# --- doctor ---------------------------------------------------------------------------------------------


def test_doctor_says_how_many_conversations_each_gpu_holds():
    from jmoshi_cli import doctor
    from test_doctor import CURRENT_PACKAGES, EXT, by_name, facts

    gpus = [GPU(0, "NVIDIA H100 80GB HBM3", int(80e9), int(79e9), (9, 0)),
            GPU(1, "NVIDIA GeForce RTX 4090", int(24e9), int(23e9), (8, 9))]
    sized = Probe(True, J_MOSHI_BYTES)
    checks = by_name(doctor.evaluate(facts(gpus, packages=CURRENT_PACKAGES, conversation_bytes=sized), EXT))
    h100, rtx = checks["conversations:0"], checks["conversations:1"]
    # The catalogue's need (18.7 GB bf16, 11 GB int8) holds one; each more costs 1.59 GB, in 90 % of the card.
    assert memory.fit_measured(int(80e9), EXT.vram_min_gb, J_MOSHI_BYTES) == 34
    assert h100.status == "OK" and "34 in bf16, 39 in int8" in h100.detail and "1.59 GB each" in h100.detail
    assert rtx.status == "OK" and "2 in bf16, 7 in int8" in rtx.detail and not rtx.hint
    # The documented runtime (moshi 0.2.2): the figures, and why --conversations is not there.
    old = by_name(doctor.evaluate(facts(gpus[:1], conversation_bytes=sized), EXT))["conversations:0"]
    assert "34 in bf16" in old.detail and "int8 needs the current runtime" in old.detail
    assert "needs moshi 0.2.5" in old.detail and runtime.INSTALL[runtime.CURRENT] in old.hint
    # Not sized (no moshi, or no GPU): no row; moshi broken: one warning, never a failure.
    assert not any(name.startswith("conversations") for name in by_name(doctor.evaluate(facts(gpus), EXT)))
    broken = by_name(doctor.evaluate(facts(gpus, conversation_bytes=Probe(False, error="ImportError")), EXT))
    assert broken["conversations"].status == "WARN"


@pytest.mark.slow  # a child process importing moshi
def test_doctor_sizes_a_conversation_in_a_child_process():
    from jmoshi_cli import doctor

    assert doctor.conversation_size(doctor.start_conversation_probe()) == Probe(True, J_MOSHI_BYTES)
