"""`jmoshi serve`: the real moshi.server on the CPU with the tiny model, real sockets, no hub, no GPU."""

from __future__ import annotations

import os
import signal
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import SHARED_AUDIO, child_env, jmoshi
from jmoshi_cli import hardware, serve
from jmoshi_cli.artifacts import ModelFiles
from jmoshi_cli.errors import PreflightError
from jmoshi_cli.hardware import GPU, NvidiaFacts, Probe
from jmoshi_cli.selftest import free_port, speech_like


class Served:
    """`jmoshi serve` in a child process, with its stdout/stderr collected."""

    def __init__(self, args: list[str], env: dict):
        self.process = subprocess.Popen([sys.executable, "-m", "jmoshi_cli", "serve", *args], env=child_env(env),
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.url = ""

    def wait_ready(self, timeout: float = 240) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            line = self.process.stdout.readline()
            if line.strip():
                self.url = line.strip()
                return self.url
            if self.process.poll() is not None:
                break
        self.stop()
        raise AssertionError(f"serve never became ready:\n{self.process.stderr.read()[-4000:]}")

    def stop(self, sig=signal.SIGTERM) -> tuple[int, str]:
        if self.process.poll() is None:
            self.process.send_signal(sig)
        try:
            _, err = self.process.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            _, err = self.process.communicate()
        return self.process.returncode, err


def children_of(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                found.append(int(entry.name))
    return found


def listening(port: int) -> set[str]:
    """Local addresses with a LISTEN socket on port, read from the kernel's tables."""
    found = set()
    for table, width in (("/proc/net/tcp", 8), ("/proc/net/tcp6", 32)):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, hex_port = local.split(":")
            if state == "0A" and int(hex_port, 16) == port:
                found.add(address if width == 32 else socket.inet_ntoa(bytes.fromhex(address)[::-1]))
    return found


def user_audio(seconds: float = 3.0):
    import numpy as np
    import sphn

    path = SHARED_AUDIO / "daily-5-0276.wav"
    if not path.is_file():
        return speech_like(seconds)
    pcm, _ = sphn.read(str(path), sample_rate=24000)
    return np.ascontiguousarray(pcm[0, : int(seconds * 24000)], dtype=np.float32)


@pytest.mark.slow
def test_serve_downloads_then_talks_japanese_on_loopback_only(tiny_env):
    from jmoshi_cli.chat import chat_sync

    port = free_port()
    served = Served(["--variant", "tiny", "--device", "cpu", "--port", str(port)], tiny_env)
    try:
        url = served.wait_ready()
        assert url == f"http://127.0.0.1:{port}/"
        # The bound sockets, not the log line: only 127.0.0.1, not 0.0.0.0 or [::].
        assert listening(port) == {"127.0.0.1"}
        page = subprocess.run(["curl", "-s", url], capture_output=True, text=True).stdout if \
            os.path.exists("/usr/bin/curl") else _http_get(url)
        assert "J-Moshi test UI" in page
        result = chat_sync(f"ws://127.0.0.1:{port}/api/chat", user_audio(3.0), tail_s=3.0)
    finally:
        code, err = served.stop()
    assert result.handshake_s < 5
    assert result.audio_samples > 24000 // 2, result
    assert abs(float(result.audio.std())) > 0
    assert len(result.text_pieces) >= 3
    joined = "".join(result.text_pieces)
    assert any("\u3040" <= ch <= "\u30ff" or "\u4e00" <= ch <= "\u9fff" for ch in joined), joined
    assert code == 143
    assert "ready" in err and "One conversation at a time" in err
    assert "frame handled in" in err  # the child's own output reaches the user


def _http_get(url: str) -> str:
    import urllib.request

    with urllib.request.urlopen(url, timeout=10) as response:
        return response.read().decode()


@pytest.mark.slow
def test_sigterm_leaves_no_process_behind_and_offline_restart_works(tiny_env):
    port = free_port()
    served = Served(["--variant", "tiny", "--device", "cpu", "--port", str(port)], tiny_env)
    served.wait_ready()
    kids = children_of(served.process.pid)
    assert kids, "moshi.server child not found"
    code, _ = served.stop(signal.SIGTERM)
    assert code == 143
    time.sleep(0.5)
    assert not [k for k in kids if Path(f"/proc/{k}").exists()]
    assert listening(port) == set()
    # Everything is cached now: it starts with the hub gone, with --offline or without.
    env = dict(tiny_env, HF_ENDPOINT="http://127.0.0.1:9")
    for extra in (["--offline"], []):
        again = Served(["--variant", "tiny", "--device", "cpu", "--port", str(port), *extra], env)
        again.wait_ready()
        code, err = again.stop(signal.SIGINT)
        assert code == 130
    assert "the hub cannot be reached; using the cached jmoshi-test/tiny@main" in err


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


def test_no_gpu_on_this_machine_is_refused_fast(tiny_env):
    result = jmoshi("serve", "--variant", "tiny", "--port", str(free_port()), env=child_env(tiny_env))
    assert result.returncode == 5
    assert "no usable NVIDIA GPU" in result.stderr and "--device cpu" in result.stderr


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


def test_launch_argv_and_env_are_exact(tmp_path):
    files = ModelFiles(tmp_path / "m.safetensors", tmp_path / "mimi.safetensors", tmp_path / "tok.model",
                       tmp_path / "config.json")
    options = serve.ServeOptions(host="0.0.0.0", port=9000, device="cuda")
    launch = serve.build_launch(files, tmp_path / "dist", "nu-dialogue/j-moshi-ext", options, tmp_path / "tls",
                                half=True, base_env={"PATH": "/bin", "JMOSHI_CONFIG_PATH": "stale"})
    assert launch.argv == [
        sys.executable, "-m", "jmoshi_cli._moshi_entry", "--host", "0.0.0.0", "--port", "9000",
        "--hf-repo", "nu-dialogue/j-moshi-ext", "--moshi-weight", str(files.moshi_weight),
        "--mimi-weight", str(files.mimi_weight), "--tokenizer", str(files.tokenizer),
        "--static", str(tmp_path / "dist"), "--device", "cuda", "--half", "--ssl", str(tmp_path / "tls")]
    assert launch.env == {"PATH": "/bin", "HF_HUB_OFFLINE": "1", "JMOSHI_BIND_HOST": "0.0.0.0",
                          "PYTHONUNBUFFERED": "1", "JMOSHI_CONFIG_PATH": str(files.config)}
    assert launch.url == "https://127.0.0.1:9000/"
    no_config = serve.build_launch(ModelFiles(files.moshi_weight, files.mimi_weight, files.tokenizer), tmp_path,
                                   "r/x", serve.ServeOptions(), None, half=False, base_env={})
    assert "JMOSHI_CONFIG_PATH" not in no_config.env and "--half" not in no_config.argv


def fake_gpus(monkeypatch, *gpus: GPU) -> None:
    monkeypatch.setattr(hardware, "nvidia", lambda timeout_s=5.0: Probe(True, NvidiaFacts("550", "12.4", list(gpus))))


def test_gpu_preflight_refuses_too_little_free_vram(monkeypatch):
    fake_gpus(monkeypatch, GPU(0, "NVIDIA GeForce RTX 4090", int(25.4e9), int(12e9), (8, 9)))
    with pytest.raises(PreflightError, match="12.0 GB free; ext needs about 18.7 GB"):
        serve.check_gpu("cuda", 18.7, "ext")


def test_gpu_preflight_turns_on_half_for_pre_ampere(monkeypatch):
    fake_gpus(monkeypatch, GPU(0, "Quadro RTX 8000", int(48e9), int(47e9), (7, 5)))
    notes = serve.check_gpu("cuda", 18.7, "ext")
    assert serve.needs_half(notes)


def test_gpu_preflight_accepts_a_4090(monkeypatch):
    fake_gpus(monkeypatch, GPU(0, "NVIDIA GeForce RTX 4090", int(25.4e9), int(24.9e9), (8, 9)))
    assert serve.check_gpu("cuda:0", 18.7, "ext") == []
