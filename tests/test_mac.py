"""J-Moshi on a Mac, judged here with made-up Mac facts (nobody here has one): doctor, backend choice,
the MLX backend's precision pick and its one-line refusals. The MLX runtime itself runs in test_mlx_*."""

from __future__ import annotations

import pytest

from jmoshi_cli import backends, doctor, hardware
from jmoshi_cli.backends import Features, Kind
from jmoshi_cli.backends.mlx import MlxBackend, need_gb, pick
from jmoshi_cli.errors import PreflightError, UsageError
from jmoshi_cli.hardware import AppleFacts, Probe
from jmoshi_cli.model.precision import Precision
from test_doctor import EXT, by_name, facts


def mac(memory_gb: float, mlx: str | None = "0.26.5", metal: bool | None = True) -> doctor.Facts:
    apple = Probe(True, AppleFacts("Apple M3 Pro", int(memory_gb * 1e9), "14.5", mlx, metal))
    return facts(system="Darwin", nvidia_ok=False, torch=None, apple=apple,
                 os={"system": "Darwin", "machine": "arm64"})


def test_doctor_on_a_mac_shows_the_chip_memory_and_what_fits_and_no_nvidia_rows():
    checks = by_name(doctor.evaluate(mac(36), EXT))
    assert checks["os"].status == "OK" and "Apple M3 Pro" in checks["os"].detail and "14.5" in checks["os"].detail
    assert checks["mlx"].status == "OK" and "Metal" in checks["mlx"].detail
    assert checks["memory"].status == "OK" and "fits bf16" in checks["memory"].detail
    assert not {"gpu", "torch-cuda", "bf16", "vram"} & set(checks)
    sixteen = by_name(doctor.evaluate(mac(16), EXT))
    assert sixteen["memory"].status == "WARN" and "fits int8" in sixteen["memory"].detail
    eight = by_name(doctor.evaluate(mac(8), EXT))
    assert "fits int4" in eight["memory"].detail
    assert by_name(doctor.evaluate(mac(4), EXT))["memory"].status == "FAIL"
    assert by_name(doctor.evaluate(mac(36, mlx=None, metal=None), EXT))["mlx"].status == "FAIL"
    assert by_name(doctor.evaluate(mac(36, metal=False), EXT))["mlx"].status == "FAIL"


def test_auto_picks_the_largest_precision_that_fits_and_says_why():
    assert pick(64, 15.4, Precision.AUTO)[0] is Precision.BF16
    precision, note = pick(16, 15.4, Precision.AUTO)
    assert precision is Precision.INT8 and "int8" in note and "16 GB" in note
    assert pick(8, 15.4, Precision.AUTO)[0] is Precision.INT4
    assert pick(16, 15.4, Precision.INT4) == (Precision.INT4, None)  # asked for: no note
    with pytest.raises(PreflightError, match="bf16 needs about"):
        pick(16, 15.4, Precision.BF16)
    with pytest.raises(PreflightError, match="even in int4"):
        pick(4, 15.4, Precision.AUTO)
    assert need_gb(15.4, Precision.INT8) < need_gb(15.4, Precision.BF16)


def test_auto_backend_is_mlx_on_apple_silicon_and_torch_elsewhere(monkeypatch):
    monkeypatch.setattr(backends, "is_apple_silicon", lambda: True)
    assert backends.choose("auto").kind is Kind.MLX
    monkeypatch.setattr(backends, "is_apple_silicon", lambda: False)
    assert backends.choose(None).kind is Kind.TORCH
    assert backends.choose("mlx").kind is Kind.MLX
    with pytest.raises(UsageError, match="not auto, torch or mlx"):
        backends.choose("metal")


@pytest.mark.parametrize("wanted, needle", [
    (Features(replicas=True), "--replicas"),
    (Features(lora=True), "--lora"),
    (Features(half=True), "--half"),
    (Features(device="cuda"), "--device cuda"),
])
def test_the_mlx_backend_refuses_what_it_cannot_do_in_one_line(wanted, needle):
    with pytest.raises(UsageError) as caught:
        MlxBackend().refuse(wanted)
    assert needle in caught.value.message and caught.value.hint and "\n" not in caught.value.message


def test_the_linux_probe_says_it_is_not_a_mac():
    probe = hardware.apple()
    assert probe.ok is hardware.sys.platform.startswith("darwin") or "not an Apple Silicon Mac" in probe.error


def test_the_mlx_runtime_is_there_where_it_is_expected():
    """.ci/run's MLX environment sets JMOSHI_EXPECT_MLX=1: there the MLX tests must run, not skip."""
    import os

    from jmoshi_cli.backends.mlx import runtime_problem

    if os.environ.get("JMOSHI_EXPECT_MLX") != "1":
        pytest.skip("this environment is not expected to have the MLX runtime (JMOSHI_EXPECT_MLX unset)")
    assert runtime_problem() is None
