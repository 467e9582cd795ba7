"""`serve --replicas` and `front`: real HAProxy, real moshi.server replicas (tiny model, CPU), loopback."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from conftest import TEST_TOKEN, child_env
from jmoshi_cli import hardware, scratch
from jmoshi_cli.errors import PreflightError, UsageError
from jmoshi_cli.hardware import GPU, NvidiaFacts, Probe
from jmoshi_cli.model.precision import Precision
from jmoshi_cli.selftest import free_port, speech_like
from jmoshi_cli.serving import haproxy, replicas

from helpers import (
    ANSWER_S,
    AUTH,
    LOAD_S,
    Running,
    Served,
    alive,
    children_of,
    converse,
    converse_sync,
    got,
    http_get,
    listening,
    wait_until,
)
from upgrades import Holder, pair_at_once

# --- the pieces, without processes -----------------------------------------------------------------


def test_config_queues_chat_one_per_replica_and_serves_the_ui_freely(tmp_path, haproxy_binary):
    cfg = haproxy.FrontConfig("0.0.0.0", 8998, (haproxy.Backend("r0", "127.0.0.1", 9001),
                                                 haproxy.Backend("r1", "127.0.0.1", 9002)),
                              tmp_path / "runtime.sock", tmp_path / "busy.http", queue_timeout_s=90)
    text = haproxy.render_config(cfg)
    assert "server r0 127.0.0.1:9001 check inter 1000ms fall 2 rise 1 maxconn 1" in text
    assert "timeout queue 90000ms" in text and "balance leastconn" in text
    # Every websocket upgrade is a conversation, whatever the spelling of its path: through the queue.
    assert "acl is_chat hdr(upgrade) -i websocket" in text and "use_backend chat if is_chat" in text
    assert "token_ok" not in text  # --no-token
    (tmp_path / "busy.http").write_text(haproxy.busy_page())
    (tmp_path / "haproxy.cfg").write_text(text)
    haproxy.check_config(haproxy_binary, tmp_path / "haproxy.cfg")  # HAProxy itself accepts it


def test_config_with_a_token_holds_its_digests_only_and_guards_stats_and_metrics(tmp_path, haproxy_binary):
    for name, body in (("401.html", "401"), ("busy.html", "busy"), ("busy.http", haproxy.busy_page())):
        (tmp_path / name).write_text(body)
    cfg = haproxy.FrontConfig("127.0.0.1", 8998, (haproxy.Backend("r0", "127.0.0.1", 9001),),
                              tmp_path / "runtime.sock", tmp_path / "busy.http", token=TEST_TOKEN,
                              unauthorized_page=tmp_path / "401.html", busy_body=tmp_path / "busy.html",
                              max_waiting=3, metrics=("127.0.0.1", 8405))
    text = haproxy.render_config(cfg)
    assert TEST_TOKEN not in text
    # The 401 comes before anything is served: /metrics (a service), /stats and every backend.
    assert text.index("if !token_ok") < text.index("prometheus-exporter") < text.index("use_backend stats")
    assert "queue(chat) ge 3" in text and "bind 127.0.0.1:8405" in text
    (tmp_path / "haproxy.cfg").write_text(text)
    haproxy.check_config(haproxy_binary, tmp_path / "haproxy.cfg")


def test_busy_page_is_a_complete_http_response():
    page = haproxy.busy_page().encode()
    head, body = page.split(b"\r\n\r\n", 1)
    assert head.startswith(b"HTTP/1.1 503 ")
    assert f"Content-Length: {len(body)}".encode() in head
    assert "busy" in body.decode()


def test_stat_csv_gives_active_and_queued_conversations():
    text = ("# pxname,svname,qcur,qmax,scur,smax,slim,stot,status,check_status,\n"
            "jmoshi,FRONTEND,,,3,3,2000,9,OPEN,,\n"
            "chat,r0,0,0,1,1,1,4,UP,L4OK,\n"
            "chat,r1,0,0,1,1,1,3,DOWN,L4CON,\n"
            "chat,BACKEND,2,2,4,4,200,7,UP,,\n"  # two talking and two queued: scur counts both
            "ui,r0,0,0,0,1,,5,UP,L4OK,\n"
            "ui,r1,0,0,0,1,,5,UP,INI,\n")
    load = haproxy.parse_stat(text)
    assert (load.active, load.queued, load.healthy, load.ui_up) == (2, 2, 1, 1)
    assert [s.name for s in load.servers] == ["r0", "r1"]


def fake_gpus(monkeypatch, *free_gb: float) -> None:
    gpus = [GPU(i, "NVIDIA H100 80GB HBM3", 85 * 10**9, int(free * 1e9), (9, 0)) for i, free in enumerate(free_gb)]
    monkeypatch.setattr(hardware, "nvidia", lambda: Probe(True, NvidiaFacts("550.54", "12.4", gpus)))


BF16_ONLY = replicas.Need(18.7)
EXT = replicas.Need(18.7, 11.0)  # J-Moshi ext where int8 can run (current runtime, no LoRA)


def test_auto_fills_each_gpu_by_free_memory(monkeypatch):
    fake_gpus(monkeypatch, 80, 40)
    placed, chosen = replicas.place(None, "cuda", None, EXT)
    assert [p.device for p in placed] == ["cuda:0", "cuda:1", "cuda:0", "cuda:1", "cuda:0", "cuda:0"]
    assert len({p.port for p in placed}) == 6 and chosen is Precision.BF16


def test_auto_falls_back_to_int8_where_bf16_does_not_fit_as_a_single_serve_does(monkeypatch):
    fake_gpus(monkeypatch, 16, 16)  # two 16 GB cards: no room for bf16 (18.7 GB), one int8 replica each
    placed, chosen = replicas.place(None, "cuda", None, EXT)
    assert chosen is Precision.INT8 and [p.device for p in placed] == ["cuda:0", "cuda:1"]
    fake_gpus(monkeypatch, 24, 24)  # bf16 fits two; four asked for fit only in int8
    placed, chosen = replicas.place(4, "cuda", None, EXT)
    assert chosen is Precision.INT8 and len(placed) == 4
    assert replicas.place(2, "cuda", None, EXT)[1] is Precision.BF16
    with pytest.raises(PreflightError, match="no GPU has room"):  # int8 not possible here: no fallback
        fake_gpus(monkeypatch, 16)
        replicas.place(None, "cuda", None, BF16_ONLY)
    with pytest.raises(PreflightError, match="no GPU has room"):  # bf16 asked for: never int8 by itself
        replicas.place(1, "cuda", None, EXT, Precision.BF16)


def test_asking_for_more_than_fits_says_how_many_do(monkeypatch):
    fake_gpus(monkeypatch, 80, 40)
    with pytest.raises(PreflightError) as caught:
        replicas.place(7, "cuda", [1], BF16_ONLY)
    assert "room for 2" in caught.value.message and "--replicas 2" in caught.value.hint


def test_cpu_replicas_share_the_cores_and_leave_one_to_the_rest():
    placed, _ = replicas.place(3, "cpu", None, BF16_ONLY, cores=8)
    assert [p.threads for p in placed] == [2, 2, 2]
    assert replicas.place(4, "cpu", None, BF16_ONLY, cores=2)[0][0].threads == 1


@pytest.mark.parametrize("text", ["0", "-1", "two", "1.5"])
def test_bad_replica_counts_are_usage_errors(text):
    with pytest.raises(UsageError):
        replicas.parse_count(text)


def test_unknown_gpu_is_named(monkeypatch):
    fake_gpus(monkeypatch, 80)
    with pytest.raises(UsageError) as caught:
        replicas.place(1, "cuda", replicas.parse_gpus("0,3"), BF16_ONLY)
    assert "no GPU 3" in caught.value.message


def test_ready_waits_for_every_replica_or_its_failure():
    """Two people who open the page once it says ready talk on two replicas, not one behind the other."""
    fleet = [replicas.Replica(replicas.Placement(name, "cpu", 1), launch=None) for name in ("r0", "r1")]

    def load(*up: str) -> haproxy.Load:
        return haproxy.Load(0, 0, tuple(haproxy.ServerState("chat", name, "UP" if name in up else "MAINT", 0, 0,
                                                            "L4OK" if name in up else "") for name in ("r0", "r1")))

    assert not replicas.all_started(fleet, load("r0"))
    assert replicas.all_started(fleet, load("r0", "r1"))
    fleet[1].failures = 1  # crashed while loading: restarting with backoff, the first one serves meanwhile
    assert replicas.all_started(fleet, load("r0"))


def test_haproxy_says_whether_it_took_a_state_change(haproxy_binary):
    front = haproxy.Front("127.0.0.1", free_port(), [haproxy.Backend("r0", "127.0.0.1", free_port())],
                          queue_timeout_s=5, managed=True)
    front.start()
    try:
        assert front.set_state("r0", "ready")
        assert not front.set_state("r9", "ready")  # no such server: HAProxy answers with an error
    finally:
        front.stop()
    assert not front.set_state("r0", "maint")  # HAProxy is gone: the supervisor asks again next tick


def test_two_conversations_that_arrive_together_land_on_both_free_replicas(haproxy_binary):
    """Each pair of conversations opened at once, on two free replicas of one conversation each, gets both
    replicas: neither waits behind the other (HAProxy's leastconn on several threads could pick one replica
    for both; the second then sat in that replica's queue)."""
    holders = [Holder("r0"), Holder("r1")]
    port = free_port()
    front = haproxy.Front("127.0.0.1", port, [haproxy.Backend(h.name, "127.0.0.1", h.port) for h in holders],
                          queue_timeout_s=60)
    front.start()
    pairs = []
    try:
        for _ in range(30):
            pairs.append(pair_at_once(port, timeout=10))
            # Both replicas free again before the next pair: HAProxy has seen both conversations end.
            wait_until(lambda: (front.load() or haproxy.Load(1, 0, ())).active == 0, 30, "both replicas free")
    finally:
        front.stop()
        for holder in holders:
            holder.close()
    assert all(pair == ("r0", "r1") for pair in pairs), pairs


# --- the real thing -----------------------------------------------------------------------------------


async def _hold(url: str):
    """Take a conversation and keep it without talking; returns the session and the open websocket."""
    import aiohttp

    session = aiohttp.ClientSession()
    ws = await session.ws_connect(url, headers=AUTH)
    message = await asyncio.wait_for(ws.receive(), 60)
    assert message.data[:1] == b"\x00", message
    return session, ws


async def _release(held) -> None:
    session, ws = held
    await ws.close()
    await session.close()


def _timed_busy_body(port: int, wait_s: float, path: str = "/api/chat") -> tuple[str, float]:
    """The raw answer to a websocket upgrade of `path` (urllib cannot send one), and how long it took."""
    import socket

    request = (f"GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
               f"Authorization: Bearer {TEST_TOKEN}\r\n"
               "Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n")
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=wait_s) as conn:
        conn.sendall(request.encode())
        answer = b""
        while chunk := conn.recv(65536):
            answer += chunk
    return answer.decode("utf-8", "replace"), time.monotonic() - started


