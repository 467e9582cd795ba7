"""Many conversations: `jmoshi serve --replicas N` against one upstream moshi.server, in one run.

Three figures, on this machine's CPU with the tiny model, everything on loopback:
1. conversations served at once: N+1 clients start together; how many get the handshake within 2 s
   (upstream: one server, one conversation; the others hear nothing until it hangs up);
2. latency the HAProxy front adds per websocket message: an echo websocket server reached directly
   and through the same front jmoshi generates (median and p95 round trip, and their difference);
3. time from a replica freeing to the next queued client's first audio message.

    .venv/bin/python bench/front.py [--replicas 2] [--messages 2000]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from jmoshi_cli.selftest import free_port, speech_like
from jmoshi_cli.serving import haproxy

from _common import BENCH_TOKEN, BIN, bench_env, tiny_hub_root
from hub_server import LocalHub

AUTH = {"Authorization": f"Bearer {BENCH_TOKEN}"}  # jmoshi's servers; upstream's ignores it

UPSTREAM = ("import torch, runpy; torch.cuda.synchronize = lambda *a, **k: None; "
            "runpy.run_module('moshi.server', run_name='__main__')")


def start(argv: list[str], env: dict) -> subprocess.Popen:
    return subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            start_new_session=True)


def stop(process: subprocess.Popen) -> None:
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(60)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    except ProcessLookupError:
        pass


async def served_at_once(url: str, clients: int, limit_s: float = 3.0) -> int:
    """Clients that got the handshake within limit_s while every client keeps its conversation open."""
    import aiohttp

    async with aiohttp.ClientSession() as session:

        async def one(held: list) -> bool:
            ws = await session.ws_connect(url, headers=AUTH)  # behind the front, a queued client waits right here
            held.append(ws)
            message = await ws.receive()
            return message.data[:1] == b"\x00"

        held: list = []
        tasks = [asyncio.ensure_future(one(held)) for _ in range(clients)]
        done, pending = await asyncio.wait(tasks, timeout=limit_s)
        for task in pending:
            task.cancel()
        for ws in held:
            await ws.close()
    return sum(task.result() for task in done if not task.cancelled() and task.exception() is None)


async def first_audio_after_release(url: str) -> float:
    """Hold both replicas, queue a third client, free one replica: seconds to the third one's audio."""
    import aiohttp

    from jmoshi_cli.serving.opus import OpusStream

    async with aiohttp.ClientSession() as session:
        held = [await session.ws_connect(url, headers=AUTH) for _ in range(2)]
        for ws in held:
            await ws.receive()
        queued = asyncio.ensure_future(session.ws_connect(url, headers=AUTH))
        await asyncio.sleep(2.0)
        assert not queued.done()
        released = time.monotonic()
        await held[0].close()
        ws = await queued
        await ws.receive()  # the handshake
        opus = OpusStream(24000)
        pcm = speech_like(2.0)
        for start in range(0, len(pcm), 1920):
            data = opus.encode(pcm[start:start + 1920])
            if data:
                await ws.send_bytes(b"\x01" + data)
            try:
                message = await asyncio.wait_for(ws.receive(), 0.08)
            except asyncio.TimeoutError:
                continue
            if message.type == aiohttp.WSMsgType.BINARY and message.data[:1] == b"\x01":
                arrived = time.monotonic()
                break
        else:
            raise SystemExit("the queued client got no audio")
        await ws.close()
        await held[1].close()
    return arrived - released


# --- the front's own latency, with an echo server ------------------------------------------------------


def echo_server(port: int) -> threading.Thread:
    from aiohttp import web

    async def handle(request):
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        async for message in ws:
            await ws.send_bytes(message.data)
        return ws

    async def index(request):
        return web.Response(text="ok")

    def run() -> None:
        app = web.Application()
        app.add_routes([web.get("/api/chat", handle), web.get("/", index)])
        web.run_app(app, host="127.0.0.1", port=port, print=None, handle_signals=False)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


