"""doctor: real probes on this machine (no GPU), and the judging rules on made-up facts for GPUs."""

from __future__ import annotations

import json
import time

import pytest

from conftest import run_cli
from jmoshi_cli import cli, doctor, hardware, runtime
from jmoshi_cli.cache.artifacts import Status
from jmoshi_cli.hardware import GPU, NvidiaFacts, Probe
from jmoshi_cli.runtime import INSTALL
from jmoshi_cli.variants import load_catalogue

EXT = load_catalogue().get("ext")
GOOD_TORCH = Probe(True, {"version": "2.6.0+cu124", "cuda": "12.4", "available": True, "bf16": True,
                          "arch_list": ["sm_50", "sm_60", "sm_70", "sm_75", "sm_80", "sm_86", "sm_90"],
                          "arch_flags": "sm_50 sm_60 sm_70 sm_75 sm_80 sm_86 sm_90"})
CURRENT_TORCH = Probe(True, {"version": "2.9.1+cu128", "cuda": "12.8", "available": True, "bf16": True,
                             "arch_list": [], "arch_flags": "sm_70 sm_75 sm_80 sm_86 sm_90 sm_100 sm_120"})
CURRENT = {"moshi": "0.2.13", "sphn": "0.2.1", "torch": "2.9.1+cu128", "huggingface_hub": "0.36.2",
           "bitsandbytes": "0.49.2"}


def facts(gpus=(), torch=GOOD_TORCH, packages=None, system="Linux", nvidia_ok=True, **kw) -> doctor.Facts:
    base = dict(
        os={"system": system, "machine": "x86_64"}, python=(3, 11, 7),
        packages=packages or {"moshi": "0.2.2", "sphn": "0.1.12", "torch": "2.6.0", "huggingface_hub": "0.28.1"},
        nvidia=Probe(True, NvidiaFacts("550.54", "12.4", list(gpus))) if nvidia_ok else Probe(False, error="no driver"),
        torch=torch, disk=Probe(True, 100 * 10**9),
        cache=Probe(True, [doctor.CacheRow("model.safetensors", Status.MISSING, False)]),
        missing_bytes=16 * 10**9, hub=Probe(True, 200), endpoint="https://huggingface.co", port=Probe(True, True),
        host="127.0.0.1", port_number=8998, extra={"cache_dir": "/c"})
    base.update(kw)
    return doctor.Facts(**base)


def by_name(checks) -> dict[str, doctor.Check]:
    return {c.name: c for c in checks}


def gpu(name, total_gb, free_gb, cc) -> GPU:
    return GPU(0, name, int(total_gb * 1e9), int(free_gb * 1e9), cc)


def test_rtx_4090_is_all_green():
    checks = by_name(doctor.evaluate(facts([gpu("NVIDIA GeForce RTX 4090", 25.4, 24.9, (8, 9))]), EXT))
    assert {checks[n].status for n in ("gpu", "torch-cuda", "bf16", "vram")} == {"OK"}
    assert "RTX 4090" in checks["gpu"].detail and "cc 8.9" in checks["gpu"].detail


def test_new_gpu_with_old_torch_is_explained():
    checks = by_name(doctor.evaluate(facts([gpu("NVIDIA GeForce RTX 5090", 34, 33, (12, 0))]), EXT))
    assert checks["torch-cuda"].status == "FAIL"
    assert "sm_120" in checks["torch-cuda"].detail and checks["torch-cuda"].hint.endswith(INSTALL[runtime.CURRENT])


def test_blackwell_on_the_current_runtime_is_green():
    checks = by_name(doctor.evaluate(facts([gpu("NVIDIA GeForce RTX 5090", 34, 33, (12, 0))], torch=CURRENT_TORCH,
                                           packages=CURRENT), EXT))
    assert {checks[n].status for n in ("runtime", "moshi", "sphn", "torch", "torch-cuda", "bf16", "vram")} == {"OK"}
    detail = checks["runtime"].detail
    assert detail.startswith("current runtime: moshi 0.2.13") and "Blackwell" in detail


def test_pascal_on_the_current_runtime_points_to_the_documented_one():
    checks = by_name(doctor.evaluate(facts([gpu("Tesla P40", 24, 24, (6, 1))], torch=CURRENT_TORCH,
                                           packages=CURRENT), EXT))
    assert checks["torch-cuda"].status == "FAIL" and "sm_61" in checks["torch-cuda"].detail
    assert checks["torch-cuda"].hint.endswith(INSTALL[runtime.DOCUMENTED])


