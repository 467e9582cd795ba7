"""`jmoshi serve`: the real moshi.server on the CPU with the tiny model, real sockets, no hub, no GPU."""

from __future__ import annotations

import os
import re
import select
import signal
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import TEST_TOKEN, child_env, jmoshi
from jmoshi_cli import hardware, preflight, runtime
from jmoshi_cli.audio_io import SAMPLE_RATE
from jmoshi_cli.backends import Kind, ServerSpec, render
from jmoshi_cli.backends import contract as contract_env
from jmoshi_cli.backends.contract import ChildContract, Recording
from jmoshi_cli.cache.artifacts import ModelFiles
from jmoshi_cli.errors import PreflightError
from jmoshi_cli.hardware import GPU, Probe
from jmoshi_cli.model.precision import Precision
from jmoshi_cli.reporter import Reporter
from jmoshi_cli.selftest import free_port
from jmoshi_cli.serving import serve

from helpers import (
    ANSWER_S,
    Served,
    a_wav,
    answered,
    children_of,
    converse_sync,
    fake_gpus,
    http_get,
    japanese,
    listening,
    user_audio,
    wait_until,
)


@pytest.mark.slow
def test_serve_downloads_then_talks_japanese_on_loopback_only(tiny_env):
    port = free_port()
    served = Served(["--variant", "tiny", "--device", "cpu", "--port", str(port)], tiny_env)
    try:
        url = served.wait_ready()
        assert url == f"http://127.0.0.1:{port}/?token={TEST_TOKEN}"
        # The bound sockets, not the log line: only 127.0.0.1, not 0.0.0.0 or [::].
        assert listening(port) == {"127.0.0.1"}
        # As a browser opens the printed URL: the token becomes a cookie, and the clean URL the page.
        page = subprocess.run(["curl", "-sL", "-b", "", url], capture_output=True, text=True).stdout if \
            os.path.exists("/usr/bin/curl") else http_get(url)
        assert "J-Moshi test UI" in page
        said = user_audio(3.0)
        result = converse_sync(f"ws://127.0.0.1:{port}/api/chat", said, until=answered(said))
        hang_up_mid_conversation(f"ws://127.0.0.1:{port}/api/chat")
        served.wait_for("the browser hung up", count=2)
    finally:
        code, err = served.stop()
    assert result.handshake_s < 5
    assert result.audio_samples > SAMPLE_RATE // 2, result
    assert abs(float(result.audio.std())) > 0
    assert len(result.text_pieces) >= 3
    joined = "".join(result.text_pieces)
    assert japanese(joined), joined
    assert code == 143
    assert "ready" in err and "One conversation at a time" in err
    # The child's output reaches the user as steps, conversations and frame summaries; browsers that
    # leave while the server still sends are one line each, never aiohttp's traceback.
    assert "moshi.server: loading moshi" in err and err.count("a browser connected") == 2
    assert "the browser hung up" in err and "conversation over: " in err and "per 80 ms frame" in err
    assert "Traceback" not in err and "closing transport" not in err, err
    assert "frame handled in" not in err and "bitsandbytes" not in err and "Running on" not in err


# A browser in its own process: it says when J-Moshi's voice first reaches it, then goes on talking.
HANGING_UP_CLIENT = """
import sys
sys.path.insert(0, sys.argv[2])
from helpers import converse_sync
from jmoshi_cli.selftest import speech_like
converse_sync(sys.argv[1], speech_like(30.0), on_audio=lambda: print("answered", flush=True))
"""


def hang_up_mid_conversation(url: str) -> None:
    """A browser that goes away: a client process killed while the server is sending it J-Moshi's voice."""
    client = subprocess.Popen([sys.executable, "-c", HANGING_UP_CLIENT, url, str(Path(__file__).parent)],
                              stdout=subprocess.PIPE, text=True)
    try:
        ready, _, _ = select.select([client.stdout], [], [], ANSWER_S)
        assert ready and client.stdout.readline() == "answered\n", "the client never heard an answer"
    finally:
        client.kill()
        client.wait()
        client.stdout.close()




def wait_gone(pids: list[int]) -> None:
    """Until none of these processes exists any more (exited and reaped)."""
    wait_until(lambda: not [p for p in pids if Path(f"/proc/{p}").exists()], 30, f"processes {pids} to exit")