def _status_of(url: str) -> int:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code


def serve_replicas(tiny_env, *extra: str) -> tuple[Served, int]:
    port = free_port()
    # The tests hold conversations without a word (their slots must stay taken): no idle timeout for them.
    served = Served(["--variant", "tiny", "--device", "cpu", "--port", str(port), "--replicas", "2",
                     "--idle-timeout", "3600", *extra], tiny_env)
    return served, port


def scratch_of(jmoshi_pid: int) -> list[Path]:
    """The private temp folders a jmoshi process made."""
    return [folder for folder in Path(tempfile.gettempdir()).glob(f"{scratch.PREFIX}*")
            if getattr(scratch.owner(folder), "pid", None) == jmoshi_pid]


def replica_pids(jmoshi_pid: int) -> dict[int, int]:
    """moshi.server port -> pid, for the replicas jmoshi started."""
    found = {}
    for pid in children_of(jmoshi_pid):
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
        if "jmoshi_cli.moshi_child" in argv:
            found[int(argv[argv.index("--port") + 1])] = pid
    return found


@pytest.mark.usefixtures("tiny_downloaded")
@pytest.mark.slow
def test_two_replicas_serve_two_queue_the_third_and_turn_away_in_words_when_the_wait_runs_out(tiny_env,
                                                                                              haproxy_binary):
    queue_s = 8  # long enough to see the third conversation queued and release a replica on a busy machine
    scraper_port = free_port()  # /stats and /metrics without the token, on loopback, for a Prometheus scraper
    served, port = serve_replicas(tiny_env, "--queue-timeout", str(queue_s), "--metrics-host", "127.0.0.1",
                                  "--metrics-port", str(scraper_port))
    try:
        url = served.wait_ready()
        wait_until(lambda: len(listening(port)) > 0, 60, "the front")
        ws_url = f"ws://127.0.0.1:{port}/api/chat"
        page = http_get(url)
        metrics = http_get(f"http://127.0.0.1:{port}/metrics")

        async def scenario():
            first, second = await asyncio.gather(_hold(ws_url), _hold(ws_url))  # both replicas taken
            taken_at: list[float] = []
            third = asyncio.ensure_future(converse(ws_url, speech_like(2.0), until=got(samples=1, pieces=1),
                                                   on_handshake=lambda: taken_at.append(time.monotonic())))
            # What the person running jmoshi sees: the third conversation waits in HAProxy's queue.
            await asyncio.get_running_loop().run_in_executor(None, served.wait_for, " 1 waiting;", 1, queue_s)
            assert not third.done() and not taken_at  # waiting in the queue, not refused
            released_at = time.monotonic()
            await _release(second)
            talked = await third
            waited_after_release = taken_at[0] - released_at
            blocker = await _hold(ws_url)  # takes the freed replica again: both busy
            # The same path spelled otherwise is the same conversation to a replica: it queues as well.
            loop = asyncio.get_running_loop()
            busy, *other_spellings = await asyncio.gather(*(
                loop.run_in_executor(None, _timed_busy_body, port, queue_s + 60, path)
                for path in ("/api/chat", "/%61pi/chat", "//api/chat", "/x/../api/chat", "/api/./chat")))
            await _release(first)
            await _release(blocker)
            return talked, waited_after_release, busy, other_spellings

        talked, waited_after_release, busy, other_spellings = asyncio.run(scenario())
        # Without the token the front answers 401 before anything: the page, the stats, the metrics.
        unauthorized = [_status_of(f"http://127.0.0.1:{port}{path}") for path in ("/", "/stats", "/metrics")]
        stats = http_get(f"http://127.0.0.1:{port}/stats")
        scraped = http_get(f"http://127.0.0.1:{scraper_port}/metrics", headers={})
    finally:
        code, err = served.stop()
    assert "J-Moshi test UI" in page
    assert 'haproxy_backend_current_queue{proxy="chat"}' in metrics
    assert unauthorized == [401, 401, 401] and "Statistics Report" in stats
    assert 'haproxy_backend_current_queue{proxy="chat"}' in scraped
    for answer, _ in other_spellings:
        assert answer.startswith("HTTP/1.1 503 ") and "All J-Moshi replicas are busy" in answer, answer
    # Its turn came with the release, not before (and not at the queue's timeout, which answers 503).
    assert 0 < waited_after_release < 30, (talked.handshake_s, waited_after_release)
    assert talked.audio_samples > 0 and talked.text_pieces
    # HAProxy turns a conversation away once it waited the queue timeout, not sooner, and says so in words.
    answer, waited = busy
    assert answer.startswith("HTTP/1.1 503 ") and "All J-Moshi replicas are busy" in answer, answer
    assert queue_s - 0.5 <= waited < queue_s + 30, waited
    assert code == 143
    assert "replicas healthy" in err and "waiting" in err


