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
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

from . import artifacts, finetune, preflight, quantize, recordings, runtime, tls
from .artifacts import ModelFiles
from .child import Launch
from .errors import CacheError, UsageError
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
    # Research use: every conversation saved under this folder (recordings.py), and the generator's sampling.
    record: Path | None = None
    temp: float | None = None
    temp_text: float | None = None
    top_k: int | None = None
    top_k_text: int | None = None
    seed: int | None = None
    quantize: str = "auto"  # auto, bf16 or int8 (quantize.Precision)
    lora: Path | None = None  # a moshi-finetune adapter over the variant (finetune.py)


@dataclass(frozen=True)
class Prepared:
    """What preflight and the artifacts step decided, before anything starts."""

    launch: Launch
    variant: Variant
    ssl_dir: Path | None
    placements: list | None = None  # replicas.Placement for each replica, with --replicas
    record_dir: Path | None = None


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
    on_recording: Callable[[Path], None] = lambda folder: None  # --record: where conversations go


def run(options: ServeOptions, hooks: ServeHooks | None = None) -> int:
    """Preflight, artifacts, launch, supervise; return jmoshi's exit code once the server stops."""
    from . import child

    hooks = hooks or ServeHooks()
    prepared = prepare(options, hooks)
    hooks.on_starting(prepared.variant, prepared.launch)
    if prepared.record_dir is not None:
        hooks.on_recording(prepared.record_dir)
    try:
        if prepared.placements is not None:
            return _run_replicas(options, prepared, hooks)
        server = child.Server(prepared.launch, relay=hooks.relay)
        return child.supervise(server, lambda seconds: hooks.on_ready(prepared.launch, seconds))
    finally:
        if prepared.record_dir is not None:
            _settle_recordings(prepared.record_dir, hooks)


def _run_replicas(options: ServeOptions, prepared: Prepared, hooks: ServeHooks) -> int:
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
    sampling = sampling_overrides(options)
    precision = quantize.parse_precision(options.quantize)
    record_dir = recordings.check_dir(options.record) if options.record is not None else None
    if record_dir is not None:
        _settle_recordings(record_dir, hooks)  # left "running" by a server that was killed
    if options.https and options.ssl_dir:
        raise UsageError("--https and --ssl both given", "--https makes a certificate; --ssl DIR uses yours")
    preflight.check_address(options.host, options.port)
    ssl_dir = tls.check_ssl_dir(options.ssl_dir) if options.ssl_dir else None
    fine_tune = finetune.resolve(chosen, options.moshi_weight, options.lora)
    precision = finetune.precision_for(fine_tune, runtime.detect(), precision)
    placements = _place_replicas(options, chosen, precision) if options.replicas is not None else None
    first_device = placements[0].device if placements else options.device
    device = preflight.check_device(first_device, chosen.vram_min_gb, chosen.name, precision,
                                    chosen.vram_min_int8_gb)
    for note in device.notes:
        hooks.on_note(note)
    plan, files = finetune.local_model(catalogue, chosen, fine_tune, options.revision, offline=options.offline,
                                       web_ui=True, int8=device.int8, watch=hooks.watch_download,
                                       on_note=hooks.on_note)
    if sampling:
        files = replace(files, config=sampling_config(files.config, sampling))
    if options.https:
        ssl_dir = tls.ensure_certificate(artifacts.data_dir() / "tls", certificate_names(options.host))
    launch = build_launch(files, chosen.repo, options, ssl_dir, half=options.half or device.half, int8=device.int8)
    facts = _recording_facts(plan, chosen, options, files)
    launch = replace(launch, env=session_env(launch.env, options, sampling, record_dir, facts))
    return Prepared(launch, chosen, ssl_dir, placements, record_dir)


def _place_replicas(options: ServeOptions, chosen: Variant, precision: quantize.Precision) -> list:
    from . import haproxy, replicas

    haproxy.find()
    count = replicas.parse_count(options.replicas)
    for name, value in (("--queue-timeout", options.queue_timeout_s), ("--drain-timeout", options.drain_timeout_s)):
        if not value >= 0:
            raise UsageError(f"{name} {value} must be 0 or more seconds", f"e.g. {name} 60")
    need = chosen.vram_min_int8_gb if precision is quantize.Precision.INT8 else chosen.vram_min_gb
    return replicas.place(count, options.device, replicas.parse_gpus(options.gpus), need)


# --- sampling, seed and recording: what the child gets besides its command line -------------------