@pytest.mark.usefixtures("tiny_downloaded")
@pytest.mark.slow
def test_sigterm_leaves_no_process_behind_and_offline_restart_works(tiny_env):
    port = free_port()
    served = Served(["--variant", "tiny", "--device", "cpu", "--port", str(port)], tiny_env)
    served.wait_ready()
    kids = children_of(served.process.pid)
    assert kids, "moshi.server child not found"
    code, _ = served.stop(signal.SIGTERM)
    assert code == 143
    wait_gone(kids)
    assert listening(port) == set()
    # Everything is cached now: it starts with the hub gone, with --offline or without.
    env = dict(tiny_env, HF_ENDPOINT="http://127.0.0.1:9")
    for extra in (["--offline"], []):
        again = Served(["--variant", "tiny", "--device", "cpu", "--port", str(port), *extra], env, verbose=not extra)
        again.wait_ready()
        kids = children_of(again.process.pid)
        code, err = again.stop(signal.SIGINT)
        assert code == 130
        wait_gone(kids)
    assert "the hub cannot be reached; using the cached jmoshi-test/tiny@main" in err
    # --verbose: the child's output exactly as it wrote it, colour codes and all.
    assert "\x1b[1;34m[Info]\x1b[0m warming up the model\n" in err and "======== Running on" in err


@pytest.mark.usefixtures("tiny_downloaded")
@pytest.mark.slow
def test_https_serves_tls_with_a_certificate_that_names_the_host(tiny_env):
    port = free_port()
    served = Served(["--variant", "tiny", "--device", "cpu", "--port", str(port), "--https"], tiny_env)
    try:
        url = served.wait_ready()
        assert url.startswith("https://127.0.0.1:")
        context = ssl.create_default_context(cafile=str(Path(tiny_env["JMOSHI_HOME"]) / "tls" / "cert.pem"))
        with socket.create_connection(("127.0.0.1", port)) as raw, \
                context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            names = {value for _, value in tls.getpeercert()["subjectAltName"]}
    finally:
        served.stop()
    assert {"127.0.0.1", "localhost", socket.gethostname()} <= names


def test_port_in_use_fails_fast_before_any_load(tiny_env):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        started = time.monotonic()
        result = jmoshi("serve", "--variant", "tiny", "--device", "cpu", "--port", str(port),
                        env=child_env(tiny_env))
        elapsed = time.monotonic() - started
    assert result.returncode == 5
    assert f"port {port} on 127.0.0.1 is already in use" in result.stderr and "Traceback" not in result.stderr
    assert elapsed < 30  # a guard against loading anything, not a speed target
    assert not Path(tiny_env["HF_HUB_CACHE"]).exists()


def test_offline_with_a_missing_file_names_it(tiny_env):
    assert jmoshi("download", "--variant", "tiny", env=child_env(tiny_env)).returncode == 0
    cache = Path(tiny_env["HF_HUB_CACHE"])
    next(cache.glob("models--jmoshi-test--tiny/snapshots/*/tokenizer_spm_32k_3.model")).unlink()
    result = jmoshi("serve", "--variant", "tiny", "--device", "cpu", "--offline", "--port", str(free_port()),
                    env=child_env(tiny_env))
    assert result.returncode == 4
    assert "tokenizer_spm_32k_3.model" in result.stderr and "offline" in result.stderr
    assert "Traceback" not in result.stderr


def test_no_gpu_is_refused_before_any_download(tiny_env, monkeypatch):
    fake_gpus(monkeypatch)  # the driver answers and lists no GPU, whatever this machine has
    for key in ("JMOSHI_VARIANTS", "JMOSHI_HOME"):
        monkeypatch.setenv(key, tiny_env[key])
    hooks = NoDownload("no download before the GPU check")
    with pytest.raises(PreflightError, match="no usable NVIDIA GPU: the NVIDIA driver sees no GPU") as caught:
        serve.prepare(serve.ServeOptions(variant="tiny", port=free_port()), hooks)
    assert "--device cpu" in caught.value.hint


def test_no_nvidia_driver_is_refused_with_why(monkeypatch):
    missing = "no NVIDIA driver found (libnvidia-ml.so is not installed)"
    monkeypatch.setattr(hardware, "nvidia", lambda timeout_s=5.0: Probe(False, error=missing))
    with pytest.raises(PreflightError, match=f"no usable NVIDIA GPU: {re.escape(missing)}"):
        preflight.check_device("cuda", 18.7, "ext")


@pytest.mark.usefixtures("tiny_downloaded")
@pytest.mark.slow
def test_child_failure_exits_with_its_code_and_the_reason(tiny_env, tmp_path):
    bogus = tmp_path / "finetuned.safetensors"
    bogus.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    result = jmoshi("serve", "--variant", "tiny", "--device", "cpu", "--port", str(free_port()),
                    "--moshi-weight", str(bogus), env=child_env(tiny_env), timeout=240)
    assert result.returncode == 1
    assert "moshi.server exited with code 1" in result.stderr
    assert "Traceback" in result.stderr  # the child's own output is relayed, nothing lost