@pytest.mark.usefixtures("tiny_downloaded")
@pytest.mark.slow
def test_a_killed_replica_is_replaced_while_the_other_keeps_talking(tiny_env, haproxy_binary):
    from jmoshi_cli.serving.chat import ChatError

    served, port = serve_replicas(tiny_env)
    try:
        served.wait_ready()
        wait_until(lambda: len(replica_pids(served.process.pid)) == 2, 60, "two replicas")
        ws_url = f"ws://127.0.0.1:{port}/api/chat"
        victim_port, victim = sorted(replica_pids(served.process.pid).items())[0]

        async def talk(heard: asyncio.Event):
            try:  # hangs up after its last frame: what is asserted is that it could say everything
                return await converse(ws_url, speech_like(6.0), until=lambda result: True, on_audio=heard.set)
            except ChatError as exc:
                return exc

        async def scenario():
            heard = [asyncio.Event(), asyncio.Event()]
            calls = [asyncio.ensure_future(talk(one)) for one in heard]
            # One replica dies while both conversations are under way: each has heard J-Moshi.
            await asyncio.wait_for(asyncio.gather(*(one.wait() for one in heard)), ANSWER_S)
            os.kill(victim, signal.SIGKILL)
            done = await asyncio.gather(*calls)
            after = await converse(ws_url, speech_like(1.5), until=got())  # goes to the survivor
            return done, after

        done, after = asyncio.run(scenario())
        wait_until(lambda: victim_port in replica_pids(served.process.pid)
                   and replica_pids(served.process.pid)[victim_port] != victim, 60, "the restart")
        # What the person sees: HAProxy checked the new process and routes to it again.
        served.wait_for("back in rotation", timeout=LOAD_S)
        assert "127.0.0.1" in listening(victim_port)

        async def both():  # the restarted replica rejoined: two conversations at once work again
            try:
                held = await asyncio.wait_for(asyncio.gather(_hold(ws_url), _hold(ws_url)), 60)
            except asyncio.TimeoutError as exc:
                raise AssertionError(f"two conversations at once did not both start:\n{served.err[-3000:]}") from exc
            await _release_all(held)

        asyncio.run(both())
    finally:
        code, err = served.stop()
    whole = [r for r in done if not isinstance(r, Exception) and r.sent_frames == 75]
    assert len(whole) >= 1, done  # the conversation on the other replica went on to the end
    assert after.audio_samples > 0
    assert "out of rotation" in err and "back in rotation" in err, err