def test_sphn_01_with_moshi_0213_fails_with_the_other_fix():
    check = by_name(doctor.evaluate(facts(packages=dict(CURRENT, sphn="0.1.12"), torch=CURRENT_TORCH), EXT))["sphn"]
    assert check.status == "FAIL" and "first audio frame" in check.detail
    assert check.hint == "pip install 'sphn>=0.2,<0.3'"


def test_untested_moshi_warns_and_packages_are_judged_by_their_runtime():
    checks = by_name(doctor.evaluate(facts(packages=dict(CURRENT, moshi="0.2.12")), EXT))
    assert checks["runtime"].status == "WARN" and checks["runtime"].hint.endswith(INSTALL[runtime.CURRENT])
    old_torch = by_name(doctor.evaluate(facts(packages=dict(CURRENT, torch="2.7.1")), EXT))["torch"]
    assert old_torch.status == "WARN" and "torch>=2.8,<2.10" in old_torch.hint


def test_cpu_only_torch_gets_the_reinstall_for_its_runtime():
    cpu_only = Probe(True, {"version": "2.9.1+cpu", "cuda": None, "available": False, "arch_flags": ""})
    check = by_name(doctor.evaluate(facts([gpu("NVIDIA GeForce RTX 4090", 25.4, 24.9, (8, 9))], torch=cpu_only,
                                          packages=CURRENT), EXT))["torch-cuda"]
    assert check.status == "FAIL" and "torch>=2.8,<2.10" in check.hint


def test_missing_compiler_on_a_gpu_machine_warns_with_the_fix():
    lacking = doctor.CompileFacts(c_compiler=None, python_headers=False)
    check = by_name(doctor.evaluate(facts([gpu("NVIDIA GeForce RTX 4090", 25.4, 24.9, (8, 9))], compile=lacking),
                                    EXT))["compiler"]
    assert check.status == "WARN" and "no C compiler" in check.detail and "Python.h" in check.detail
    assert check.hint == runtime.COMPILER_FIX and "NO_TORCH_COMPILE=1" in check.detail
    off = doctor.CompileFacts(c_compiler=None, disabled=True)
    assert by_name(doctor.evaluate(facts([gpu("A", 25, 24, (8, 9))], compile=off), EXT))["compiler"].status == "OK"


def test_pre_ampere_small_gpu_gets_half_and_vram_advice():
    checks = by_name(doctor.evaluate(facts([gpu("Tesla T4", 16, 15, (7, 5))]), EXT))
    assert checks["bf16"].status == "WARN" and "--half" in checks["bf16"].hint
    assert checks["vram"].status == "FAIL" and "18.7" in checks["vram"].detail


def test_busy_gpu_warns_about_free_vram():
    checks = by_name(doctor.evaluate(facts([gpu("NVIDIA A100-SXM4-40GB", 42, 10, (8, 0))]), EXT))
    assert checks["vram"].status == "WARN" and "nvidia-smi" in checks["vram"].hint


def test_sphn_02_with_moshi_022_fails():
    packages = {"moshi": "0.2.2", "sphn": "0.2.1", "torch": "2.6.0", "huggingface_hub": "0.28.1"}
    check = by_name(doctor.evaluate(facts(packages=packages), EXT))["sphn"]
    assert check.status == "FAIL" and "first audio frame" in check.detail and "sphn>=0.1.4,<0.2" in check.hint


def test_macos_fails_with_why():
    check = by_name(doctor.evaluate(facts(system="Darwin", nvidia_ok=False), EXT))["os"]
    assert check.status == "FAIL" and "CUDA" in check.detail


def test_not_enough_disk_fails():
    check = by_name(doctor.evaluate(facts(disk=Probe(True, 5 * 10**9)), EXT))["disk"]
    assert check.status == "FAIL" and "HF_HUB_CACHE" in check.hint


def test_offline_mode_is_a_state_not_an_error():
    assert by_name(doctor.evaluate(facts(hub=None), EXT))["hub"].status == "OK"


def test_bounded_probe_gives_up_instead_of_hanging():
    started = time.monotonic()
    probe = hardware.bounded(lambda: time.sleep(30), timeout_s=0.2)
    assert not probe.ok and "no answer within" in probe.error
    assert time.monotonic() - started < 5


def test_port_in_use_is_reported():
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        probe = hardware.port_free("127.0.0.1", sock.getsockname()[1])
    assert probe.ok and probe.value is False


NO_DRIVER = Probe(False, error="no NVIDIA driver found (libnvidia-ml.so is not installed)")


@pytest.fixture
def no_gpu(monkeypatch, env):
    """This process as a machine without an NVIDIA driver, whatever the real machine has."""
    monkeypatch.setattr(hardware, "nvidia", lambda: NO_DRIVER)
    for key, value in env.items():
        monkeypatch.setenv(key, value)


