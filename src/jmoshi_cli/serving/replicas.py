"""Many conversations at once: N moshi.server replicas behind one HAProxy front.

Each replica is a moshi.server child on 127.0.0.1 and its own port and device; HAProxy (haproxy.py)
gives each one conversation and queues the rest. This module decides where replicas go (`place`)
and keeps them running (`Fleet`): a replica that crashes is taken out of rotation, restarted with
backoff, and put back once HAProxy's health check sees it; one that never starts does not stop the
others unless none start. On SIGINT/SIGTERM the front drains: no new conversations, running ones
finish (up to the drain timeout), then everything stops. A second signal stops at once.
"""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass

from .. import hardware
from ..backends import ServerSpec, cpu_threads, render
from ..backends.contract import Launch
from ..errors import PreflightError, ServerError, UsageError
from ..model.precision import Precision
from ..reporter import Reporter
from .child import Server, StopSignals, explain_exit
from .haproxy import Backend, Front, Load

RESTART_DELAYS_S = (1, 2, 4, 8, 16, 30)
GIVE_UP_AFTER = 5  # failed starts in a row, before the replica was ever healthy
HEALTHY_RESETS_S = 60.0  # a replica healthy this long starts its backoff from the beginning again
STATUS_EVERY_S = 60.0  # the load is shown when it changes, and at least this often
TICK_S = 0.2


@dataclass(frozen=True)
class Placement:
    """Where one replica runs."""

    name: str
    device: str  # cpu or cuda:N
    port: int
    threads: int | None = None  # CPU threads, when on the CPU


def parse_gpus(text: str | None) -> list[int] | None:
    if not text:
        return None
    try:
        gpus = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise UsageError(f"--gpus {text!r} is not a list of GPU indices", "e.g. --gpus 0,1") from None
    if not gpus or any(g < 0 for g in gpus) or len(set(gpus)) != len(gpus):
        raise UsageError(f"--gpus {text!r} is not a list of distinct GPU indices", "e.g. --gpus 0,1")
    return gpus


def parse_count(text: str) -> int | None:
    """--replicas: a number, or `auto` (None: as many as free memory allows)."""
    if text == "auto":
        return None
    if not text.isdigit() or int(text) < 1:
        raise UsageError(f"--replicas {text!r} is not a positive number or `auto`", "e.g. --replicas 2")
    return int(text)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass(frozen=True)
class Need:
    """GPU memory one replica needs, per precision the run may use."""

    bf16_gb: float
    int8_gb: float | None = None  # None: int8 is not possible here (runtime, fine-tune, variant)


def place(count: int | None, device: str, gpus: list[int] | None, need: Need,
          precision: Precision = Precision.AUTO, cores: int | None = None) -> tuple[list[Placement], Precision]:
    """Decide each replica's device and the precision of all: on the CPU, share the cores; on GPUs,
    fill free memory in turn, in bf16 when the replicas asked for fit, else (auto) in int8, as a
    single `serve` falls back to int8 when bf16 does not fit."""
    if device == "cpu":
        if gpus:
            raise UsageError("--gpus with --device cpu", "drop --gpus, or use --device cuda")
        count = count or 1
        chosen = Precision.INT8 if precision is Precision.INT8 else Precision.BF16
        return [Placement(f"r{i}", "cpu", free_port(), cpu_threads(count, cores)) for i in range(count)], chosen
    available, chosen_gpus = _gpus(gpus)
    if precision is Precision.INT8:
        return _place_on_gpus(count, available, chosen_gpus, need.int8_gb or need.bf16_gb), Precision.INT8
    if precision is Precision.AUTO and need.int8_gb is not None:
        bf16_room = sum(_room(available, chosen_gpus, need.bf16_gb).values())
        if bf16_room == 0 or (count is not None and bf16_room < count):
            int8_room = sum(_room(available, chosen_gpus, need.int8_gb).values())
            if int8_room > bf16_room and (count is None or int8_room >= count):
                return _place_on_gpus(count, available, chosen_gpus, need.int8_gb), Precision.INT8
    return _place_on_gpus(count, available, chosen_gpus, need.bf16_gb), Precision.BF16