def test_bad_flags_are_one_line_errors(tiny_env, tmp_path):
    env = child_env(tiny_env)
    cases = [
        (["--port", "70000"], 2, "out of range"),
        (["--host", "no-such-host.invalid"], 2, "cannot resolve host"),
        (["--moshi-weight", str(tmp_path / "nope.safetensors")], 2, "no such file"),
        (["--ssl", str(tmp_path)], 2, "no cert.pem"),
        (["--https", "--ssl", str(tmp_path)], 2, "both given"),
        (["--device", "tpu"], 2, "is not cuda"),
    ]
    for args, code, needle in cases:
        result = jmoshi("serve", "--variant", "tiny", *args, env=env)
        assert result.returncode == code, (args, result.stderr)
        assert needle in result.stderr and "Traceback" not in result.stderr, (args, result.stderr)


# --- the pure parts: exact child command line, GPU rules (the GPU is the one mocked piece) -----------


class NoDownload(Reporter):
    def __init__(self, why: str):
        self.watch_download = lambda plan: pytest.fail(why)


def _spec(files: ModelFiles, **kw) -> ServerSpec:
    fields = {"backend": Kind.TORCH, "files": files, "repo": "r/x", "precision": Precision.BF16, "host": "127.0.0.1",
              "port": 8998, "device": "cuda", "base_env": {}}
    return ServerSpec(**{**fields, **kw})