def test_doctor_without_gpu_says_so_and_exits_1(no_gpu, hub, capsys):
    code = cli.run(["doctor", "--json"])
    out, err = capsys.readouterr()
    assert code == 1
    report = json.loads(out)
    checks = {c["name"]: c for c in report["checks"]}
    assert checks["gpu"]["status"] == "FAIL" and "NVIDIA" in checks["gpu"]["detail"]
    assert checks["hub"]["status"] == "OK" and hub.endpoint in checks["hub"]["detail"]
    assert checks["cache"]["status"] == "WARN"
    assert "Traceback" not in err


def test_doctor_sees_a_complete_cache(env, hub):
    assert run_cli("download", env=env).returncode == 0
    result = run_cli("doctor", "--json", env=env)
    checks = {c["name"]: c for c in json.loads(result.stdout)["checks"]}
    assert checks["cache"]["status"] == "OK" and "verified" in checks["cache"]["detail"]
    assert "0.0 GB still to download" in checks["disk"]["detail"]


def test_doctor_text_output_has_hints_and_mentions_selftest(no_gpu, monkeypatch, capsys):
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    assert cli.run(["doctor"]) == 1
    err = capsys.readouterr().err
    assert "FAIL gpu" in err and "hint:" in err and "jmoshi selftest" in err


@pytest.mark.parametrize("args", [["--help"], ["doctor", "--help"], ["download", "--help"], ["serve", "--help"],
                                  ["infer", "--help"], ["selftest", "--help"], ["verify", "--help"],
                                  ["analyze", "--help"], ["recordings", "--help"], ["front", "--help"]])
def test_help_imports_no_heavy_module(args):
    import subprocess
    import sys

    script = ("import sys, atexit\n"
              "atexit.register(lambda: print('HEAVY=' + ','.join(m for m in ('torch', 'moshi', 'huggingface_hub',"
              " 'numpy', 'mlx', 'moshi_mlx', 'matplotlib') if m in sys.modules)))\n"
              f"sys.argv = ['jmoshi'] + {args!r}\n"
              "from jmoshi_cli.cli import main\nmain()\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "Usage" in done.stdout
    assert done.stdout.strip().splitlines()[-1] == "HEAVY="


def test_haproxy_missing_is_a_warning_with_the_install_command():
    check = by_name(doctor.evaluate(facts(haproxy=Probe(False, error="HAProxy is not installed")), EXT))["haproxy"]
    assert check.status == "WARN" and "apt-get install haproxy" in check.hint


def test_haproxy_on_this_machine_is_found_with_its_version():
    probe = doctor.haproxy_probe()
    if not probe.ok:
        pytest.skip(f"no HAProxy here: {probe.error}")
    check = by_name(doctor.evaluate(facts(haproxy=probe), EXT))["haproxy"]
    assert check.status == "OK" and check.detail.startswith("HAProxy 2.")


CURRENT_PACKAGES = {"moshi": "0.2.13", "sphn": "0.2.1", "torch": "2.9.1", "huggingface_hub": "0.36.2",
                    "bitsandbytes": "0.49.2"}


def test_each_gpu_says_whether_it_fits_bf16_int8_only_or_nothing():
    gpus = [GPU(0, "NVIDIA GeForce RTX 4090", int(25.4e9), int(24.9e9), (8, 9)),
            GPU(1, "NVIDIA GeForce RTX 5080", int(17.1e9), int(15.6e9), (12, 0)),
            GPU(2, "NVIDIA GeForce RTX 4060", int(8.6e9), int(7.9e9), (8, 9))]
    checks = by_name(doctor.evaluate(facts(gpus, packages=CURRENT_PACKAGES), EXT))
    assert checks["fit:0"].status == "OK" and "fits bf16" in checks["fit:0"].detail
    assert checks["fit:1"].status == "WARN" and "fits int8 only" in checks["fit:1"].detail
    assert "picks int8" in checks["fit:1"].hint
    assert checks["fit:2"].status == "FAIL" and "does not fit" in checks["fit:2"].detail
    # A 16 GB card on the documented runtime: int8 is one install away.
    old = by_name(doctor.evaluate(facts(gpus[1:2]), EXT))
    assert old["fit:1"].status == "WARN" and "needs the current runtime" in old["fit:1"].detail
    assert old["vram"].status == "FAIL"
    assert by_name(doctor.evaluate(facts(gpus[1:2], packages=CURRENT_PACKAGES), EXT))["vram"].status == "WARN"