def _room(available: dict, chosen: list[int], gb: float) -> dict[int, int]:
    return {g: int(available[g].free_bytes // (gb * 1e9)) if gb else 64 for g in chosen}


def _gpus(gpus: list[int] | None) -> tuple[dict, list[int]]:
    probe = hardware.nvidia()
    if not probe.ok or not probe.value.gpus:
        why = probe.error if not probe.ok else "the NVIDIA driver sees no GPU"
        raise PreflightError(f"no usable NVIDIA GPU: {why}", "run `jmoshi doctor`, or use --device cpu for tests")
    available = {g.index: g for g in probe.value.gpus}
    chosen = gpus if gpus is not None else sorted(available)
    unknown = [g for g in chosen if g not in available]
    if unknown:
        raise UsageError(f"--gpus: no GPU {unknown[0]} on this machine ({len(available)} GPU(s))",
                         "run `nvidia-smi -L` to see the indices")
    return available, chosen


def _place_on_gpus(count: int | None, available: dict, chosen: list[int], vram_min_gb: float) -> list[Placement]:
    room = _room(available, chosen, vram_min_gb)
    total = sum(room.values())
    if total == 0:
        best = max(chosen, key=lambda g: available[g].free_bytes)
        raise PreflightError(f"no GPU has room for a replica: {available[best].name} has "
                             f"{available[best].free_bytes / 1e9:.1f} GB free, one replica needs {vram_min_gb:g} GB",
                             "stop other GPU processes (`nvidia-smi`)")
    wanted = total if count is None else count
    if wanted > total:
        raise PreflightError(f"{wanted} replicas do not fit: the chosen GPUs have room for {total}",
                             f"use --replicas {total} (or `auto`), or add GPUs with --gpus")
    order = [g for round_ in range(max(room.values())) for g in chosen if room[g] > round_]
    return [Placement(f"r{i}", f"cuda:{order[i]}", free_port()) for i in range(wanted)]


def replica_launch(base: ServerSpec, where: Placement) -> Launch:
    """The single server, moved to this replica's loopback port (TLS ends at the front), device and
    CPU share; its name goes into each recording's meta.json."""
    return render(base.on_loopback(where.port, where.device, where.threads, where.name))


# --- keeping replicas running ----------------------------------------------------------------------


@dataclass
class Replica:
    where: Placement
    launch: Launch
    server: Server | None = None
    failures: int = 0  # starts in a row that ended before it was healthy
    restart_at: float = 0.0
    healthy_since: float | None = None
    ever_healthy: bool = False
    restarted: bool = False  # crashed and started again: "back in rotation" once it is healthy
    in_rotation: bool = False  # jmoshi has told HAProxy to use it (it listens)
    gave_up: bool = False
    last_error: ServerError | None = None


class Fleet:
    """The replicas and the front, supervised from the main thread."""

    def __init__(self, front: Front, replicas: list[Replica], report: Reporter, launch: Launch,
                 drain_timeout_s: float):
        self.front = front
        self.replicas = replicas
        self.report = report
        self.launch = launch  # the front's address, for "ready"
        self.drain_timeout_s = drain_timeout_s
        self.started = time.monotonic()
        self.ready = False
        self.last_load: Load | None = None
        self.last_status = 0.0

    def run(self) -> int:
        with StopSignals().installed() as signals:
            try:
                for replica in self.replicas:
                    self._start(replica)
                self.front.start(self.report.other_relay())
                while not signals.received:
                    self._tick()
                    time.sleep(TICK_S)
                return self._drain(signals)
            finally:
                self.stop_all()

    def _start(self, replica: Replica) -> None:
        relay = self.report.relay(replica.launch.name, replica.where.name)
        replica.server = Server(replica.launch, relay=relay).start()

    def _tick(self) -> None:
        if not self.front.alive():
            raise ServerError("HAProxy stopped on its own", "see its output above; run `jmoshi doctor`")
        now = time.monotonic()
        load = self.front.load()
        for replica in self.replicas:
            self._watch(replica, load, now)
        if self.replicas and all(r.gave_up for r in self.replicas):
            first = next((r.last_error for r in self.replicas if r.last_error), None)
            raise first or ServerError("no replica could start")
        if load is not None:
            self._report(load, now)

    def _watch(self, replica: Replica, load: Load | None, now: float) -> None:
        name = replica.where.name
        if replica.gave_up:
            return
        process = replica.server.process if replica.server else None
        if process is not None and process.poll() is not None:
            self._crashed(replica, now)
        elif process is None and now >= replica.restart_at:
            self.report.event(f"{name}: restarting")
            self._start(replica)
        elif process is not None and not replica.in_rotation and _listens(replica.where.port):
            # Not taken (the runtime socket timed out): the next tick asks again, or it would stay out.
            replica.in_rotation = self.front.set_state(name, "ready")
        state = next((s for s in load.servers if s.name == name), None) if load else None
        if state is not None and state.up and replica.server is not None:
            if replica.healthy_since is None:
                replica.healthy_since = now
                # After a crash, whether or not a tick saw it healthy before (the front's stats can time
                # out on a busy machine, so a replica may serve before jmoshi has seen it up).
                if replica.restarted:
                    self.report.event(f"{name}: back in rotation")
                    replica.restarted = False
                replica.ever_healthy = True
            if now - replica.healthy_since > HEALTHY_RESETS_S:
                replica.failures = 0

    def _crashed(self, replica: Replica, now: float) -> None:
        server = replica.server
        assert server is not None and server.process is not None  # _watch saw its process exit
        server.drain()
        error = explain_exit(server.process.returncode, list(server.tail), name=server.launch.name)
        replica.server, replica.healthy_since, replica.last_error = None, None, error
        replica.restarted = True
        replica.in_rotation = False
        self.front.set_state(replica.where.name, "maint")
        replica.failures += 1
        if not replica.ever_healthy and replica.failures >= GIVE_UP_AFTER:
            replica.gave_up = True
            self.report.event(f"{replica.where.name}: gave up after {replica.failures} failed starts: "
                                f"{error.message}")
            return
        delay = RESTART_DELAYS_S[min(replica.failures, len(RESTART_DELAYS_S)) - 1]
        replica.restart_at = now + delay
        self.report.event(f"{replica.where.name}: {error.message}; out of rotation, restarting in {delay} s")
        if not self.ready and all(not r.ever_healthy and r.server is None for r in self.replicas):
            raise error

    def _report(self, load: Load, now: float) -> None:
        if not self.ready and load.serving and all_started(self.replicas, load):
            self.ready = True
            self.report.ready(self.launch, now - self.started, f"{load.healthy}/{len(load.servers)}")
        changed = self.last_load is None or (load.active, load.queued, load.healthy) != (
            self.last_load.active, self.last_load.queued, self.last_load.healthy)
        if self.ready and (changed or now - self.last_status > STATUS_EVERY_S):
            self.report.load(load)
            self.last_load, self.last_status = load, now

    def _drain(self, signals: StopSignals) -> int:
        first = signals.received[0]
        for replica in self.replicas:
            self.front.set_state(replica.where.name, "drain")
        deadline = time.monotonic() + self.drain_timeout_s
        load = self.front.load()
        if load is not None and load.active:
            self.report.event(f"draining: {load.active} conversation(s) may finish "
                                f"(up to {self.drain_timeout_s:g} s; Ctrl-C again stops now)")
        while load is not None and load.active and time.monotonic() < deadline and len(signals.received) < 2:
            time.sleep(TICK_S)
            load = self.front.load()
        return 128 + first

    def stop_all(self) -> None:
        self.front.stop()
        for replica in self.replicas:
            if replica.server is not None:
                replica.server.stop(grace_s=5)


def all_started(replicas: list[Replica], load: Load) -> bool:
    """Every replica jmoshi started is in rotation, or has failed to start (it restarts with backoff):
    "ready" promises as many conversations at once as replicas, so two people who open the page then
    talk on two replicas, instead of one queued behind the other while a replica still loads.

    It also keeps conversations from queueing while replicas enter rotation: HAProxy (2.4 to 3.0, issue
    haproxy/haproxy#2744, seen with 2.6.12) hands a server that leaves maintenance or comes up the
    conversation queued for it without counting it against `maxconn 1`, and then gives it one more, which
    waits on moshi.server's lock with no handshake. After a crash, a restarted replica can still meet that."""
    healthy = {s.name for s in load.servers if s.up}
    return all(r.where.name in healthy or r.failures or r.gave_up for r in replicas)


def _listens(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


def backends_for(placements: list[Placement], slots: int = 1) -> list[Backend]:
    """One front backend per replica, each holding `slots` conversations at once (--conversations)."""
    return [Backend(p.name, "127.0.0.1", p.port, slots) for p in placements]