async def _release_all(held) -> None:
    for one in held:
        await _release(one)


@pytest.mark.usefixtures("tiny_downloaded")
@pytest.mark.slow
def test_sigterm_drains_a_live_conversation_then_stops_everything(tiny_env, haproxy_binary):
    served, port = serve_replicas(tiny_env, "--drain-timeout", "60")
    served.wait_ready()
    pids = set(replica_pids(served.process.pid).values()) | set(children_of(served.process.pid))
    ws_url = f"ws://127.0.0.1:{port}/api/chat"

    async def scenario():
        heard = asyncio.Event()
        call = asyncio.ensure_future(converse(ws_url, speech_like(5.0), until=got(), on_audio=heard.set))
        await asyncio.wait_for(heard.wait(), ANSWER_S)  # the conversation is under way: J-Moshi answers
        served.process.send_signal(signal.SIGTERM)
        return await call

    result = asyncio.run(scenario())
    code, err = served.stop()
    assert result.sent_frames == 63 and result.audio_samples > 0  # it was not cut off
    assert code == 143 and "draining" in err
    wait_until(lambda: not any(Path(f"/proc/{pid}").exists() for pid in pids), 30, "every child to exit")
    assert not listening(port)


@pytest.mark.usefixtures("tiny_downloaded")
@pytest.mark.slow
def test_kill_9_of_jmoshi_takes_haproxy_and_every_replica_with_it(tiny_env, haproxy_binary):
    served, port = serve_replicas(tiny_env)
    served.wait_ready()
    pids = set(children_of(served.process.pid))
    assert len(pids) >= 3  # two replicas and HAProxy
    folders = scratch_of(served.process.pid)
    assert [f.name.startswith("jmoshi-front-") for f in folders] == [True]  # HAProxy's config and socket
    served.process.kill()
    served.process.wait()
    wait_until(lambda: not any(alive(pid) for pid in pids), 30, "the children to die with jmoshi")
    assert not listening(port)
    scratch.sweep()  # what the next jmoshi does first: the killed one could not remove its folder
    assert not any(folder.exists() for folder in folders)


