"""The moshi.server child: it never outlives jmoshi, supervise's one loop, and what a failure carries.

Real processes, sockets and signals throughout; the slow tests run the real moshi.server on the tiny model.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from jmoshi_cli import scratch, selftest
from jmoshi_cli.backends.contract import ChildContract, Launch
from jmoshi_cli.errors import ServerError
from jmoshi_cli.selftest import SelftestError, free_port
from jmoshi_cli.serving.child import Server, supervise

from helpers import LOAD_S, Served, alive, children_of, listening, processes


def in_session(sid: int) -> list[int]:
    """Live processes of a session: the child leads its own, so this is it and anything it started."""
    return [pid for pid, fields in processes() if int(fields[3]) == sid and alive(pid)]


def moshi_child(parent: int, timeout: float = 120) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for pid in children_of(parent):
            try:
                if b"jmoshi_cli.moshi_child" in Path(f"/proc/{pid}/cmdline").read_bytes():
                    return pid
            except OSError:
                continue
        time.sleep(0.05)
    raise AssertionError("no moshi.server child appeared")


def port_of(pid: int) -> int:
    argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
    return int(argv[argv.index("--port") + 1])


def wait_listening(child: int, port: int, timeout: float = LOAD_S) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and alive(child):
        if listening(port):
            return
        time.sleep(0.1)
    raise AssertionError("moshi.server never listened")


def assert_gone_within(child: int, port: int, seconds: float = 30.0) -> None:
    """The child and all it started exit once jmoshi is gone (seconds: a deadline for a busy machine)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and (in_session(child) or listening(port)):
        time.sleep(0.05)
    left = in_session(child)
    if left:  # leave no orphan behind, even when the test fails
        os.killpg(child, signal.SIGKILL)
    assert not left, f"still running {seconds:g} s after jmoshi died: {left}"
    assert listening(port) == set()


# --- kill -9 of jmoshi takes its child down ------------------------------------------------------------


@pytest.mark.usefixtures("tiny_downloaded")
@pytest.mark.slow
def test_kill_9_of_serve_takes_its_moshi_server_down(tiny_env):
    port = free_port()
    served = Served(["--variant", "tiny", "--device", "cpu", "--port", str(port)], tiny_env)
    try:
        served.wait_ready()
        child = moshi_child(served.process.pid)
        assert alive(child) and listening(port) == {"127.0.0.1"}
        served.process.kill()
        served.process.wait()
        assert_gone_within(child, port)
    finally:
        served.stop()