def sampling_overrides(options: ServeOptions) -> dict:
    """The sampling values given, checked as `jmoshi infer` checks them (same flags, same messages)."""
    from .infer import InferOptions

    checked = InferOptions(temp=options.temp, temp_text=options.temp_text, top_k=options.top_k,
                           top_k_text=options.top_k_text, seed=options.seed)
    if options.seed is not None and options.seed >= 2**32:  # moshi.server also seeds numpy, which stops there
        raise UsageError(f"--seed {options.seed} is too large", "use a seed below 4294967296")
    return checked.sampling_overrides()


def sampling_config(config: Path | None, overrides: dict) -> Path:
    """An LM config whose lm_gen_config holds the sampling values: moshi.server reads them from there.

    It is the variant's config.json with lm_gen_config updated, or, for a repo without one (J-Moshi's),
    moshi's built-in Moshi-7B kwargs, which is what the server builds when it finds no config.json. The
    file is named by its content in jmoshi's data folder, so servers started alike share it.
    """
    import hashlib
    import json

    from .fsutil import atomic_write_text

    if config is not None:
        lm_config = json.loads(Path(config).read_text(encoding="utf-8"))
    else:
        from moshi.models import loaders  # imports torch: only here, when sampling flags are given

        lm_config = dict(loaders._lm_kwargs)
    lm_config["lm_gen_config"] = {**(lm_config.get("lm_gen_config") or {}), **overrides}
    text = json.dumps(lm_config, indent=2, sort_keys=True) + "\n"
    path = artifacts.data_dir() / "lm-configs" / f"{hashlib.sha256(text.encode()).hexdigest()[:16]}.json"
    try:
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(path, text)
    except OSError as exc:
        raise CacheError(f"cannot write the LM config with the sampling values to {path.parent}: "
                         f"{exc.strerror or exc}", "set JMOSHI_HOME to a folder you can write to") from exc
    return path


def _recording_facts(plan, chosen: Variant, options: ServeOptions, files: ModelFiles) -> dict:
    """What only jmoshi knows of the model, for each recording's meta.json."""
    from . import __version__

    entry = next((e for e in plan.entries if e.artifact.repo == chosen.repo), None)
    return {"variant": chosen.name, "repo": chosen.repo, "revision": options.revision or chosen.revision,
            "commit": entry.artifact.commit if entry else None,
            "moshi_weight": str(files.moshi_weight) if options.moshi_weight or chosen.moshi_weight else None,
            "lora": str(files.lora) if files.lora else None,
            "lm_config": str(files.config) if files.config else None, "jmoshi": __version__}


SESSION_ENV = ("JMOSHI_RECORD", "JMOSHI_SEED", "JMOSHI_SAMPLING", "JMOSHI_REPLICA")


def session_env(env: dict[str, str], options: ServeOptions, sampling: dict, record_dir: Path | None,
                facts: dict) -> dict[str, str]:
    """The child's environment with what recorder.Settings reads (nothing left over from ours)."""
    import json

    out = {k: v for k, v in env.items() if k not in SESSION_ENV}
    if record_dir is not None:
        out["JMOSHI_RECORD"] = json.dumps({"dir": str(record_dir), **facts}, ensure_ascii=False)
    if options.seed is not None:
        out["JMOSHI_SEED"] = str(options.seed)
    if sampling:
        out["JMOSHI_SAMPLING"] = json.dumps(sampling)
    return out


def _settle_recordings(record_dir: Path, hooks: ServeHooks) -> None:
    for session in recordings.settle(record_dir):
        hooks.on_note(f"a recording was cut when its server died; its files are closed: {session.path} "
                      f"({session.duration_s:.1f} s)")


# --- the child's command line ----------------------------------------------------------------------


def build_launch(files: ModelFiles, repo: str, options: ServeOptions, ssl_dir: Path | None, half: bool,
                 base_env: dict[str, str] | None = None, int8: bool = False) -> Launch:
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
    if files.lora is not None:
        argv += ["--lora-weight", str(files.lora)]  # with its config.json, which says `lora` (JMOSHI_CONFIG_PATH)
    if ssl_dir is not None:
        argv += ["--ssl", str(ssl_dir)]
    env = dict(os.environ if base_env is None else base_env)
    env.update(HF_HUB_OFFLINE="1", JMOSHI_BIND_HOST=options.host, PYTHONUNBUFFERED="1")
    env.update(runtime.compile_setup(options.device, env)[0])  # NO_TORCH_COMPILE=1 on the CPU (runtime.py)
    env.pop("JMOSHI_CONFIG_PATH", None)
    env.pop("JMOSHI_INT8", None)
    if int8:
        env["JMOSHI_INT8"] = "1"  # the child puts back the float32 scales moshi casts (quantize.py)
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
