"""`serve --conversations N` measured: the batched engine (jmoshi_cli/engine/torch_batched.py) in-process, and
end to end against N separate servers.

Engine (default): per-step time at N conversations on one loaded model against N models stepped one after
the other (what N separate servers sharing the device cost per 80 ms tick), in the same run; and the memory
each added conversation takes (the bytes of every tensor in Mimi's and the LM's streaming state, the
process's RSS) against engine/memory.py's per_conversation_bytes.

    .venv/bin/python bench/batch.py [--slots 1 2 4 8] [--steps 40] [--device cpu|cuda] [--dtype D] [--json F]

The tiny model (tests' random checkpoint, float32 by default) unless `--repo DIR`: moshi weights
(model.safetensors), Mimi (tokenizer-e351c8d8-checkpoint125.safetensors) and the text tokenizer, with a
config.json, or without one for moshi's built-in 7B (J-Moshi's; bfloat16 by default). A J-Moshi-shaped
checkpoint with random weights (15.4 GB, about a minute to write) and the 7B on the CPU, a few steps each
(one step is seconds):

    .venv/bin/python bench/random_checkpoint.py /work/bench-7b
    .venv/bin/python bench/batch.py --repo /work/bench-7b --slots 1 2 4 --steps 4 --warmup 2 --json 7b.json

With --repo on the CPU (a shared machine): before loading, it waits (polling every 30 s, up to 20
minutes) until MemAvailable is 20 GiB (--min-free-gib) and covers the weights and one conversation; the
weights are then copied out of the file's mapping into the process's memory (a short machine shows as a
wait, not as evicted weight pages read back during a timed step); before each N it waits up to 5 minutes
for that N's streaming state and half a GiB more, and skips the N if it never comes. Everything is freed
at the end. Reported per N: step p50/p95 ms, conversations' frames per second, the 80 ms frame budget
met or not, N one-slot steps (measured at N = 1) and the speedup; the state's bytes per conversation,
the RSS growth, and the state added per conversation against engine.memory.per_conversation_bytes.

Servers (`--servers`): for each N (--slots, default 1 2 4), one `jmoshi --verbose serve --variant tiny
--device cpu --offline --idle-timeout 600 --conversations N` and, separately, N of the same without
--conversations on N ports (the tiny model from a loopback hub, bfloat16 as serve loads it), each
driven by N clients at once (jmoshi_cli.serving.chat.chat, the access token of JMOSHI_TOKEN) with
--seconds of audio each, sent as fast as the server takes it (--realtime: paced as a browser sends).
Per conversation: handshake time, frames answered per second (the client's clock: answered frames over
first to last audio received); per server: its "frame handled in" times (one per step: a step covers
every slot that had a frame). Every server process gets the CPU threads `jmoshi serve --device cpu`
gives it: cores - 1 (the N separate ones are plain serves, not --replicas, so they do not split the
cores between them: on 2 cores, 1 thread each).

    .venv/bin/python bench/batch.py --servers [--slots 1 2 4] [--seconds 6] [--realtime] [--json F]

With N = 1 both sides are the same command (`--conversations 1` runs moshi.server itself): the run's noise.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from _common import BENCH_TOKEN, BIN, Served, bench_env, emit_json, rss_bytes, tiny_hub_root, wait_for_memory  # noqa: E402, I001

FRAME = 1920
MODEL = "model.safetensors"
MIMI = "tokenizer-e351c8d8-checkpoint125.safetensors"
TOKENIZER = "tokenizer_spm_32k_3.model"
GIB = 2**30


# --- the engine in-process ---------------------------------------------------------------------------------


def lm_kwargs(repo: Path) -> dict:
    """The LM's kwargs: the repo's config.json, else moshi's built-in 7B (J-Moshi's)."""
    from jmoshi_cli.upstream.moshi_private import builtin_lm_kwargs

    config = repo / "config.json"
    return json.loads(config.read_text()) if config.exists() else builtin_lm_kwargs()


def load(repo: Path, device: str, dtype: str):
    import torch
    from moshi.models import loaders

    if (repo / "config.json").exists():
        info = loaders.CheckpointInfo.from_hf_repo("bench/batch", repo / MODEL, repo / MIMI, repo / TOKENIZER,
                                                   config_path=repo / "config.json")
        return info.get_mimi(device=device), info.get_moshi(device=device, dtype=getattr(torch, dtype))
    # No config.json: moshi's built-in 7B, as moshi loads J-Moshi's repositories (without asking a hub for one).
    mimi = loaders.get_mimi(repo / MIMI, device=device)
    return mimi, loaders.get_moshi_lm(repo / MODEL, lm_kwargs=None, device=device, dtype=getattr(torch, dtype))


def in_ram(*modules) -> None:
    """Every parameter and buffer copied out of the safetensors file's mapping (where moshi's loader leaves
    them on the CPU) into the process's own memory, one tensor at a time: MemAvailable then tells what is
    left for the conversations' state, and a short machine makes the run wait or skip an N rather than
    read evicted weight pages back from disk in the middle of a timed step."""
    import torch

    with torch.no_grad():
        for module in modules:
            for tensor in [*module.parameters(), *module.buffers()]:
                tensor.data = tensor.data.clone()


def batched_steps(mimi, lm, slots: int, steps: int, warmup: int, pcm: np.ndarray) -> tuple[list[float], dict]:
    """Step times (ms, after `warmup` steps) at `slots` open conversations, and the memory they hold."""
    from jmoshi_cli.engine.torch_batched import BatchedEngine
    from jmoshi_cli.upstream.moshi_private import streaming_state_bytes

    times = []
    rss_before = rss_bytes()
    with BatchedEngine(mimi, lm, slots=slots, use_sampling=False) as engine:
        opened = [engine.open() for _ in range(slots)]
        for i in range(warmup + steps):
            for n, slot in enumerate(opened):
                start = ((i + 7 * n) % (len(pcm) // FRAME)) * FRAME  # each conversation its own audio
                engine.feed(slot, pcm[start:start + FRAME])
            began = time.perf_counter()
            engine.step()
            times.append(1000 * (time.perf_counter() - began))
        memory = {"state_bytes": streaming_state_bytes(mimi, engine.lm_gen),
                  "rss_delta_bytes": rss_bytes() - rss_before}
    return times[warmup:], memory


def summary(times: list[float], slots: int) -> dict:
    p95 = sorted(times)[int(0.95 * (len(times) - 1))]
    p50 = statistics.median(times)
    return {"slots": slots, "step_p50_ms": round(p50, 1), "step_p95_ms": round(p95, 1),
            "frames_per_s": round(slots * 1000 / p50, 2), "real_time": p95 <= 80.0, "steps": len(times)}


def engine_main(args: argparse.Namespace) -> None:
    import gc

    import torch

    from jmoshi_cli.engine.memory import per_conversation_bytes
    from jmoshi_cli.selftest import speech_like
    from jmoshi_cli.tiny_model import cached_tiny_repo

    slots = args.slots or [1, 2, 4, 8]
    repo = args.repo or cached_tiny_repo()
    dtype = args.dtype or ("bfloat16" if args.repo else "float32")
    kwargs = lm_kwargs(repo)
    per_conversation = per_conversation_bytes(kwargs)
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    if args.repo:  # a full-size model on a shared machine: only with room for the weights and one conversation
        weights = (repo / MODEL).stat().st_size * (2 if dtype == "float32" else 1) + (repo / MIMI).stat().st_size
        wait_for_memory(max(args.min_free_gib * GIB, weights + per_conversation + GIB))
    loaded = time.perf_counter()
    mimi, lm = load(repo, args.device, dtype)
    if args.repo and args.device == "cpu":
        in_ram(mimi, lm)
    load_s = time.perf_counter() - loaded
    print(f"loaded {repo} ({dtype}, {args.device}, {torch.get_num_threads()} threads) in {load_s:.0f} s",
          file=sys.stderr)
    pcm = speech_like(4.0)
    rows, one = [], None
    for n in [1, *[s for s in slots if s != 1]]:  # N = 1 first: every row's "N separate" needs it
        if args.repo and args.device == "cpu":  # N conversations' state, and half a GiB for the step's activations
            try:
                wait_for_memory(per_conversation * n + GIB // 2, timeout_s=300)
            except SystemExit as exc:
                print(f"N={n}: skipped ({exc})", file=sys.stderr)
                continue
        times, memory = batched_steps(mimi, lm, n, args.steps, args.warmup, pcm)
        gc.collect()
        row = summary(times, n)
        row.update(state_bytes=memory["state_bytes"], state_bytes_per_conversation=memory["state_bytes"] // n,
                   rss_delta_bytes=memory["rss_delta_bytes"])
        if n == 1:
            one = row
        if one is not None:
            # N separate models stepped in turn on the same device: N one-slot steps per tick.
            row["separate_step_p50_ms"] = round(one["step_p50_ms"] * n, 1)
            row["speedup"] = round(row["separate_step_p50_ms"] / row["step_p50_ms"], 2)
        if n in slots:
            rows.append(row)
        print(f"N={n}: step p50 {row['step_p50_ms']} ms, p95 {row['step_p95_ms']} ms ({row['frames_per_s']} "
              f"conversation frames/s); N separate: {row.get('separate_step_p50_ms')} ms per tick; "
              f"{row.get('speedup')}x; state {row['state_bytes'] / 1e9:.3f} GB "
              f"({row['state_bytes_per_conversation'] / 1e9:.3f} GB each), RSS +{row['rss_delta_bytes'] / 1e9:.2f} GB",
              file=sys.stderr)
    # What one more conversation holds: the state's growth from the smallest N measured to the largest.
    added = None
    if len(rows) >= 2:
        low, high = rows[0], rows[-1]
        added = (high["state_bytes"] - low["state_bytes"]) // (high["slots"] - low["slots"])
    result = {"repo": str(repo), "device": args.device, "dtype": dtype, "loadavg_at_end": os.getloadavg(),
              "threads": torch.get_num_threads() if args.device == "cpu" else None, "load_s": round(load_s, 1),
              "lm_layers": kwargs["num_layers"], "lm_dim": kwargs["dim"], "context": kwargs["context"],
              "rows": rows, "state_bytes_per_added_conversation": added,
              "formula_bytes_per_conversation": per_conversation}
    print_engine_table(result)
    del mimi, lm
    gc.collect()
    emit_json(result, args.json_path)


def print_engine_table(result: dict) -> None:
    out = sys.stderr
    print(f"\n{result['repo']} ({result['lm_layers']} layers, dim {result['lm_dim']}), {result['device']}, "
          f"{result['dtype']}, {result['threads']} thread(s)", file=out)
    print(f"{'N':>3} {'step p50 ms':>12} {'p95 ms':>9} {'conv frames/s':>14} {'N x 1-slot ms':>14} {'speedup':>8} "
          f"{'state GB/conv':>14} {'RSS +GB':>8}", file=out)
    for row in result["rows"]:
        print(f"{row['slots']:>3} {row['step_p50_ms']:>12.1f} {row['step_p95_ms']:>9.1f} {row['frames_per_s']:>14.2f} "
              f"{row.get('separate_step_p50_ms', float('nan')):>14.1f} {row.get('speedup', float('nan')):>8.2f} "
              f"{row['state_bytes_per_conversation'] / 1e9:>14.3f} {row['rss_delta_bytes'] / 1e9:>8.2f}", file=out)
    added = result["state_bytes_per_added_conversation"]
    formula = result["formula_bytes_per_conversation"]
    if added is not None:
        print(f"state per added conversation: {added / 1e9:.3f} GB measured, {formula / 1e9:.3f} GB by "
              f"engine.memory.per_conversation_bytes (x{added / formula:.3f})", file=out)


# --- end to end: servers and clients ---------------------------------------------------------------------


def voice(i: int, seconds: float) -> np.ndarray:
    """A different voice for each client: the test signal shifted and scaled."""
    from jmoshi_cli.selftest import speech_like

    return (np.roll(speech_like(seconds), 3000 * i) * (0.6 + 0.1 * (i % 4))).astype(np.float32)


async def one_conversation(url: str, pcm: np.ndarray, realtime: bool, quiet_s: float, tail_s: float) -> dict:
    """One client's conversation; when its audio came (the client's clock)."""
    from jmoshi_cli.serving.chat import chat

    began = time.monotonic()
    seen = {"first": None, "last": None, "samples": 0}

    def first_audio() -> None:
        seen["first"] = time.monotonic()

    def until(result) -> bool:
        # Polled (every 50 ms) once every frame is sent: the last time the audio grew, and enough once it
        # has not for quiet_s (so a server slower than the client is waited for, up to tail_s).
        now = time.monotonic()
        if result.audio_samples > seen["samples"]:
            seen["samples"], seen["last"] = result.audio_samples, now
        return seen["last"] is not None and now - seen["last"] > quiet_s

    result = await chat(url, pcm, token=BENCH_TOKEN, realtime=realtime, tail_s=tail_s, until=until,
                        on_audio=first_audio, timeout_s=300)
    answered = result.audio_samples / FRAME
    first, last = seen["first"], seen["last"]
    span = (last - first) if first is not None and last is not None else float("nan")
    return {"handshake_s": round(result.handshake_s, 3), "sent_frames": result.sent_frames,
            "answered_frames": round(answered, 1),
            "first_audio_s": round(first - began, 3) if first is not None else None,
            "answered_fps": round((answered - 1) / span, 2) if span and span > 0 else None,
            "text_pieces": len(result.text_pieces)}


async def conversations(urls: list[str], seconds: float, realtime: bool, quiet_s: float, tail_s: float) -> list[dict]:
    return list(await asyncio.gather(*(one_conversation(url, voice(i, seconds), realtime, quiet_s, tail_s)
                                       for i, url in enumerate(urls))))


def ms_stats(times: list[float]) -> dict:
    if not times:
        return {"frames": 0}
    return {"frames": len(times), "p50_ms": round(statistics.median(times), 1),
            "p95_ms": round(sorted(times)[int(0.95 * (len(times) - 1))], 1),
            "mean_ms": round(statistics.mean(times), 1)}


def run_setup(label: str, argvs: list[list[str]], env: dict, clients: int, args: argparse.Namespace) -> dict:
    """Start the servers (all at once), wait for them, drive `clients` conversations spread over them."""
    from jmoshi_cli.selftest import free_port

    ports = [free_port() for _ in argvs]
    servers = [Served([*argv, "--port", str(port)], env) for argv, port in zip(argvs, ports, strict=True)]
    try:
        ready = [server.wait_ready() for server in servers]
        warm = [len(server.frame_times()) for server in servers]  # the warm-up's lines, if any, are not the run's
        urls = [f"ws://127.0.0.1:{ports[i % len(ports)]}/api/chat" for i in range(clients)]
        began = time.perf_counter()
        talks = asyncio.run(conversations(urls, args.seconds, args.realtime, args.quiet_s, args.tail_s))
        wall = time.perf_counter() - began
        frame_lists = [server.frame_times()[skip:] for server, skip in zip(servers, warm, strict=True)]
    finally:
        for server in servers:
            server.stop()
    fps = [talk["answered_fps"] for talk in talks if talk["answered_fps"]]
    return {"setup": label, "servers": len(servers), "conversations": clients,
            "ready_s": round(max(ready), 1), "wall_s": round(wall, 1), "per_conversation": talks,
            "answered_fps_mean": round(statistics.mean(fps), 2) if fps else None,
            "answered_fps_total": round(sum(fps), 2) if fps else None,
            "handshake_s_max": max(talk["handshake_s"] for talk in talks),
            "server_frames": [ms_stats(times) for times in frame_lists]}


def servers_main(args: argparse.Namespace) -> None:
    from jmoshi_cli.backends import cpu_threads

    from hub_server import LocalHub

    slots = args.slots or [1, 2, 4]
    work = Path(tempfile.mkdtemp(prefix="jmoshi-bench-batch-"))
    common = ["--variant", "tiny", "--device", "cpu", "--offline", "--idle-timeout", "600"]
    rows = []
    try:
        with LocalHub(tiny_hub_root()) as hub:
            env = bench_env(hub.endpoint, work / "cache")
            subprocess.run([str(BIN / "jmoshi"), "download", "--variant", "tiny"], env=env, check=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            for n in slots:
                batched = run_setup(f"1 server --conversations {n}", [[*common, "--conversations", str(n)]], env, n,
                                    args)
                separate = run_setup(f"{n} plain servers", [common] * n, env, n, args)
                rows.append({"n": n, "batched": batched, "separate": separate})
                for setup in (batched, separate):
                    print(f"N={n} {setup['setup']}: {setup['answered_fps_mean']} answered frames/s per conversation "
                          f"({setup['answered_fps_total']} in all), handshake <= {setup['handshake_s_max']} s",
                          file=sys.stderr)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    cores = len(os.sched_getaffinity(0))
    result = {"model": "tiny", "device": "cpu", "cores": cores, "threads_per_server": cpu_threads(1, cores),
              "loadavg_at_end": os.getloadavg(),
              "seconds_of_audio": args.seconds, "realtime": args.realtime, "rows": rows}
    print_servers_table(result)
    emit_json(result, args.json_path)


def print_servers_table(result: dict) -> None:
    out = sys.stderr
    pacing = "paced in real time" if result["realtime"] else "sent as fast as the server takes it"
    print(f"\ntiny model, CPU ({result['cores']} cores, {result['threads_per_server']} torch thread(s) per server), "
          f"{result['seconds_of_audio']:g} s of audio per conversation, {pacing}", file=out)
    print(f"{'N':>2} {'setup':<28} {'frames/s per conv':>18} {'all':>7} {'handshake s':>12} "
          f"{'server ms/step p50':>19} {'steps':>6} {'ready s':>8}", file=out)
    for row in result["rows"]:
        for key in ("batched", "separate"):
            setup = row[key]
            frames = [s for s in setup["server_frames"] if s["frames"]]
            p50 = statistics.median(s["p50_ms"] for s in frames) if frames else float("nan")
            steps = sum(s["frames"] for s in frames)
            handshakes = [t["handshake_s"] for t in setup["per_conversation"]]
            print(f"{row['n']:>2} {setup['setup']:<28} {setup['answered_fps_mean'] or float('nan'):>18.2f} "
                  f"{setup['answered_fps_total'] or float('nan'):>7.2f} "
                  f"{statistics.median(handshakes):>5.3f}/{max(handshakes):<6.3f} {p50:>19.1f} {steps:>6} "
                  f"{setup['ready_s']:>8.1f}", file=out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slots", type=int, nargs="+", help="the Ns (default 1 2 4 8; with --servers 1 2 4)")
    parser.add_argument("--json", dest="json_path")
    engine = parser.add_argument_group("engine")
    engine.add_argument("--steps", type=int, default=40, help="steps timed at each N")
    engine.add_argument("--warmup", type=int, default=3, help="steps before those (allocators, kernels)")
    engine.add_argument("--device", default="cpu")
    engine.add_argument("--dtype", help="float32 (tiny model's default) or bfloat16 (--repo's default)")
    engine.add_argument("--threads", type=int, default=1, help="torch's CPU threads (default 1, as serve on 2 cores)")
    engine.add_argument("--repo", type=Path, help="a folder with moshi's file names (default: the tiny model)")
    engine.add_argument("--min-free-gib", type=float, default=20.0,
                        help="with --repo: MemAvailable to wait for before loading (default 20)")
    servers = parser.add_argument_group("servers")
    servers.add_argument("--servers", action="store_true", help="end to end: jmoshi serve processes and clients")
    servers.add_argument("--seconds", type=float, default=6.0, help="audio per conversation")
    servers.add_argument("--realtime", action="store_true", help="clients send at 12.5 frames/s, as a browser")
    servers.add_argument("--quiet-s", type=float, default=2.0, help="a conversation ends once no audio came for this")
    servers.add_argument("--tail-s", type=float, default=300.0, help="the most a client waits after its last frame")
    args = parser.parse_args()
    servers_main(args) if args.servers else engine_main(args)


if __name__ == "__main__":
    main()
