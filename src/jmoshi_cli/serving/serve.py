"""`jmoshi serve`: preflight in seconds, make every artifact local, then run moshi.server as a child.

Flow (`run`): options -> the backend (backends/: which flags it takes) -> preflight (address, port,
TLS) -> the model prepared once (preparation.py: fine-tune, precision, device, files) -> a
ServerSpec (structure, rendered into argv and env last) -> child.supervise (start, relay output,
ready, stop). What a person sees is decided by the caller's `Reporter`.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

from .. import addresses, backends, preflight, recording
from ..backends import Features, ServerSpec
from ..backends.contract import ChildContract, Launch, Recording
from ..cache import artifacts
from ..engine.memory import parse_count
from ..errors import UsageError
from ..model import lm_config, precision
from ..model.preparation import ModelRequest, PreparedModel
from ..reporter import Reporter
from ..sampling import Sampling
from ..variants import Variant
from . import tls, token
from .access import AccessOptions, decide
from .front import check_metrics


@dataclass(frozen=True)
class ServeOptions:
    variant: str | None = None
    host: str = "127.0.0.1"
    port: int = 8998
    device: str = "auto"  # the backend's own (backends.Backend.device): cuda for torch
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
    # Research use: every conversation saved under this folder (recording/), and the generator's sampling.
    record: Path | None = None
    sampling: Sampling = field(default_factory=Sampling)
    quantize: str = "auto"  # --quantize as given: parsed once, by the backend's offer (precision.py)
    lora: Path | None = None  # a moshi-finetune adapter over the variant (finetune.py)
    backend: str = "auto"  # backends.Kind: auto is mlx on Apple Silicon, torch elsewhere
    access: AccessOptions = field(default_factory=AccessOptions)  # the token, origins, consent, limits
    metrics_host: str | None = None  # with --replicas: /stats and /metrics without the token, on this address
    metrics_port: int = 8405
    conversations: str | None = None  # held at once by one loaded model: a number or "auto"; None: one


@dataclass(frozen=True)
class Prepared:
    """What preflight and the model preparation decided, before anything starts."""

    spec: ServerSpec
    model: PreparedModel
    placements: list | None = None  # replicas.Placement for each replica, with --replicas
    record_dir: Path | None = None
    metrics: tuple[str, int] | None = None  # the front's /stats and /metrics without the token, checked free

    @property
    def launch(self) -> Launch:
        return backends.render(self.spec)

    @property
    def variant(self) -> Variant:
        return self.model.variant


# --- the flow ----------------------------------------------------------------------------------------


def run(options: ServeOptions, report: Reporter | None = None) -> int:
    """Preflight, artifacts, launch, supervise; return jmoshi's exit code once the server stops."""
    from . import child

    report = report or Reporter()
    prepared = prepare(options, report)
    report.starting(prepared)
    if prepared.record_dir is not None:
        report.recording(prepared.record_dir)
    try:
        if prepared.placements is not None:
            return _run_replicas(options, prepared, report)
        launch = prepared.launch
        server = child.Server(launch, relay=report.relay(launch.name))
        return child.supervise(server, lambda seconds: report.ready(launch, seconds))
    finally:
        if prepared.record_dir is not None:
            _settle_recordings(prepared.record_dir, report)


def _run_replicas(options: ServeOptions, prepared: Prepared, report: Reporter) -> int:
    from . import haproxy, replicas

    placements = prepared.placements
    assert placements is not None  # run() comes here only with --replicas
    contract = prepared.spec.contract
    front = haproxy.Front(options.host, options.port, replicas.backends_for(placements, prepared.spec.conversations),
                          options.queue_timeout_s, prepared.spec.ssl_dir, managed=True, access=contract.access,
                          limits=contract.limits, metrics=prepared.metrics)
    front_launch = replace(prepared.launch, host=options.host, port=options.port, scheme=front.scheme)
    fleet = replicas.Fleet(
        front, [replicas.Replica(p, replicas.replica_launch(prepared.spec, p)) for p in placements],
        report, front_launch, options.drain_timeout_s)
    return fleet.run()