@pytest.mark.slow
def test_kill_9_of_selftest_takes_its_moshi_server_down():
    from jmoshi_cli.tiny_model import cached_tiny_repo

    env = {k: v for k, v in os.environ.items() if not k.startswith("JMOSHI_")}
    env.update(JMOSHI_TINY_CACHE=str(cached_tiny_repo()), NO_COLOR="1")
    process = subprocess.Popen([sys.executable, "-m", "jmoshi_cli", "selftest"], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        child = moshi_child(process.pid)
        port = port_of(child)
        wait_listening(child, port)
        folders = [folder for folder in Path(tempfile.gettempdir()).glob("jmoshi-selftest-*")
                   if getattr(scratch.owner(folder), "pid", None) == process.pid]
        assert len(folders) == 1  # the tiny model's web UI, unpacked
        process.kill()
        process.wait()
        assert_gone_within(child, port)
        scratch.sweep()  # what the next jmoshi does first: the killed one could not remove its folder
        assert not folders[0].exists()
    finally:
        process.kill()
        process.wait()


def test_a_child_whose_parent_is_already_gone_leaves_at_once():
    """The fork race: jmoshi died before the child armed PR_SET_PDEATHSIG, so no signal will come.

    The child is told its parent is a process that is not its parent, which is what it sees when it
    was handed to another one; it must leave before it imports anything or starts moshi.server.
    """
    env = dict(os.environ, **ChildContract(parent_pid=os.getppid()).to_env())
    done = subprocess.run([sys.executable, "-X", "importtime", "-m", "jmoshi_cli.moshi_child", "--help"], env=env,
                          capture_output=True, text=True, timeout=60)
    imported = {line.rsplit("|", 1)[1].strip().split(".")[0] for line in done.stderr.splitlines() if "|" in line}
    assert done.returncode == 1 and "usage" not in done.stdout
    assert "jmoshi_cli" in imported and not imported & {"torch", "moshi", "aiohttp"}


# --- supervise: one loop on the main thread -----------------------------------------------------------


def python_child(script: str, port: int) -> Launch:
    return Launch([sys.executable, "-c", script, str(port)], dict(os.environ), "127.0.0.1", port, "http",
                  ChildContract())


LISTENER = """
import os, socket, sys, time
from jmoshi_cli.backends.contract import ChildContract
print("parent", ChildContract.from_env(os.environ).parent_pid == os.getppid(), flush=True)
sock = socket.socket(); sock.bind(("127.0.0.1", int(sys.argv[1]))); sock.listen()
while True:
    time.sleep(1)
"""


def test_supervise_reports_ready_once_then_stops_the_child_on_sigterm():
    port = free_port()
    lines: list[str] = []
    ready: list[float] = []

    def on_ready(seconds: float) -> None:
        ready.append(seconds)
        os.kill(os.getpid(), signal.SIGTERM)  # as `kill <jmoshi pid>` would, once the server listens

    before = signal.getsignal(signal.SIGTERM)
    server = Server(python_child(LISTENER, port), relay=lines.append)
    assert supervise(server, on_ready) == 143
    assert len(ready) == 1 and server.process.returncode == -signal.SIGTERM
    assert lines == ["parent True\n", ""]  # the contract names jmoshi; "" marks the end of output
    assert signal.getsignal(signal.SIGTERM) == before
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))  # the port is free again


def test_supervise_explains_a_child_that_dies_before_it_listens():
    server = Server(python_child("print('RuntimeError: CUDA out of memory'); raise SystemExit(3)", free_port()),
                    relay=lambda line: None)
    with pytest.raises(ServerError) as caught:
        supervise(server, lambda seconds: pytest.fail("never ready"))
    assert caught.value.message == "moshi.server exited with code 3: the GPU ran out of memory"
    assert caught.value.exit_code == 3


def test_server_refuses_to_start_off_the_main_thread():
    server = Server(python_child("pass", free_port()))
    raised: list[BaseException] = []

    def start() -> None:
        try:
            server.start()
        except RuntimeError as exc:
            raised.append(exc)

    worker = threading.Thread(target=start)
    worker.start()
    worker.join()
    assert raised and server.process is None


# --- selftest: a failure carries the server's output ----------------------------------------------------


@pytest.mark.slow
def test_selftest_failure_carries_the_server_output(tmp_path, monkeypatch):
    from jmoshi_cli.tiny_model import cached_tiny_repo

    repo = cached_tiny_repo()
    broken = tmp_path / "tiny"
    broken.mkdir()
    for entry in repo.iterdir():
        (broken / entry.name).symlink_to(entry)
    size = (repo / "model.safetensors").stat().st_size
    (broken / "model.safetensors").unlink()
    (broken / "model.safetensors").write_bytes(b"\0" * size)  # same size: the cache still calls it complete
    monkeypatch.setenv("JMOSHI_TINY_CACHE", str(broken))
    with pytest.raises(SelftestError) as caught:
        selftest.run()
    error = caught.value
    assert error.message.startswith("moshi.server failed: moshi.server exited with code 1: ")
    assert "--verbose selftest" in error.hint and "JMOSHI_DEBUG=1" in error.hint
    assert "Traceback (most recent call last):" in error.detail and "loading moshi" in error.detail
    assert "\x1b[" not in error.detail