def test_launch_argv_and_env_are_exact(tmp_path, monkeypatch):
    monkeypatch.setattr(runtime, "c_compiler", lambda env=None: "/usr/bin/gcc")  # GPU compile needs, made exact
    monkeypatch.setattr(runtime, "python_headers", lambda: True)
    files = ModelFiles(tmp_path / "m.safetensors", tmp_path / "mimi.safetensors", tmp_path / "tok.model",
                       tmp_path / "config.json", tmp_path / "dist")
    contract = ChildContract(bind_host="0.0.0.0", config_path=str(files.config))
    stale = {"PATH": "/bin", contract_env.ENV: "{}"}  # a contract left in jmoshi's own environment is not passed on
    launch = render(_spec(files, repo="nu-dialogue/j-moshi-ext", host="0.0.0.0", port=9000, half=True,
                          ssl_dir=tmp_path / "tls", contract=contract, base_env=stale))
    assert launch.argv == [
        sys.executable, "-m", "jmoshi_cli.moshi_child", "--host", "0.0.0.0", "--port", "9000",
        "--hf-repo", "nu-dialogue/j-moshi-ext", "--moshi-weight", str(files.moshi_weight),
        "--mimi-weight", str(files.mimi_weight), "--tokenizer", str(files.tokenizer),
        "--static", str(tmp_path / "dist"), "--device", "cuda", "--half", "--ssl", str(tmp_path / "tls")]
    assert launch.env == {"PATH": "/bin", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    assert launch.contract == contract
    assert launch.url == "https://127.0.0.1:9000/"
    assert "--half" not in render(_spec(files)).argv
    # The CPU runs moshi uncompiled (runtime.compile_env); a GPU without triton's C compiler too.
    assert render(_spec(files, device="cpu")).env["NO_TORCH_COMPILE"] == "1"
    monkeypatch.setattr(runtime, "c_compiler", lambda env=None: None)
    assert render(_spec(files)).env["NO_TORCH_COMPILE"] == "1"
    kept = render(_spec(files, device="cpu", base_env={"NO_TORCH_COMPILE": ""}))
    assert kept.env["NO_TORCH_COMPILE"] == ""


def test_a_replica_is_the_same_server_on_loopback_without_tls(tmp_path):
    files = ModelFiles(tmp_path / "m", tmp_path / "mimi", tmp_path / "tok", None, tmp_path / "dist")
    spec = _spec(files, host="0.0.0.0", ssl_dir=tmp_path / "tls", contract=ChildContract(bind_host="0.0.0.0", seed=3))
    replica = render(spec.on_loopback(4321, "cpu", threads=1, replica="r1"))
    assert (replica.host, replica.port, replica.scheme) == ("127.0.0.1", 4321, "http")
    assert "--ssl" not in replica.argv and replica.argv[replica.argv.index("--device") + 1] == "cpu"
    assert replica.contract == ChildContract(bind_host="127.0.0.1", seed=3, threads=1, replica="r1")


def test_the_child_contract_round_trips_through_one_variable():
    contract = ChildContract(parent_pid=7, bind_host="::1", config_path="/c.json", precision=Precision.INT8, threads=2,
                             record=Recording("/rec", {"variant": "ext", "commit": "c" * 40}), seed=5,
                             sampling={"temp": 0.5}, replica="r0")
    env = contract.to_env()
    assert list(env) == [contract_env.ENV]
    assert ChildContract.from_env(env) == contract
    assert ChildContract.from_env({}) == ChildContract()  # run by hand


@pytest.fixture(scope="module")
def installed_arch_flags() -> str:
    """The architectures the installed torch has kernels for (asked once, no GPU needed)."""
    probe = hardware.torch_cuda()
    assert probe.ok and probe.value["arch_flags"], probe
    return probe.value["arch_flags"]


def test_a_gpu_this_torch_has_no_kernels_for_is_refused_before_any_download(tiny_env, monkeypatch,
                                                                            installed_arch_flags):
    """serve and infer stop in preflight, with the fix for the installed runtime (see runtime.py)."""
    from jmoshi_cli import infer

    installed = runtime.detect()
    archs = runtime.parse_arch_flags(installed_arch_flags)
    # A GPU the installed torch cannot run: Blackwell for torch 2.6, Pascal for torch 2.9.
    blackwell = ("NVIDIA GeForce RTX 5090", (12, 0))
    name, cc = blackwell if not runtime.has_kernels(blackwell[1], archs) else ("Tesla P40", (6, 1))
    assert not runtime.has_kernels(cc, archs)
    fake_gpus(monkeypatch, GPU(0, name, int(34e9), int(33e9), cc), arch_flags=installed_arch_flags)
    for key in ("JMOSHI_VARIANTS", "JMOSHI_HOME", "HF_HUB_CACHE", "HF_ENDPOINT"):
        monkeypatch.setenv(key, tiny_env[key])
    hooks = NoDownload("no download before the kernel check")
    with pytest.raises(PreflightError) as caught:
        serve.prepare(serve.ServeOptions(variant="tiny", port=free_port()), hooks)
    sm = f"sm_{cc[0]}{cc[1]}"
    assert f"{name} is {sm}" in caught.value.message and installed_arch_flags in caught.value.message
    assert caught.value.hint.endswith(installed.other_install())
    assert caught.value.exit_code == 5
    with pytest.raises(PreflightError, match=sm):
        infer.run(infer.InferRequest(inputs=[a_wav(Path(tiny_env["JMOSHI_HOME"]))],
                                     out_dir=Path(tiny_env["JMOSHI_HOME"]) / "out", variant="tiny"),
                  hooks)
    assert not Path(tiny_env["HF_HUB_CACHE"]).exists()


def test_a_broken_sphn_is_refused_before_any_download(monkeypatch):
    broken = runtime.Runtime.from_versions({**runtime.installed_versions(), "sphn": "0.2.1", "moshi": "0.2.2"})
    monkeypatch.setattr(runtime, "detect", lambda: broken)
    with pytest.raises(PreflightError, match="first audio frame") as caught:
        preflight.check_device("cpu", 0, "tiny")
    assert caught.value.hint == "pip install 'sphn>=0.1.4,<0.2'"


def test_gpu_preflight_refuses_too_little_free_vram(monkeypatch):
    fake_gpus(monkeypatch, GPU(0, "NVIDIA GeForce RTX 4090", int(25.4e9), int(12e9), (8, 9)))
    with pytest.raises(PreflightError, match="12.0 GB free; ext needs about 18.7 GB"):
        preflight.check_device("cuda", 18.7, "ext")


def test_gpu_preflight_turns_on_half_for_pre_ampere(monkeypatch):
    fake_gpus(monkeypatch, GPU(0, "Quadro RTX 8000", int(48e9), int(47e9), (7, 5)))
    check = preflight.check_device("cuda", 18.7, "ext")
    assert check.half and len(check.notes) == 1


def test_gpu_preflight_accepts_a_4090(monkeypatch):
    fake_gpus(monkeypatch, GPU(0, "NVIDIA GeForce RTX 4090", int(25.4e9), int(24.9e9), (8, 9)))
    assert preflight.check_device("cuda:0", 18.7, "ext") == preflight.DeviceCheck()


# --- on a real GPU, when this machine has one ----------------------------------------------------------


@pytest.mark.slow
def test_serves_the_tiny_model_on_cuda(tiny_env):
    probe = hardware.torch_cuda()
    if not (probe.ok and probe.value["available"]):
        pytest.skip(f"torch sees no CUDA device here ({probe.error or 'torch.cuda.is_available() is False'})")
    port = free_port()
    served = Served(["--variant", "tiny", "--device", "cuda", "--port", str(port)], tiny_env)
    try:
        served.wait_ready()
        said = user_audio(3.0)
        result = converse_sync(f"ws://127.0.0.1:{port}/api/chat", said, until=answered(said))
    finally:
        code, err = served.stop()
    assert code == 143, err
    assert result.audio_samples > SAMPLE_RATE // 2 and result.text_pieces, err
    assert "conversation over: " in err and "Traceback" not in err, err
