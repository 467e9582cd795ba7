"""What `serve --record` costs the frame loop: per-frame handling time and the server's memory over a long
conversation, with and without --record, in one run, on this machine's CPU with the tiny model.

Each arm starts `jmoshi --verbose serve --variant tiny --device cpu --offline` (with `--record DIR` or
without), holds one conversation of --seconds of audio, and stops it. The frame times are upstream's own
"frame handled in N ms" lines; the memory is the moshi.server child's RSS, sampled every second; CPU is
its user+system time. The two arms run at the same time, one torch thread each by default, so that
whatever else the machine does hits both alike (--one-at-a-time runs them in turn: without, then with).

The tiny model on a CPU is slower than real time, so a client sending in real time would pile audio up
in the server's buffer and the memory would grow for that reason alone. The client here sends a frame
only when the server has answered all but --ahead of the frames already sent (and never faster than
real time): the server always has work, and its buffer stays small.

    .venv/bin/python bench/record.py [--seconds 300] [--repeat 1] [--threads 1] [--ahead 4] [--one-at-a-time]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from jmoshi_cli.audio_io import FRAME_S, FRAME_SIZE, SAMPLE_RATE
from jmoshi_cli.selftest import free_port, speech_like
from jmoshi_cli.serving.server_log import frame_ms

from _common import BENCH_TOKEN, BIN, bench_env, tiny_hub_root
from hub_server import LocalHub


@dataclass
class Arm:
    label: str
    frames_ms: list[float] = field(default_factory=list)
    rss_mb: list[tuple[float, float]] = field(default_factory=list)  # (seconds into the conversation, MB)
    cpu_s: float = 0.0
    frames_sent: int = 0
    wall_s: float = 0.0
    recorded: dict = field(default_factory=dict)


def child_of(pid: int) -> int | None:
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                cmdline = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if int(stat[1]) == pid and b"jmoshi_cli.moshi_child" in cmdline:
                return int(entry.name)
    return None


def rss_mb(pid: int) -> float:
    text = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+) kB", text).group(1)) / 1024


def cpu_seconds(pid: int) -> float:
    stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(stat[11]) + int(stat[12])) / os.sysconf("SC_CLK_TCK")


async def paced_conversation(url: str, pcm: np.ndarray, ahead: int) -> int:
    """Send `pcm` frame by frame, never more than `ahead` frames ahead of the answers; returns frames sent."""
    import aiohttp

    from jmoshi_cli.serving.opus import OpusStream

    opus = OpusStream(SAMPLE_RATE)
    received = 0
    answered = asyncio.Event()
    auth = {"Authorization": f"Bearer {BENCH_TOKEN}"}
    async with aiohttp.ClientSession() as session, session.ws_connect(url, max_msg_size=0, headers=auth) as ws:
        assert (await ws.receive()).data == b"\x00"

        async def listen() -> None:
            nonlocal received
            async for message in ws:
                if message.type == aiohttp.WSMsgType.BINARY and message.data[:1] == b"\x01":
                    received += opus.decode(message.data[1:]).shape[0]
                    answered.set()

        listener = asyncio.create_task(listen())
        started = time.monotonic()
        frames = len(pcm) // FRAME_SIZE
        for i in range(frames):
            while i - received // FRAME_SIZE > ahead:
                answered.clear()
                await answered.wait()
            await asyncio.sleep(max(started + i * FRAME_S - time.monotonic(), 0))
            payload = opus.encode(pcm[i * FRAME_SIZE:(i + 1) * FRAME_SIZE])
            if payload:
                await ws.send_bytes(b"\x01" + payload)
        while received // FRAME_SIZE < frames - ahead - 2:
            answered.clear()
            await asyncio.wait_for(answered.wait(), 30)
        listener.cancel()
    return frames


def run_arm(arm: Arm, env: dict, pcm: np.ndarray, ahead: int, record: Path | None) -> None:
    port = free_port()
    argv = [str(BIN / "jmoshi"), "--verbose", "serve", "--variant", "tiny", "--device", "cpu", "--offline",
            "--port", str(port), *(["--record", str(record)] if record else [])]
    log = tempfile.TemporaryFile()
    process = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=log, text=True, start_new_session=True)
    try:
        process.stdout.readline()  # the URL: ready
        child = child_of(process.pid)
        done = threading.Event()
        sampler = threading.Thread(target=sample_rss, args=(arm, child, done), daemon=True)
        cpu_before, started = cpu_seconds(child), time.monotonic()
        sampler.start()
        arm.frames_sent = asyncio.run(paced_conversation(f"ws://127.0.0.1:{port}/api/chat", pcm, ahead))
        arm.wall_s = time.monotonic() - started
        arm.cpu_s = cpu_seconds(child) - cpu_before
        done.set()
        sampler.join()
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(60)
    log.seek(0)
    arm.frames_ms = [ms for ms in map(frame_ms, log.read().decode("utf-8", "replace").splitlines()) if ms is not None]
    if record:
        arm.recorded = recorded_summary(record)


def sample_rss(arm: Arm, pid: int, done: threading.Event) -> None:
    started = time.monotonic()
    while not done.wait(1.0):
        arm.rss_mb.append((time.monotonic() - started, rss_mb(pid)))


def recorded_summary(folder: Path) -> dict:
    (session,) = [p for p in folder.iterdir() if p.is_dir()]
    meta = json.loads((session / "meta.json").read_text())
    return {"frames": meta["frames"], "dropped_frames": meta["dropped_frames"], "ended": meta["ended"],
            "MB": round(sum(p.stat().st_size for p in session.iterdir()) / 1e6, 1)}


def p95(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[max(int(np.ceil(0.95 * len(ordered))) - 1, 0)]


def memory(arm: Arm) -> str:
    """RSS once the conversation is under way (10 % in), at its end, the peak, and the trend over its second half."""
    points = arm.rss_mb
    if len(points) < 4:
        return "too short to sample"
    start = points[len(points) // 10][1]
    half = points[len(points) // 2:]
    slope = np.polyfit([t for t, _ in half], [m for _, m in half], 1)[0] * 60
    return (f"RSS {start:.0f} -> {points[-1][1]:.0f} MB (peak {max(m for _, m in points):.0f}), "
            f"{slope:+.2f} MB/min over the second half")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=300.0, help="audio per conversation")
    parser.add_argument("--repeat", type=int, default=1, help="pairs of arms (without, with)")
    parser.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of the server (0: torch's default)")
    parser.add_argument("--ahead", type=int, default=4, help="frames the client may send ahead of the answers")
    parser.add_argument("--one-at-a-time", action="store_true", help="run the arms in turn, not together")
    args = parser.parse_args()
    pcm = speech_like(args.seconds)
    work = Path(tempfile.mkdtemp(prefix="jmoshi-bench-record-"))
    with LocalHub(tiny_hub_root()) as hub:
        env = bench_env(hub.endpoint, work / "cache")
        subprocess.run([str(BIN / "jmoshi"), "download", "--variant", "tiny"], env=env, capture_output=True, check=True)
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    arms = {"without --record": [], "with --record": []}
    for i in range(args.repeat):
        pair = [(Arm("without --record"), None), (Arm("with --record"), work / f"rec{i}")]
        runs = [threading.Thread(target=run_arm, args=(arm, env, pcm, args.ahead, record)) for arm, record in pair]
        for run in runs:
            run.start()
            if args.one_at_a_time:
                run.join()
        for run in runs:
            run.join()
        for arm, _ in pair:
            arms[arm.label].append(arm)
    shutil.rmtree(work, ignore_errors=True)
    report(arms, args)


def report(arms: dict[str, list[Arm]], args) -> None:
    print(f"tiny model, CPU ({os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at the end), "
          f"OMP_NUM_THREADS={args.threads or 'default'}, {args.seconds:g} s of audio per conversation, "
          f"{args.repeat} conversation(s) per arm, {'one at a time' if args.one_at_a_time else 'both arms at once'}, "
          f"client at most {args.ahead} frames ahead")
    for label, runs in arms.items():
        frames = [ms for arm in runs for ms in arm.frames_ms]
        cpu_ms = 1000 * sum(a.cpu_s for a in runs) / max(sum(a.frames_sent for a in runs), 1)
        print(f"{label:<17} {len(frames)} frames: median {statistics.median(frames):.1f} ms, p95 {p95(frames):.1f} ms, "
              f"server CPU {cpu_ms:.1f} ms per frame; {sum(a.wall_s for a in runs):.0f} s wall")
        for arm in runs:
            print(f"{'':<17} {memory(arm)}" + (f"; recorded {arm.recorded}" if arm.recorded else ""))


if __name__ == "__main__":
    main()