@pytest.mark.usefixtures("tiny_downloaded")
@pytest.mark.slow
def test_front_over_a_serve_elsewhere_with_health_checks(tiny_env, haproxy_binary):
    backend_port = free_port()
    backend = Served(["--variant", "tiny", "--device", "cpu", "--port", str(backend_port)], tiny_env)
    front_port, dead_port = free_port(), free_port()
    front = Running([sys.executable, "-m", "jmoshi_cli", "front", "--backend", f"127.0.0.1:{backend_port}",
                     "--backend", f"127.0.0.1:{dead_port}", "--port", str(front_port)], tiny_env)
    try:
        backend.wait_ready()
        url = front.wait_ready()
        assert url == f"http://127.0.0.1:{front_port}/?token={TEST_TOKEN}"
        # What the person running the front sees once HAProxy checked both: the live backend up, the other not.
        # Its status line is printed again whenever the count changes; the newest one is the current state.
        wait_until(lambda: "1/2 replicas healthy" in front.last_line_with("replicas healthy"), 60,
                   lambda: f"the front to count one healthy backend:\n{front.err[-2000:]}")
        result = converse_sync(f"ws://127.0.0.1:{front_port}/api/chat", speech_like(1.5), until=got())
        assert result.audio_samples > 0
    finally:
        code, err = front.stop()
        backend.stop()
    assert code == 143
    assert "1/2 replicas healthy" in err


