"""The MLX server child end to end on the CPU: `python -m jmoshi_cli.mlx.server` as a real process, spoken
to through /api/chat, with bf16 and 8-bit weights of the tiny model. Needs `.[mlx]`.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

pytest.importorskip("moshi_mlx", reason="the MLX runtime is not installed (pip install -e '.[mlx]')")

from jmoshi_cli.backends.contract import Access, ChildContract, Limits  # noqa: E402
from jmoshi_cli.mlx import convert  # noqa: E402
from jmoshi_cli.model.precision import Precision  # noqa: E402
from jmoshi_cli.tiny_model import MIMI_NAME, MOSHI_NAME, TOKENIZER_NAME  # noqa: E402
from test_mlx_convert import mlx_tiny_repo  # noqa: E402

from helpers import LOAD_S, alive, answered, converse_sync, japanese, listening, user_audio, wait_until  # noqa: E402

FRAME = 1920
INPUT_S = 3.2  # 40 frames: longer than the tiny model's 24-frame context
UI_TEXT = "MLX test UI"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict:
    home = tmp_path_factory.mktemp("home")
    repo = mlx_tiny_repo()
    made = {p: convert.ensure_mlx(home, repo / MOSHI_NAME, None, repo / "config.json", p)
            for p in (Precision.BF16, Precision.INT8)}
    static = tmp_path_factory.mktemp("static")
    (static / "index.html").write_text(f"<html><title>{UI_TEXT}</title></html>")
    return {"repo": repo, "made": made, "static": static, "mimi": convert.ensure_mimi(home, repo / MIMI_NAME, None)}


def server_argv(files: dict, precision: Precision, port: int, *extra: str) -> list[str]:
    made = files["made"][precision]
    return [sys.executable, "-m", "jmoshi_cli.mlx.server", "--lm-config", str(made.config),
            "--moshi-weight", str(made.weight), "--mimi-weight", str(files["mimi"]),
            "--tokenizer", str(files["repo"] / TOKENIZER_NAME), "--host", "127.0.0.1", "--port", str(port),
            "--static", str(files["static"]), *extra]


class Child:
    """The server as jmoshi runs it: its own session, its contract in the environment, its lines read."""

    def __init__(self, argv: list[str], port: int, contract: ChildContract | None = None):
        contract = contract if contract is not None else ChildContract()
        env = {**os.environ, **contract.with_parent(os.getpid()).to_env()}
        self.port, self.lines = port, []
        self.process = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL, start_new_session=True, text=True)
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.process.stdout:
            self.lines.append(line.rstrip("\n"))

    def wait_ready(self) -> None:
        def ready() -> bool:
            assert self.process.poll() is None, "the server exited:\n" + "\n".join(self.lines)
            return bool(listening(self.port))

        wait_until(ready, LOAD_S, "the server listens")

    def count(self, text: str) -> int:
        return sum(text in line for line in self.lines)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def talk(port: int, pcm):
    """One conversation, listened to until the server answered every frame (it is slower than real time)."""
    return converse_sync(f"ws://127.0.0.1:{port}/api/chat", pcm, until=answered(pcm))


@pytest.mark.slow
@pytest.mark.parametrize("precision", [Precision.BF16, Precision.INT8])
def test_two_conversations_each_from_a_fresh_state_on_loopback_only(files, precision):
    import numpy as np

    from jmoshi_cli.serving import server_log

    port = free_port()
    child = Child(server_argv(files, precision, port, "--seed", "7"), port)
    try:
        child.wait_ready()
        assert listening(port) == {"127.0.0.1"}
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(b"GET / HTTP/1.0\r\n\r\n")
            assert UI_TEXT in s.makefile("rb").read().decode()
        context = json.loads(files["made"][precision].config.read_text())["context"]
        pcm = user_audio(INPUT_S)
        results = []
        for n in (1, 2):
            results.append(talk(port, pcm))
            wait_until(lambda n=n: child.count("done with connection") == n, 60, "the conversation ends")
        for result in results:
            assert answered(pcm)(result) and result.audio_samples > (context + 2) * FRAME  # outlasted the context
            assert japanese(result.text)
        first, second = results
        # The same seed and input give the same conversation, to the sample: the second started from a fresh
        # state (the client stops once every frame was answered: one of them may hold a frame more).
        assert first.text == second.text and len(first.text_pieces) > 10
        n = min(first.audio_samples, second.audio_samples)
        assert np.array_equal(first.audio[:n], second.audio[:n])
        # The console says what moshi.server's does, so jmoshi's relay shows the same things.
        log, events = server_log.ServerLog(), []
        for line in list(child.lines):
            events += log.feed(line + "\n", time.monotonic())
        kinds = [event.kind for event in events]
        assert kinds.count(server_log.Kind.CONNECTED) == 2 and kinds.count(server_log.Kind.HUNG_UP) == 2
        finals = [event.stats for event in events if event.kind is server_log.Kind.FRAMES and event.stats.final]
        assert len(finals) == 2 and all(stats.frames > context for stats in finals)
        assert not [event for event in events if event.kind is server_log.Kind.TRACEBACK]
    finally:
        child.stop()


def test_every_session_starts_from_the_same_fresh_state(files):
    """In process: after a warm-up and a first conversation, the next ones give the same tokens and the same
    samples (seeded)."""
    import numpy as np

    from jmoshi_cli.mlx import server, session

    args = server.parse_args(server_argv(files, Precision.INT8, 0)[3:])
    engine = session.Engine(args, session.settings_from(args, ChildContract(seed=5)))
    engine.warmup()
    pcm = user_audio(2.0)
    runs = []
    for _ in range(3):
        session, run = engine.start(), []
        for i in range(len(pcm) // FRAME):
            out, text = session.frame(pcm[i * FRAME: (i + 1) * FRAME])
            audio = session.generator.last_audio_tokens()
            run.append((text, None if audio is None else np.array(audio).tolist(),
                        None if out is None else out.tobytes()))
        runs.append(run)
    assert runs[0] == runs[1] == runs[2]
    assert sum(audio is not None for _, audio, _ in runs[0]) > 20


def talk_in_thread(port: int, seconds: float) -> dict:
    """A conversation in a thread: its ChatResult (or ChatError) lands in the returned dict."""
    from jmoshi_cli.serving.chat import ChatError

    out: dict = {}
    pcm = user_audio(seconds)

    def run() -> None:
        try:
            out["result"] = talk(port, pcm)
        except ChatError as exc:
            out["error"] = exc

    out["thread"] = threading.Thread(target=run, daemon=True)
    out["thread"].start()
    return out


@pytest.mark.slow
def test_a_second_browser_waits_and_sigterm_hangs_up_at_once(files):
    port = free_port()
    child = Child(server_argv(files, Precision.INT8, port), port)
    try:
        child.wait_ready()
        first = talk_in_thread(port, 2.0)
        wait_until(lambda: child.count("frame handled") > 0, 60, "the first conversation runs")
        second = talk_in_thread(port, 1.0)
        wait_until(lambda: child.count("accepted connection") == 2, 60, "the second browser connects")
        first["thread"].join(180)
        second["thread"].join(180)
        # The second got its handshake only once the first had hung up, and then talked as well.
        assert child.count("accepted connection") == 2
        assert second["result"].handshake_s > 1.5 and second["result"].audio_samples > 0
        # Asked to stop in the middle of a conversation, it hangs up and exits, without waiting for the browser.
        handled = child.count("frame handled")
        third = talk_in_thread(port, 30.0)
        wait_until(lambda: child.count("frame handled") > handled + 5, 120, "the third conversation runs")
        began = time.monotonic()
        child.process.send_signal(signal.SIGTERM)
        assert child.process.wait(timeout=30) == 0 and time.monotonic() - began < 10
        third["thread"].join(60)
        assert "error" in third  # the client was told: the server closed the conversation
        assert not listening(port)
    finally:
        child.stop()


PARENT = """
import os, subprocess, sys, time
from jmoshi_cli.backends.contract import ChildContract
env = {**os.environ, **ChildContract(parent_pid=os.getpid()).to_env()}
child = subprocess.Popen(sys.argv[1:], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                         start_new_session=True)
print(child.pid, flush=True)
time.sleep(3600)
"""


@pytest.mark.slow
def test_kill_9_of_its_parent_leaves_nothing(files):
    port = free_port()
    parent = subprocess.Popen([sys.executable, "-c", PARENT, *server_argv(files, Precision.INT8, port)],
                              stdout=subprocess.PIPE, text=True)
    try:
        server = int(parent.stdout.readline())
        wait_until(lambda: listening(port) == {"127.0.0.1"}, LOAD_S, "the server listens")
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        # Its threads exit after its main one, and the socket closes with the last: wait for both.
        wait_until(lambda: not alive(server) and not listening(port), 30, "the server dies with its parent")
    finally:
        parent.kill()
        parent.wait()


@pytest.mark.parametrize("change, says", [
    ({"static": "/nonexistent"}, "no index.html there"),
])
def test_what_it_cannot_do_is_one_line_and_an_exit_before_loading(files, change, says):
    argv = server_argv(files, Precision.INT8, free_port())
    if "static" in change:
        argv[argv.index("--static") + 1] = change["static"]
    contract = ChildContract(parent_pid=os.getpid(), **({"record": change["record"]} if "record" in change else {}))
    done = subprocess.run(argv, env={**os.environ, **contract.to_env()}, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stdout.startswith("[Err ] ") and says in done.stdout
    assert "Traceback" not in done.stdout + done.stderr and "loading" not in done.stdout


@pytest.mark.slow
def test_the_gate_on_the_mlx_server_token_origin_and_idle_timeout(files):
    """The same HTTP seam as on moshi.server (serving/gate.py): 401 without the token, 403 for a foreign page,
    a silent client's slot freed within the idle timeout."""
    import asyncio
    import urllib.error
    import urllib.request

    import aiohttp

    from conftest import TEST_TOKEN
    from jmoshi_cli.serving.chat import ChatRefused

    port = free_port()
    contract = ChildContract(access=Access(token=TEST_TOKEN), limits=Limits(idle_s=5))
    child = Child(server_argv(files, Precision.BF16, port), port, contract)
    url = f"ws://127.0.0.1:{port}/api/chat"

    async def silent_then_closed() -> int | None:
        async with aiohttp.ClientSession() as session:
            async with session.ws_connect(url, headers={"Authorization": f"Bearer {TEST_TOKEN}"}) as ws:
                async for _ in ws:
                    pass
                return ws.close_code

    try:
        child.wait_ready()
        with pytest.raises(urllib.error.HTTPError) as page:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=30)
        assert page.value.code == 401
        with pytest.raises(ChatRefused) as no_token:
            converse_sync(url, user_audio(0.5), token=None)
        foreign = asyncio.run(_foreign(url, TEST_TOKEN))
        assert asyncio.run(asyncio.wait_for(silent_then_closed(), 120)) == 4001
        wait_until(lambda: child.count("conversation ended: no audio from the client") == 1, 30, "the reason")
    finally:
        child.stop()
    assert (no_token.value.status, foreign) == (401, 403)


async def _foreign(url: str, token: str) -> int:
    """The status a page of another site gets for a websocket, token or not."""
    import aiohttp

    async with aiohttp.ClientSession() as session:
        try:
            async with session.ws_connect(url, headers={"Authorization": f"Bearer {token}",
                                                        "Origin": "http://evil.example"}):
                return 101
        except aiohttp.WSServerHandshakeError as exc:
            return exc.status
