"""The installed runtime: capabilities per moshi version, broken combinations, GPU kernels, torch.compile,
the child's flags-or-patches plan, and the install files that select a runtime."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest

from jmoshi_cli import moshi_child, runtime
from jmoshi_cli.backends.contract import ChildContract
from jmoshi_cli.model.precision import Precision
from jmoshi_cli.runtime import CURRENT, DOCUMENTED, INSTALL, UNTESTED, Runtime
from jmoshi_cli.serving import child
from jmoshi_cli.upstream.moshi_server import Patches

ROOT = Path(__file__).resolve().parents[1]
TORCH_26 = "sm_50 sm_60 sm_70 sm_75 sm_80 sm_86 sm_90"  # torch._C._cuda_getArchFlags() of torch 2.6.0+cu124
TORCH_29 = "sm_70 sm_75 sm_80 sm_86 sm_90 sm_100 sm_120"  # and of torch 2.9.1+cu128


def rt(moshi="0.2.13", sphn="0.2.1", torch="2.9.1+cu128", hub="0.36.2", bnb="0.49.2") -> Runtime:
    return Runtime.from_versions({"moshi": moshi, "sphn": sphn, "torch": torch, "huggingface_hub": hub,
                                  "bitsandbytes": bnb})


DOC = dict(moshi="0.2.2", sphn="0.1.12", torch="2.6.0+cu124", hub="0.28.1", bnb="0.45.5")


@pytest.mark.parametrize("version, host, config, lora, api, kind", [
    ("0.2.2", False, False, False, "0.1", DOCUMENTED),
    ("0.2.3", False, False, False, "0.1", UNTESTED),
    ("0.2.4", False, True, True, "0.1", UNTESTED),
    ("0.2.5", True, True, True, "0.1", UNTESTED),
    ("0.2.11", True, True, True, "0.1", UNTESTED),
    ("0.2.12", True, True, True, "0.2", UNTESTED),
    ("0.2.13", True, True, True, "0.2", CURRENT),
])
def test_capabilities_follow_the_moshi_version(version, host, config, lora, api, kind):
    found = rt(moshi=version)
    assert (found.honours_host, found.has_config_path, found.has_lora, found.sphn_api, found.kind) == \
        (host, config, lora, api, kind)


def test_the_two_tested_runtimes_have_no_problem():
    assert rt().problems() == [] and rt(**DOC).problems() == []
    assert rt().label.startswith("current runtime: moshi 0.2.13, sphn 0.2.1, torch 2.9.1")
    assert rt(**DOC).label.startswith("J-Moshi-documented runtime: moshi 0.2.2, sphn 0.1.12")


def test_the_sphn_trap_both_ways_with_the_fix():
    old_moshi_new_sphn = rt(**dict(DOC, sphn="0.2.1")).fatal()
    assert [p.key for p in old_moshi_new_sphn] == ["sphn"]
    assert "first audio frame" in old_moshi_new_sphn[0].detail and "read_pcm" in old_moshi_new_sphn[0].detail
    assert old_moshi_new_sphn[0].fix == "pip install 'sphn>=0.1.4,<0.2'"
    new_moshi_old_sphn = rt(sphn="0.1.12").fatal()
    assert new_moshi_old_sphn[0].fix == "pip install 'sphn>=0.2,<0.3'"
    assert "moshi 0.2.13" in new_moshi_old_sphn[0].detail


def test_untested_and_missing_packages():
    untested = rt(moshi="0.2.8", sphn="0.1.12").problems()
    assert [(p.key, p.fatal) for p in untested] == [("moshi", False)]
    assert untested[0].fix == INSTALL[DOCUMENTED]  # 0.2.8 speaks sphn 0.1: its family is the documented one
    assert rt(moshi=None).fatal()[0].detail == "moshi is not installed"
    assert [p.key for p in rt(sphn=None).fatal()] == ["sphn"]
    assert [p.key for p in rt(torch=None).fatal()] == ["torch"]


def test_version_parsing():
    assert runtime.version_tuple("2.9.1+cu128") == (2, 9, 1)
    assert runtime.version_tuple("0.2.13rc1") == (0, 2, 13)
    assert runtime.version_tuple(None) == ()
    assert runtime.in_range("0.36.2", "0.24", "1.0") and not runtime.in_range("1.0.0", "0.24", "1.0")


# --- GPU kernels -------------------------------------------------------------------------------------


@pytest.mark.parametrize("cc, torch26, torch29", [
    ((6, 1), True, False),  # Tesla P40: torch 2.9 dropped Pascal
    ((7, 5), True, True),  # T4
    ((8, 6), True, True),  # RTX 3090
    ((8, 9), True, True),  # RTX 4090: sm_86 cubins run on 8.9
    ((9, 0), True, True),  # H100
    ((10, 0), False, True),  # B200
    ((12, 0), False, True),  # RTX 5090, RTX PRO 6000
    ((12, 1), False, True),  # sm_120 cubins run on 12.1
])
def test_kernels_per_compute_capability(cc, torch26, torch29):
    assert runtime.has_kernels(cc, runtime.parse_arch_flags(TORCH_26)) is torch26
    assert runtime.has_kernels(cc, runtime.parse_arch_flags(TORCH_29)) is torch29


def test_ptx_and_arch_specific_cubins():
    assert runtime.has_kernels((12, 0), ["sm_80", "compute_90"])  # PTX is compiled for newer GPUs
    assert not runtime.has_kernels((9, 0), ["compute_100"])
    assert runtime.has_kernels((9, 0), ["sm_90a"]) and not runtime.has_kernels((9, 1), ["sm_90a"])
    assert not runtime.has_kernels((8, 0), ["sm_86"])  # a cubin never runs on an older minor


def test_kernel_problem_names_the_fix_for_each_runtime():
    archs26, archs29 = runtime.parse_arch_flags(TORCH_26), runtime.parse_arch_flags(TORCH_29)
    blackwell = runtime.kernel_problem(rt(**DOC), "NVIDIA GeForce RTX 5090", (12, 0), archs26)
    assert "RTX 5090 is sm_120; torch 2.6.0+cu124 has kernels for sm_50" in blackwell.detail
    assert blackwell.fix.endswith(INSTALL[CURRENT])
    pascal = runtime.kernel_problem(rt(), "Tesla P40", (6, 1), archs29)
    assert "sm_61" in pascal.detail and pascal.fix.endswith(INSTALL[DOCUMENTED])
    assert runtime.kernel_problem(rt(), "NVIDIA GeForce RTX 5090", (12, 0), archs29) is None
    assert runtime.kernel_problem(rt(), "any", (12, 0), []) is None  # nothing known: not refused
    assert "torch>=2.2,<2.7" in runtime.cpu_only_fix(rt(**DOC)) and "torch>=2.8,<2.10" in runtime.cpu_only_fix(rt())


# --- torch.compile -----------------------------------------------------------------------------------


def test_compile_is_off_on_the_cpu_and_kept_on_a_gpu():
    assert runtime.compile_env("cpu", {}) == ({"NO_TORCH_COMPILE": "1"}, None)
    assert runtime.compile_env("cuda", {}, compiler="/usr/bin/gcc", headers=True) == ({}, None)
    assert runtime.compile_env("cpu", {"NO_TORCH_COMPILE": ""}) == ({}, None)  # the user's choice stays


def test_a_gpu_without_a_compiler_runs_uncompiled_with_a_note():
    extra, note = runtime.compile_env("cuda:1", {}, compiler=None, headers=False)
    assert extra == {"NO_TORCH_COMPILE": "1"}
    assert "a C compiler (gcc) and Python headers not found" in note and runtime.COMPILER_FIX in note


def test_compiler_lookup_follows_cc_and_path(tmp_path):
    assert runtime.c_compiler({"PATH": str(tmp_path)}) is None
    fake = tmp_path / "gcc"
    fake.write_text("#!/bin/sh\n")
    fake.chmod(0o755)
    assert runtime.c_compiler({"PATH": str(tmp_path)}) == str(fake)
    assert runtime.c_compiler({"PATH": "", "CC": str(fake)}) == str(fake)


# --- the child's bootstrap: flags where the version has them, patches where it lacks them --------------


def test_entry_patches_everything_on_022():
    contract = ChildContract(bind_host="127.0.0.1", config_path="/c.json", precision=Precision.INT8, seed=4)
    plan = moshi_child.plan_for(rt(**DOC), contract, ["--host", "127.0.0.1", "--port", "1"])
    assert plan == moshi_child.Plan(["--host", "127.0.0.1", "--port", "1"], Patches(
        bind_host="127.0.0.1", config_path="/c.json", int8_scales=True, seed=4))


def test_entry_passes_flags_on_0213():
    plan = moshi_child.plan_for(rt(), ChildContract(bind_host="::1", config_path="/c.json"), ["--host", "::1"])
    assert plan == moshi_child.Plan(["--host", "::1", "--config-path", "/c.json"], Patches())
    assert moshi_child.plan_for(rt(), ChildContract(), ["--port", "1"]) == moshi_child.Plan(["--port", "1"],
                                                                                              Patches())
    between = moshi_child.plan_for(rt(moshi="0.2.4", sphn="0.1.12"),
                                    ChildContract(bind_host="0.0.0.0", config_path="/c"), [])
    assert between == moshi_child.Plan(["--config-path", "/c"], Patches(bind_host="0.0.0.0"))


# --- what a dying server says, for the runtime in use ------------------------------------------------------


def test_exit_reasons_give_the_fix_for_the_runtime():
    reverse = child.explain_exit(1, ["AttributeError: 'NoneType' object has no attribute 'shape'"])
    assert "sphn 0.2 API" in reverse.message and reverse.hint == "pip install 'sphn>=0.2,<0.3'"
    kernels = child.explain_exit(1, ["RuntimeError: CUDA error: no kernel image is available for execution"])
    installed = runtime.detect()
    if installed.kind != UNTESTED:
        assert installed.other_install() in kernels.hint
    compiler = child.explain_exit(1, ["InvalidCxxCompiler: No working C++ compiler found in torch._inductor"])
    assert "NO_TORCH_COMPILE=1" in compiler.hint


# --- this environment, and the files that choose a runtime at install time ----------------------------------


def test_this_environment_is_a_tested_runtime_without_problems():
    found = runtime.detect()
    assert found.kind in (CURRENT, DOCUMENTED), found.label
    assert found.fatal() == [], found.problems()
    expected = os.environ.get("JMOSHI_EXPECT_RUNTIME")  # set by .ci/run for each of its environments
    if expected:
        assert found.kind == expected, found.label


def _requirements(lines) -> dict:
    from packaging.requirements import Requirement

    found = {}
    for line in lines:
        line = line.split("#")[0].strip()
        if line:
            requirement = Requirement(line)
            found[requirement.name.replace("-", "_").lower()] = requirement
    return found


def test_pyproject_admits_both_runtimes_and_the_constraints_file_pins_the_documented_one():
    if sys.version_info >= (3, 11):
        import tomllib
    else:
        import tomli as tomllib
    declared = _requirements(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"])
    constraints = _requirements((ROOT / "constraints" / "moshi-0.2.2.txt").read_text().splitlines())
    for versions in ({"moshi": "0.2.13", "sphn": "0.2.1", "torch": "2.9.1", "huggingface_hub": "0.36.2"},
                     {"moshi": "0.2.2", "sphn": "0.1.12", "torch": "2.6.0", "huggingface_hub": "0.28.1"}):
        for name, version in versions.items():
            assert declared[name].specifier.contains(version), (name, version)
    assert not declared["moshi"].specifier.contains("0.2.14")  # newer moshi: tested first
    # The constraints narrow to the documented runtime, sphn 0.1 included (moshi 0.2.2 does not cap it).
    assert str(constraints["moshi"].specifier) == "==0.2.2"
    assert constraints["sphn"].specifier.contains("0.1.12") and not constraints["sphn"].specifier.contains("0.2.0")
    assert not constraints["torch"].specifier.contains("2.7.0")
    assert not constraints["huggingface_hub"].specifier.contains("0.29.0")
    for name, requirement in constraints.items():  # each pin lies inside what pyproject allows
        low = {"moshi": "0.2.2", "sphn": "0.1.12", "torch": "2.6.0", "huggingface_hub": "0.28.1"}[name]
        assert declared[name].specifier.contains(low) and requirement.specifier.contains(low)


def test_runtime_detection_imports_nothing_heavy():
    import subprocess

    script = ("import sys; from jmoshi_cli import runtime; runtime.detect().problems(); "
              "print(','.join(m for m in ('torch', 'moshi', 'sphn', 'huggingface_hub') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == ""


# --- sphn's two streaming APIs behind one adapter -------------------------------------------------------------


def test_opus_round_trip_on_the_installed_sphn():
    import numpy as np

    from jmoshi_cli.selftest import speech_like
    from jmoshi_cli.serving.opus import OpusStream

    pcm = speech_like(1.0)
    sender, receiver = OpusStream(24000), OpusStream(24000)
    sent = b"".join(sender.encode(pcm[i:i + 1920]) for i in range(0, len(pcm), 1920)) + sender.flush()
    assert sent[:4] == b"OggS"
    got = receiver.decode(sent)
    deadline = time.monotonic() + 10
    while got.shape[0] < 12000 and time.monotonic() < deadline:  # sphn 0.1 decodes in a thread
        time.sleep(0.05)
        got = np.concatenate([got, receiver.drain()])
    assert got.dtype == np.float32 and got.ndim == 1 and got.shape[0] > 12000
    assert sender.buffered_api == (runtime.version_tuple(runtime.detect().sphn) < (0, 2))


def test_downloads_stay_on_plain_http_unless_asked():
    """The current runtime's huggingface_hub would use Xet where the hub offers it; jmoshi keeps HTTP."""
    import subprocess

    script = ("from jmoshi_cli.cache import hub\n"
              "try:\n    from huggingface_hub.utils._runtime import is_xet_available\n"
              "except ImportError:\n    print('no-xet-support')\nelse:\n    print(is_xet_available())\n")
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_DISABLE_XET"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, env=env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() in ("False", "no-xet-support")
    asked = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
                           env=dict(env, HF_HUB_DISABLE_XET="0"))
    hub_version = runtime.version_tuple(runtime.installed_versions()["huggingface_hub"])
    from jmoshi_cli.hardware import package_version

    if hub_version >= (0, 32) and package_version("hf_xet") is not None:  # the current runtime: both
        assert asked.stdout.strip() == "True"
