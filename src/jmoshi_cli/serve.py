"""`jmoshi serve`: preflight in seconds, make every artifact local, then run moshi.server as a child.

Flow (`run`): options -> preflight (address, port, TLS, GPU; no model load) -> artifacts (cache,
download) -> Launch (argv and env, built by a pure function) -> child.supervise (start, relay output,
ready, stop). What a person sees is decided by the caller through `ServeHooks`.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from . import artifacts, preflight, tls
from .artifacts import ModelFiles
from .child import Launch
from .errors import UsageError
from .variants import Variant, load_catalogue


@dataclass(frozen=True)
class ServeOptions:
    variant: str | None = None
    host: str = "127.0.0.1"
    port: int = 8998
    device: str = "cuda"
    half: bool = False
    offline: bool = False
    https: bool = False
    ssl_dir: Path | None = None
    revision: str | None = None
    moshi_weight: Path | None = None
    # Many conversations: a number of replicas (or "auto") behind an HAProxy front; None: one server.
    replicas: str | None = None
    gpus: str | None = None
    queue_timeout_s: float = 180.0
    drain_timeout_s: float = 60.0


@dataclass(frozen=True)
class Prepared:
    """What preflight and the artifacts step decided, before anything starts."""

    launch: Launch
    variant: Variant
    ssl_dir: Path | None
    placements: list | None = None  # replicas.Placement for each replica, with --replicas


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# --- the flow ----------------------------------------------------------------------------------------


@dataclass
class ServeHooks:
    """How the caller shows what happens; the defaults show nothing."""

    on_note: Callable[[str], None] = lambda note: None
    watch_download: artifacts.WatchFactory | None = None
    on_starting: Callable[[Variant, Launch], None] = lambda variant, launch: None
    on_ready: Callable[[Launch, float], None] = lambda launch, seconds: None
    relay: Callable[[str], None] | None = None  # each line of the child's output, then "" once when it ends
    # With --replicas: one relay per replica (by name), the front's load, and replica events.
    make_relay: Callable[[str], Callable[[str], None] | None] = lambda name: None
    on_load: Callable[[object], None] = lambda load: None
    on_event: Callable[[str], None] = lambda text: None


def run(options: ServeOptions, hooks: ServeHooks | None = None) -> int:
    """Preflight, artifacts, launch, supervise; return jmoshi's exit code once the server stops."""
    from . import child

    hooks = hooks or ServeHooks()
    prepared = prepare(options, hooks)
    hooks.on_starting(prepared.variant, prepared.launch)
    if prepared.placements is not None:
        return _run_replicas(options, prepared, hooks)
    server = child.Server(prepared.launch, relay=hooks.relay)
    return child.supervise(server, lambda seconds: hooks.on_ready(prepared.launch, seconds))


def _run_replicas(options: ServeOptions, prepared: Prepared, hooks: ServeHooks) -> int:
    from dataclasses import replace

    from . import haproxy, replicas

    front = haproxy.Front(options.host, options.port, replicas.backends_for(prepared.placements),
                          options.queue_timeout_s, prepared.ssl_dir, managed=True)
    front_launch = replace(prepared.launch, host=options.host, port=options.port, scheme=front.scheme)
    fleet = replicas.Fleet(
        front, [replicas.Replica(p, replicas.replica_launch(prepared.launch, p)) for p in prepared.placements],
        replicas.FleetHooks(on_ready=lambda seconds: hooks.on_ready(front_launch, seconds), on_load=hooks.on_load,
                            on_event=hooks.on_event, make_relay=hooks.make_relay),
        options.drain_timeout_s)
    return fleet.run()


def prepare(options: ServeOptions, hooks: ServeHooks) -> Prepared:
    """Everything before a child starts: seconds of checks, then the files, then the command line."""
    catalogue = load_catalogue()
    chosen = catalogue.get(options.variant)
    if options.https and options.ssl_dir:
        raise UsageError("--https and --ssl both given", "--https makes a certificate; --ssl DIR uses yours")
    preflight.check_address(options.host, options.port)
    ssl_dir = tls.check_ssl_dir(options.ssl_dir) if options.ssl_dir else None
    weight = preflight.check_moshi_weight(options.moshi_weight)
    placements = _place_replicas(options, chosen) if options.replicas is not None else None
    first_device = placements[0].device if placements else options.device
    device = preflight.check_device(first_device, chosen.vram_min_gb, chosen.name)
    for note in device.notes:
        hooks.on_note(note)
    _, files = artifacts.ensure_local(catalogue, chosen, options.revision, offline=options.offline, web_ui=True,
                                      moshi_weight=weight, watch=hooks.watch_download, on_note=hooks.on_note)
    if options.https:
        ssl_dir = tls.ensure_certificate(artifacts.data_dir() / "tls", certificate_names(options.host))
    launch = build_launch(files, chosen.repo, options, ssl_dir, half=options.half or device.half)
    return Prepared(launch, chosen, ssl_dir, placements)


def _place_replicas(options: ServeOptions, chosen: Variant) -> list:
    from . import haproxy, replicas

    haproxy.find()
    count = replicas.parse_count(options.replicas)
    for name, value in (("--queue-timeout", options.queue_timeout_s), ("--drain-timeout", options.drain_timeout_s)):
        if not value >= 0:
            raise UsageError(f"{name} {value} must be 0 or more seconds", f"e.g. {name} 60")
    return replicas.place(count, options.device, replicas.parse_gpus(options.gpus), chosen.vram_min_gb)


# --- the child's command line ----------------------------------------------------------------------


def build_launch(files: ModelFiles, repo: str, options: ServeOptions, ssl_dir: Path | None, half: bool,
                 base_env: dict[str, str] | None = None) -> Launch:
    """Everything the child gets, as data: explicit local paths and an offline hub."""
    argv = [sys.executable, "-m", "jmoshi_cli._moshi_entry",
            "--host", options.host, "--port", str(options.port),
            "--hf-repo", repo,
            "--moshi-weight", str(files.moshi_weight),
            "--mimi-weight", str(files.mimi_weight),
            "--tokenizer", str(files.tokenizer),
            "--static", str(files.web_ui),
            "--device", options.device]
    if half:
        argv.append("--half")
    if ssl_dir is not None:
        argv += ["--ssl", str(ssl_dir)]
    env = dict(os.environ if base_env is None else base_env)
    env.update(HF_HUB_OFFLINE="1", JMOSHI_BIND_HOST=options.host, PYTHONUNBUFFERED="1")
    env.pop("JMOSHI_CONFIG_PATH", None)
    if files.config is not None:
        env["JMOSHI_CONFIG_PATH"] = str(files.config)
    return Launch(argv, env, options.host, options.port, "https" if ssl_dir else "http")


def lan_addresses() -> list[str]:
    """IPv4 addresses of this machine's interfaces other than loopback (no packets sent)."""
    import fcntl
    import struct

    found = []
    for _, name in socket.if_nameindex():
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            try:
                packed = fcntl.ioctl(sock.fileno(), 0x8915, struct.pack("256s", name[:15].encode()))  # SIOCGIFADDR
            except OSError:
                continue
        address = socket.inet_ntoa(packed[20:24])
        if not ipaddress.ip_address(address).is_loopback:
            found.append(address)
    return found


def certificate_names(host: str) -> set[str]:
    names = {"localhost", "127.0.0.1", "::1", socket.gethostname()}
    if host not in ("0.0.0.0", "::", ""):
        names.add(host)
    else:
        names.update(lan_addresses())
    return names