def prepare(options: ServeOptions, report: Reporter) -> Prepared:
    """Everything before a child starts: seconds of checks, then the files, then the server as structure."""
    from ..variants import load_catalogue

    backend = backends.choose(options.backend)
    wanted = parse_count(options.conversations, "--conversations")
    backend.refuse(Features(replicas=options.replicas is not None, lora=options.lora is not None,
                            half=options.half, device=options.device,
                            conversations="--conversations" if wanted != 1 else None))
    if wanted is None and options.replicas is not None:
        raise UsageError("--conversations auto with --replicas", "give both as numbers: --replicas R --conversations N")
    options = replace(options, device=backend.device(options.device))
    asked = precision.parse(options.quantize, backend.precisions)
    sampling = options.sampling.overrides()
    record_dir = recording.check_dir(options.record) if options.record is not None else None
    if record_dir is not None:
        _settle_recordings(record_dir, report)  # left "running" by a server that was killed
    if options.https and options.ssl_dir:
        raise UsageError("--https and --ssl both given", "--https makes a certificate; --ssl DIR uses yours")
    preflight.check_address(options.host, options.port)
    ssl_dir = tls.check_ssl_dir(options.ssl_dir) if options.ssl_dir else None
    if options.metrics_host is not None and options.replicas is None:
        raise UsageError("--metrics-host without --replicas", "the stats and metrics are the front's")
    metrics = check_metrics(options.metrics_host, options.metrics_port, options.host, options.port)
    access = decide(options.access, artifacts.data_dir(), record_dir is not None)
    _tell_token(access.token, report)
    catalogue = load_catalogue()
    placements = None
    device = options.device
    if options.replicas is not None:
        placements, asked = _place_replicas(options, catalogue.get(options.variant), asked, wanted or 1)
        device = placements[0].device
    request = ModelRequest(options.variant, options.revision, options.moshi_weight, options.lora, asked, device,
                           options.half, options.offline)
    model = backend.prepare(request, web_ui=True, watch=report.watch_download, on_note=report.note)
    files = model.files
    if sampling:
        files = replace(files, config=lm_config.with_sampling(files.config, sampling, artifacts.data_dir()))
    if options.https:
        ssl_dir = tls.ensure_certificate(artifacts.data_dir() / "tls", addresses.certificate_names(options.host))
    contract = ChildContract(
        bind_host=options.host, config_path=str(files.config) if files.config else None,
        precision=model.precision, threads=backends.cpu_threads() if options.device == "cpu" else None,
        record=Recording(str(record_dir), model.facts()) if record_dir is not None else None,
        seed=options.sampling.seed, sampling=sampling, access=access.access, limits=access.limits)
    count = wanted if wanted is not None else _auto(options.device, model, report)
    spec = ServerSpec(backend.kind, files, model.variant.repo, model.precision, options.host, options.port,
                      options.device, model.half, ssl_dir, contract, conversations=count)
    return Prepared(spec, model, placements, record_dir, metrics)


def _auto(device: str, model: PreparedModel, report: Reporter) -> int:
    from ..engine.memory import room_for

    room = room_for(device, model, "--conversations")
    report.note(room.says("--conversations"))
    return room.count


def _tell_token(choice: token.Choice, report: Reporter) -> None:
    if choice.source is token.Source.NEW:
        report.note(f"made a new access token, kept in {artifacts.data_dir() / token.FILE} (0600) for the next runs; "
                    "the URL below carries it")


def _place_replicas(options: ServeOptions, chosen: Variant, asked: precision.Precision,
                    conversations: int) -> tuple[list, precision.Precision]:
    from . import haproxy, replicas

    haproxy.find()
    assert options.replicas is not None  # prepare() comes here only with --replicas
    count = replicas.parse_count(options.replicas)
    for name, value in (("--queue-timeout", options.queue_timeout_s), ("--drain-timeout", options.drain_timeout_s)):
        if not value >= 0:
            raise UsageError(f"{name} {value} must be 0 or more seconds", f"e.g. {name} 60")
    int8_possible = options.lora is None and not chosen.lora and _int8_runs()
    # Each replica holds this many beyond its first; sized by moshi's model, imported only where it counts.
    more = (conversations - 1) * _conversation_gb() if conversations > 1 else 0.0
    need = replicas.Need(chosen.vram_min_gb + more, chosen.vram_min_int8_gb + more if int8_possible else None)
    return replicas.place(count, options.device, replicas.parse_gpus(options.gpus), need, asked)


def _conversation_gb() -> float:
    from ..engine.memory import per_conversation_bytes

    return per_conversation_bytes(lm_config.lm_kwargs(None)) / 1e9


def _int8_runs() -> bool:
    from .. import runtime

    rt = runtime.detect()
    return rt.has_int8 and rt.bitsandbytes is not None


# --- recording ---------------------------------------------------------------------------------------


def _settle_recordings(record_dir: Path, report: Reporter) -> None:
    for session in recording.settle(record_dir):
        report.note(f"a recording was cut when its server died; its files are closed: {session.path} "
                      f"({session.duration_s:.1f} s)")