async def round_trips(url: str, count: int, size: int = 160) -> list[float]:
    import aiohttp

    payload = b"\x01" + os.urandom(size)
    times = []
    async with aiohttp.ClientSession() as session, session.ws_connect(url) as ws:
        for _ in range(count):
            started = time.perf_counter()
            await ws.send_bytes(payload)
            await ws.receive()
            times.append((time.perf_counter() - started) * 1000)
    return times


def p95(values: list[float]) -> float:
    return sorted(values)[int(0.95 * (len(values) - 1))]


def front_latency(messages: int) -> tuple[list[float], list[float]]:
    echo_port, front_port = free_port(), free_port()
    echo_server(echo_port)
    time.sleep(1)
    front = haproxy.Front("127.0.0.1", front_port, [haproxy.Backend("e0", "127.0.0.1", echo_port)], 60)
    front.start()
    try:
        while not (front.load() and front.load().serving):
            time.sleep(0.2)
        direct = asyncio.run(round_trips(f"ws://127.0.0.1:{echo_port}/api/chat", messages))
        proxied = asyncio.run(round_trips(f"ws://127.0.0.1:{front_port}/api/chat", messages))
    finally:
        front.stop()
    return direct, proxied


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--messages", type=int, default=2000)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="jmoshi-bench-front-"))
    with LocalHub(tiny_hub_root()) as hub:
        env = bench_env(hub.endpoint, work / "cache")
        subprocess.run([str(BIN / "jmoshi"), "download", "--variant", "tiny"], env=env, check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        port = free_port()
        jm = start([str(BIN / "jmoshi"), "serve", "--variant", "tiny", "--device", "cpu", "--port", str(port),
                    "--replicas", str(args.replicas)], env)
        url = jm.stdout.readline().strip()
        ws = f"ws://127.0.0.1:{port}/api/chat"
        at_once = asyncio.run(served_at_once(ws, args.replicas + 1))
        time.sleep(2)
        slot_to_audio = asyncio.run(first_audio_after_release(ws)) if args.replicas == 2 else float("nan")
        stop(jm)
        files = _local_files(env)
        up_port = free_port()
        upstream = start([sys.executable, "-c", UPSTREAM, "--port", str(up_port), "--device", "cpu", *files],
                         dict(env, HF_HUB_OFFLINE="1"))
        _wait_port(up_port)
        upstream_at_once = asyncio.run(served_at_once(f"ws://127.0.0.1:{up_port}/api/chat", args.replicas + 1))
        stop(upstream)
    shutil.rmtree(work, ignore_errors=True)
    direct, proxied = front_latency(args.messages)
    print(f"jmoshi serve --replicas {args.replicas}: {url}")
    print(f"conversations served at once ({args.replicas + 1} clients): jmoshi {at_once}, "
          f"upstream moshi.server {upstream_at_once}")
    print(f"front latency per message ({args.messages} round trips, 161 bytes): direct median "
          f"{statistics.median(direct):.3f} ms p95 {p95(direct):.3f} ms; through HAProxy median "
          f"{statistics.median(proxied):.3f} ms p95 {p95(proxied):.3f} ms; added median "
          f"{statistics.median(proxied) - statistics.median(direct):.3f} ms, p95 {p95(proxied) - p95(direct):.3f} ms")
    print(f"slot freed -> queued client's first audio: {slot_to_audio:.3f} s")


def _local_files(env: dict) -> list[str]:
    out = subprocess.run([str(BIN / "jmoshi"), "download", "--variant", "tiny"], env=env, capture_output=True,
                         text=True, check=True).stdout.split()
    files = {Path(p).name: p for p in out}
    return ["--hf-repo", "jmoshi-test/tiny", "--moshi-weight", files["model.safetensors"],
            "--mimi-weight", files["tokenizer-e351c8d8-checkpoint125.safetensors"],
            "--tokenizer", files["tokenizer_spm_32k_3.model"], "--static", str(Path(files["dist.tgz"]).parent / "dist")]


def _wait_port(port: int, timeout: float = 300) -> None:
    import socket

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise SystemExit("upstream server never listened")


if __name__ == "__main__":
    main()