def test_front_refuses_a_backend_that_is_not_host_port():
    from jmoshi_cli.serving import front

    with pytest.raises(UsageError):
        front.parse_backend("localhost", 0)
    assert front.parse_backend("[::1]:8998", 1).address == "[::1]:8998"
    assert front.parse_backend("10.0.0.5:8998/4", 2).slots == 4
    with pytest.raises(UsageError):
        front.parse_backend("10.0.0.5:8998/0", 3)


def test_haproxy_missing_is_one_line_with_the_install_command(tiny_env, tmp_path):
    env = child_env(tiny_env)
    env["JMOSHI_HAPROXY"] = str(tmp_path / "no-such-haproxy")
    done = subprocess.run([sys.executable, "-m", "jmoshi_cli", "serve", "--variant", "tiny", "--device", "cpu",
                           "--replicas", "2", "--port", str(free_port())], env=env, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 5
    assert "no-such-haproxy" in done.stderr and "apt-get install haproxy" in done.stderr
    assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 2


def test_old_haproxy_is_refused_before_anything_starts(tmp_path, monkeypatch):
    old = tmp_path / "haproxy"
    old.write_text("#!/bin/sh\necho 'HA-Proxy version 2.2.9-2+deb11u5 2023/04/10 - https://haproxy.org/'\n")
    old.chmod(0o755)
    monkeypatch.setenv("JMOSHI_HAPROXY", str(old))
    with pytest.raises(PreflightError) as caught:
        haproxy.find()
    assert "2.2.9 is too old" in caught.value.message
