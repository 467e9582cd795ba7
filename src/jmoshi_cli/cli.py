"""The Typer app. Commands are thin: parse flags, call the library, show results, choose exit codes.

Heavy modules (torch, moshi, huggingface_hub) are imported inside commands so `--help` stays fast.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer

from . import __version__
from . import console as ui
from .console import console

if TYPE_CHECKING:
    from .results import Result

app = typer.Typer(
    name="jmoshi",
    help="Run J-Moshi, the Japanese full-duplex spoken dialogue model, with one command.\n\n"
         "J-Moshi の重み (weights) は CC BY-NC 4.0: 研究・非商用のみ / research and non-commercial use only.",
    context_settings={"help_option_names": ["-h", "--help"]},
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)

# Shared option aliases, so every command spells a flag the same way.
VariantOpt = Annotated[Optional[str], typer.Option(
    "--variant", "-v", help="Which model: ext (default), base, or one from your variants.toml.",
    show_default=False)]
VariantOrAllOpt = Annotated[Optional[str], typer.Option(
    "--variant", "-v", help="ext (default), base, all, or one from your variants.toml.", show_default=False)]
RevisionOpt = Annotated[Optional[str], typer.Option(
    "--revision", help="Branch, tag or commit of the model repo (default: the catalogue's).", show_default=False)]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print the result as JSON on stdout.")]
OfflineOpt = Annotated[bool, typer.Option("--offline", help="Use only the local cache; never call the hub.")]
DeviceOpt = Annotated[str, typer.Option(
    "--device", help="auto (torch: cuda; MLX: the Mac's GPU), cuda, cuda:N, or cpu (development and tests: not "
    "real time).")]
HalfOpt = Annotated[bool, typer.Option("--half", help="float16 instead of bfloat16 (GPUs older than Ampere).")]
MoshiWeightOpt = Annotated[Optional[Path], typer.Option(
    "--moshi-weight", help="A local LM checkpoint (e.g. fine-tuned J-Moshi) instead of the variant's.",
    show_default=False)]
LoraOpt = Annotated[Optional[Path], typer.Option(
    "--lora", help="A LoRA adapter over the variant: a moshi-finetune run folder (its newest checkpoint), a "
    "checkpoint folder, or lora.safetensors with its config.json beside it. Current runtime only.",
    show_default=False)]
QuantizeOpt = Annotated[str, typer.Option(
    "--quantize", help="auto, bf16, int8 or int4 (MLX). torch: int8 (moshi's own bitsandbytes int8, made once from "
    "the bf16 weights and kept in jmoshi's data folder) needs ~11 GB of GPU memory instead of ~19 GB; auto picks it, "
    "with a note, when bf16 does not fit (current runtime only). MLX: 8-bit or 4-bit weights converted once; auto "
    "picks the largest that fits the Mac's unified memory and says why.")]


ReplicasOpt = Annotated[Optional[str], typer.Option(
    "--replicas", help="Many conversations at once: N moshi.server replicas (or `auto`: as many as free GPU "
    "memory allows) behind one HAProxy front on --host/--port, with a fair queue. Needs HAProxy.",
    show_default=False)]
ConversationsOpt = Annotated[Optional[str], typer.Option(
    "--conversations", help="Many conversations on one loaded J-Moshi (torch, moshi 0.2.5+): N talk at once, each in "
    "its own slot, stepped together (`auto`: as many as fit the GPU's memory). With --replicas: per replica.",
    show_default=False)]
QueueTimeoutOpt = Annotated[float, typer.Option(
    "--queue-timeout", help="Seconds a new conversation may wait for a free replica before it is told "
    "that all replicas are busy.")]
DrainTimeoutOpt = Annotated[float, typer.Option(
    "--drain-timeout", help="On Ctrl-C or SIGTERM: seconds that running conversations may go on before "
    "everything stops (a second Ctrl-C stops at once).")]
# Sampling, one group for serve (every conversation, both servers) and infer (every file): sampling.Sampling.
def _sampling_help(what: str, default: str) -> str:
    return f"{what} (default: the model's config, else {default})."


TempOpt = Annotated[Optional[float], typer.Option(
    "--temp", help=_sampling_help("Audio sampling temperature; 0 is greedy", "0.8"), show_default=False,
    rich_help_panel="Sampling")]
TempTextOpt = Annotated[Optional[float], typer.Option(
    "--temp-text", help=_sampling_help("Text sampling temperature; 0 is greedy", "0.7"), show_default=False,
    rich_help_panel="Sampling")]
TopKOpt = Annotated[Optional[int], typer.Option(
    "--top-k", help=_sampling_help("Audio top-k", "250"), show_default=False, rich_help_panel="Sampling")]
TopKTextOpt = Annotated[Optional[int], typer.Option(
    "--top-k-text", help=_sampling_help("Text top-k", "25"), show_default=False, rich_help_panel="Sampling")]
SeedOpt = Annotated[Optional[int], typer.Option(
    "--seed", help="Seed the sampling, so that the same input gives the same output: serve seeds again at the "
    "start of each conversation (instead of moshi's fixed 42424242 once), infer at each file.", show_default=False,
    rich_help_panel="Sampling")]
RecordOpt = Annotated[Optional[Path], typer.Option(
    "--record", help="Save every conversation for research into DIR/<UTC start>-<id>/: dialogue.wav (user left, "
    "J-Moshi right, sample-aligned), user.wav, jmoshi.wav, transcript.json, meta.json (model, sampling, seed, "
    "how it ended). Tell participants that they are recorded.", metavar="DIR", show_default=False)]
BackendOpt = Annotated[str, typer.Option(
    "--backend", help="auto, torch (moshi.server on PyTorch: NVIDIA GPUs, or the CPU for tests) or mlx (Apple "
    "Silicon through Kyutai's moshi_mlx; on Linux MLX's CPU backend, far slower than real time). auto is mlx on "
    "macOS arm64 and torch elsewhere.")]
# Access, one group for serve and front (serving/access.py): who may talk, and what frees a slot.
TokenOpt = Annotated[Optional[str], typer.Option(
    "--token", envvar="JMOSHI_TOKEN", help="The access token for this run (default: the one kept in jmoshi's data "
    "folder, made on first use). The printed URL carries it; programs send `Authorization: Bearer TOKEN`.",
    show_default=False, rich_help_panel="Access")]
NewTokenOpt = Annotated[bool, typer.Option(
    "--new-token", help="Make a new token and keep it (old URLs and QR codes stop working).",
    rich_help_panel="Access")]
NoTokenOpt = Annotated[bool, typer.Option(
    "--no-token", help="No token: anyone who can reach the port can talk to J-Moshi (and be recorded).",
    rich_help_panel="Access")]
AllowOriginOpt = Annotated[Optional[list[str]], typer.Option(
    "--allow-origin", help="Let pages of this origin (e.g. https://lab.example.org, or *) open a conversation; by "
    "default only the server's own page may. Repeat for more.", show_default=False, rich_help_panel="Access")]
IdleTimeoutOpt = Annotated[float, typer.Option(
    "--idle-timeout", help="Seconds without audio that end a conversation and free its slot (a browser streams "
    "even in silence).", rich_help_panel="Access")]
MaxMinutesOpt = Annotated[Optional[float], typer.Option(
    "--max-minutes", help="The longest a conversation may last (demos).", show_default=False,
    rich_help_panel="Access")]
MaxWaitingOpt = Annotated[int, typer.Option(
    "--max-waiting", help="Conversations that may wait for a free slot; others are told it is busy.",
    rich_help_panel="Access")]
ConsentOpt = Annotated[Optional[Path], typer.Option(
    "--consent", help="With --record: your study's own text (UTF-8) on the consent page each participant sees "
    "before talking.", metavar="FILE", show_default=False, rich_help_panel="Access")]
MinFreeOpt = Annotated[int, typer.Option(
    "--min-free-mb", help="With --record: a recording does not start, or stops and ends its conversation, below "
    "this much free disk space.", rich_help_panel="Access")]

MetricsHostOpt = Annotated[Optional[str], typer.Option(
    "--metrics-host", help="The front also serves /stats and /metrics without the token on this address (e.g. "
    "127.0.0.1 for a Prometheus scraper on this machine), at --metrics-port.", show_default=False,
    rich_help_panel="Access")]
MetricsPortOpt = Annotated[int, typer.Option("--metrics-port", help="With --metrics-host.", rich_help_panel="Access")]


def _access(token: str | None, new_token: bool, no_token: bool, allow_origin: list[str] | None, idle_timeout: float,
            max_minutes: float | None, max_waiting: int, consent: Path | None = None, min_free_mb: int = 1024):
    from .serving.access import AccessOptions

    return AccessOptions(token, new_token, no_token, tuple(allow_origin or ()), consent, idle_timeout, max_minutes,
                         max_waiting, min_free_mb)


HostOpt = Annotated[str, typer.Option(
    "--host", help="Address to listen on. 127.0.0.1 keeps it on this machine; 0.0.0.0 opens it to the network.")]
PortOpt = Annotated[int, typer.Option("--port", help="Port to listen on.")]


def _version(value: bool) -> None:
    if value:
        typer.echo(f"jmoshi {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    verbose: Annotated[bool, typer.Option("--verbose", help="Show more detail (and tracebacks on errors).")] = False,
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Show the version and exit.")] = False,
) -> None:
    ui.settings.verbose = verbose


def _variant_names(name: str | None):
    """The catalogue and the variant names that `--variant` (which may be `all`) stands for."""
    from .variants import load_catalogue

    catalogue = load_catalogue()
    return catalogue, sorted(catalogue.variants) if name == "all" else [catalogue.get(name).name]


def _catalogue_and_variant(name: str | None):
    from .variants import load_catalogue

    catalogue = load_catalogue()
    return catalogue, catalogue.get(name)


@app.command()
def doctor(
    variant: VariantOpt = None,
    port: Annotated[int, typer.Option("--port", help="Port to check.")] = 8998,
    host: Annotated[str, typer.Option("--host", help="Address to check the port on.")] = "127.0.0.1",
    as_json: JsonOpt = False,
) -> int:
    """Check this machine for J-Moshi: OS, packages, GPU, VRAM, disk, cache, hub, port."""
    from . import doctor as doc
    from .results import DoctorResult

    catalogue, chosen = _catalogue_and_variant(variant)
    return finish(DoctorResult(doc.evaluate(doc.gather(catalogue, chosen, host, port), chosen), chosen), as_json)


@app.command()
def variants(as_json: JsonOpt = False) -> int:
    """List the model variants jmoshi knows (built-in and from your variants.toml)."""
    from .results import VariantsResult
    from .variants import load_catalogue

    return finish(VariantsResult(load_catalogue()), as_json)


@app.command()
def download(
    variant: VariantOrAllOpt = None,
    revision: RevisionOpt = None,
    dry_run: Annotated[bool, typer.Option("--dry-run",
                                          help="Show what is missing and its size; fetch nothing.")] = False,
    no_web_ui: Annotated[bool, typer.Option("--no-web-ui", help="Skip the browser UI bundle.")] = False,
    as_json: JsonOpt = False,
) -> int:
    """Fetch weights, tokenizer, Mimi codec and web UI into the Hugging Face cache (verified)."""
    from .cache import artifacts
    from .render import DownloadView, show_note
    from .results import DownloadResult

    catalogue, names = _variant_names(variant)
    plans = []
    for name in names:
        chosen = catalogue.get(name)
        if dry_run:
            plans.append(artifacts.resolve(catalogue, chosen, revision, web_ui=not no_web_ui))
        else:
            plans.append(artifacts.ensure_local(catalogue, chosen, revision, web_ui=not no_web_ui,
                                                use_cache_if_unreachable=False, watch=DownloadView,
                                                on_note=show_note)[0])
    return finish(DownloadResult(plans, dry_run), as_json)


@app.command()
def verify(
    variant: VariantOrAllOpt = None,
    revision: RevisionOpt = None,
    as_json: JsonOpt = False,
) -> int:
    """Re-hash what is cached for a variant and the int8/MLX weights made from it; report corrupt or missing files
    (exit 1 if any). A corrupt made file is removed: the next start makes it again."""
    from .cache import artifacts
    from .model import preparation
    from .results import VerifyResult

    catalogue, names = _variant_names(variant)
    report, derived = [], {}
    for name in names:
        plan = artifacts.resolve(catalogue, catalogue.get(name), revision, offline=True)
        report.append((plan, [artifacts.verify(e) for e in plan.entries]))
        derived[name] = preparation.recheck_derived(plan)
    return finish(VerifyResult(report, derived), as_json)


@app.command()
def serve(
    variant: VariantOpt = None,
    host: HostOpt = "127.0.0.1",
    port: PortOpt = 8998,
    device: DeviceOpt = "auto",
    half: HalfOpt = False,
    offline: OfflineOpt = False,
    https: Annotated[bool, typer.Option("--https", help="Serve HTTPS with a self-signed certificate (made once, "
                                        "kept in jmoshi's data folder): browsers give the microphone to "
                                        "other machines only over HTTPS.")] = False,
    ssl: Annotated[Optional[Path], typer.Option("--ssl", help="Folder with your own cert.pem and key.pem.",
                                                show_default=False)] = None,
    revision: RevisionOpt = None,
    moshi_weight: MoshiWeightOpt = None,
    lora: LoraOpt = None,
    quantize: QuantizeOpt = "auto",
    open_browser: Annotated[bool, typer.Option("--open", help="Open the browser when the server is ready.")] = False,
    replicas: ReplicasOpt = None,
    conversations: ConversationsOpt = None,
    gpus: Annotated[Optional[str], typer.Option(
        "--gpus", help="With --replicas: the GPUs to use, e.g. 0,1 (default: all).", show_default=False)] = None,
    queue_timeout: QueueTimeoutOpt = 180.0,
    drain_timeout: DrainTimeoutOpt = 60.0,
    record: RecordOpt = None,
    temp: TempOpt = None,
    temp_text: TempTextOpt = None,
    top_k: TopKOpt = None,
    top_k_text: TopKTextOpt = None,
    seed: SeedOpt = None,
    backend: BackendOpt = "auto",
    token: TokenOpt = None,
    new_token: NewTokenOpt = False,
    no_token: NoTokenOpt = False,
    allow_origin: AllowOriginOpt = None,
    idle_timeout: IdleTimeoutOpt = 30.0,
    max_minutes: MaxMinutesOpt = None,
    max_waiting: MaxWaitingOpt = 8,
    consent: ConsentOpt = None,
    min_free_mb: MinFreeOpt = 1024,
    metrics_host: MetricsHostOpt = None,
    metrics_port: MetricsPortOpt = 8405,
) -> int:
    """Talk to J-Moshi in the browser: check, fetch what is missing, then run its server.

    The sampling flags hold for every conversation; the web UI's own sampling settings are ignored by the server.
    """
    from .render import ConsoleReporter
    from .sampling import Sampling
    from .serving import serve as srv

    options = srv.ServeOptions(
        variant=variant, host=host, port=port, device=device, half=half, offline=offline, https=https, ssl_dir=ssl,
        revision=revision, moshi_weight=moshi_weight, replicas=replicas, gpus=gpus, queue_timeout_s=queue_timeout,
        drain_timeout_s=drain_timeout, record=record, sampling=Sampling(temp, temp_text, top_k, top_k_text, seed),
        quantize=quantize, lora=lora, backend=backend,
        access=_access(token, new_token, no_token, allow_origin, idle_timeout, max_minutes, max_waiting, consent,
                       min_free_mb), metrics_host=metrics_host, metrics_port=metrics_port,
        conversations=conversations)
    return srv.run(options, ConsoleReporter(ui.settings.verbose, open_browser))


@app.command()
def recordings(
    folder: Annotated[Path, typer.Argument(help="The folder given to `jmoshi serve --record`.", metavar="DIR")]
    = Path("."),
    stats: Annotated[bool, typer.Option("--stats", help="Also the turn-taking figures of each session, as "
                                        "`jmoshi analyze` computes them (IPUs, gaps, overlaps per minute, "
                                        "floor-transfer offset, J-Moshi's share).")] = False,
    as_json: JsonOpt = False,
) -> int:
    """List the conversations `serve --record` saved: start, duration, variant, how each ended."""
    from . import recording as rec
    from .results import RecordingsResult

    sessions = rec.list_sessions(folder)
    return finish(RecordingsResult(folder, sessions, _session_figures(sessions) if stats else None), as_json)


def _session_figures(sessions):
    from .analysis import Params, session_figures

    with console.status("analysing") as status:
        return session_figures(sessions, Params(), on_file=lambda path: status.update(f"analysing {path}"))


@app.command()
def analyze(
    paths: Annotated[list[Path], typer.Argument(
        help="Stereo WAVs (one speaker per channel, 8-384 kHz, up to 4 hours), `serve --record` session folders, "
        "folders of sessions, or `infer` outputs (*.dialogue.wav).", show_default=False)],
    against: Annotated[Optional[list[Path]], typer.Option(
        "--against", help="A second set analysed the same way (e.g. human dialogues of the same corpus), shown "
        "beside the first with the difference per figure; repeat the flag for more paths.",
        show_default=False)] = None,
    csv_file: Annotated[Optional[Path], typer.Option("--csv", help="Write one row per file to FILE.",
                                                     metavar="FILE", show_default=False)] = None,
    plot: Annotated[Optional[Path], typer.Option("--plot", help="Write a timeline PNG per file into DIR.",
                                                 metavar="DIR", show_default=False)] = None,
    jmoshi_channel: Annotated[int, typer.Option("--jmoshi-channel", min=0, max=1, help="J-Moshi's channel "
                                                "(the other is the user's): 1, as jmoshi writes them, or 0.")] = 1,
    threshold: Annotated[float, typer.Option("--threshold", min=0.2, max=0.95, help="Silero VAD speech "
                                             "probability that starts speech (it stops below this - 0.15).")] = 0.5,
    min_silence_ms: Annotated[float, typer.Option("--min-silence-ms", min=0, help="Silence that ends an IPU "
                                                  "(dGSLM: 200 ms).")] = 200.0,
    min_ipu_ms: Annotated[float, typer.Option("--min-ipu-ms", min=0, help="Shorter IPUs are dropped "
                                              "(clicks, breaths).")] = 100.0,
    leak_db: Annotated[float, typer.Option("--leak-db", min=0, help="Speech this much quieter than the other "
                                           "channel's, at the level that channel leaks in, is leakage, not a "
                                           "voice (0: off).")] = 10.0,
    as_json: JsonOpt = False,
) -> int:
    """Turn-taking statistics (dGSLM): IPUs, pauses, gaps, overlaps, floor-transfer offsets, J-Moshi's share."""
    from . import analysis
    from .results import AnalyzeResult

    params = analysis.Params(threshold=threshold, min_silence_ms=min_silence_ms, min_ipu_ms=min_ipu_ms,
                             leak_db=leak_db, jmoshi_channel=jmoshi_channel)
    request = analysis.Request(paths, params, against or [], csv_file, plot)
    with console.status("analysing") as status:
        outcome = analysis.run(request, on_file=lambda path: status.update(f"analysing {path}"))
    return finish(AnalyzeResult(outcome, params), as_json)


@app.command()
def front(
    backend: Annotated[list[str], typer.Option(
        "--backend", "-b", help="A `jmoshi serve` elsewhere, as HOST:PORT, or HOST:PORT/N when it runs N replicas "
        "(repeat the flag for each).",
        show_default=False)],
    host: HostOpt = "127.0.0.1",
    port: PortOpt = 8998,
    https: Annotated[bool, typer.Option("--https", help="Terminate HTTPS at the front with a self-signed "
                                        "certificate kept in jmoshi's data folder.")] = False,
    ssl: Annotated[Optional[Path], typer.Option("--ssl", help="Folder with your own cert.pem and key.pem.",
                                                show_default=False)] = None,
    queue_timeout: QueueTimeoutOpt = 180.0,
    drain_timeout: DrainTimeoutOpt = 60.0,
    token: TokenOpt = None,
    new_token: NewTokenOpt = False,
    no_token: NoTokenOpt = False,
    idle_timeout: IdleTimeoutOpt = 30.0,
    max_waiting: MaxWaitingOpt = 8,
    metrics_host: MetricsHostOpt = None,
    metrics_port: MetricsPortOpt = 8405,
) -> int:
    """One URL over `jmoshi serve` instances on other machines: HAProxy, health checks, a fair queue.

    Start every `jmoshi serve` behind it with the same token (--token or JMOSHI_TOKEN): one token for the user.
    """
    from .render import ConsoleReporter
    from .serving import front as frontdoor

    options = frontdoor.FrontOptions(backend, host, port, https, ssl, queue_timeout, drain_timeout,
                                     _access(token, new_token, no_token, None, idle_timeout, None, max_waiting),
                                     metrics_host, metrics_port)
    return frontdoor.run(options, ConsoleReporter(ui.settings.verbose))


@app.command()
def selftest(as_json: JsonOpt = False, backend: BackendOpt = "auto") -> int:
    """Prove the installed stack works, before downloading 16 GB: a tiny model on the CPU (about a minute)."""
    from . import selftest as st

    with console.status("selftest") as status:
        result = st.run(on_step=lambda step: status.update(f"selftest: {step}"), backend=backend)
    return finish(result, as_json)


@app.command()
def infer(
    inputs: Annotated[list[Path], typer.Argument(help="Audio files or folders (wav, flac, mp3, ogg; 8-384 kHz).",
                                                 show_default=False)],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the results.")] = Path("jmoshi-out"),
    channel: Annotated[str, typer.Option("--channel", help="The user's side of a stereo file: left, right or mix.")]
    = "left",
    variant: VariantOpt = None,
    revision: RevisionOpt = None,
    device: DeviceOpt = "auto",
    half: HalfOpt = False,
    offline: OfflineOpt = False,
    moshi_weight: MoshiWeightOpt = None,
    lora: LoraOpt = None,
    quantize: QuantizeOpt = "auto",
    backend: BackendOpt = "auto",
    temp: TempOpt = None,
    temp_text: TempTextOpt = None,
    top_k: TopKOpt = None,
    top_k_text: TopKTextOpt = None,
    seed: SeedOpt = None,
    batch: Annotated[str, typer.Option(
        "--batch", help="Inputs at once on one loaded model (torch, moshi 0.2.5+), each as if alone: a number, or "
        "auto (as many as fit the GPU's memory; 1 on the CPU).")] = "auto",
    as_json: JsonOpt = False,
) -> int:
    """Talk to J-Moshi from audio files: its voice, a stereo dialogue wav and a timed transcript per file."""
    from . import infer as inf
    from .render import ConsoleReporter
    from .results import InferResult
    from .sampling import Sampling

    options = inf.InferOptions(device=device, half=half, channel=channel, quantize=quantize,
                               sampling=Sampling(temp, temp_text, top_k, top_k_text, seed))
    request = inf.InferRequest(inputs, out, variant, revision, offline, moshi_weight, options, lora=lora,
                               backend=backend, batch=batch)
    return finish(InferResult(inf.run(request, ConsoleReporter())), as_json)


def finish(result: Result, as_json: bool) -> int:
    """The one place a command's result is printed: for people on stderr, JSON or paths on stdout."""
    from .render import show

    show(result)
    if as_json:
        from .results import RESULT_VERSION

        document = {"jmoshi_result_version": RESULT_VERSION, **result.to_json()}
        typer.echo(json.dumps(document, ensure_ascii=False, indent=2))
    else:
        for path in result.paths():
            typer.echo(str(path))
    return result.exit_code


def main() -> None:
    """Console entry point: the one place where errors become a line, a hint and an exit code."""
    import sys

    sys.exit(run(sys.argv[1:]))


def run(argv: list[str]) -> int:
    from .errors import JMoshiError

    try:
        result = app(args=argv, prog_name="jmoshi", standalone_mode=False)
    except JMoshiError as exc:
        return fail(exc.message, exc.hint, exc.exit_code, exc)
    except typer.TyperException as exc:  # click's errors, as typer ships them: usage, bad values, files
        return _click_failed(exc, argv)
    except (typer.Abort, KeyboardInterrupt):
        console.print("[yellow]interrupted[/]")
        return 130
    except Exception as exc:  # noqa: BLE001 - the last line of defence: one line, no bare traceback
        return fail(f"unexpected error: {type(exc).__name__}: {exc}",
                     "please report it with the output of `jmoshi --verbose ...`", 1, exc)
    return result if isinstance(result, int) else 0


def _click_failed(exc: typer.TyperException, argv: list[str]) -> int:
    """A mistyped command, flag or value: the command's usage line, what was wrong (with click's "Did you
    mean"), where its help is, and exit 2 (bad usage) whatever click's own code."""
    ctx = getattr(exc, "ctx", None)
    if not exc.format_message():  # `jmoshi` alone: typer printed the help as it raised, the whole answer
        return 2
    if ctx is not None:  # one line: typer's own usage answer is the whole help
        usage = " ".join([ctx.command_path, *ctx.command.collect_usage_pieces(ctx)])
        console.print(f"usage: {usage}", markup=False, highlight=False, soft_wrap=True)
    command = next((arg for arg in argv if not arg.startswith("-")), None)  # the parser may have no context
    where = ctx.command_path if ctx is not None else " ".join(["jmoshi", *filter(None, [command])])
    return fail(exc.format_message(), f"`{where} --help` shows what it takes", 2, exc)


def fail(message: str, hint: str, code: int, exc: BaseException) -> int:
    if ui.settings.show_tracebacks:
        import traceback

        traceback.print_exception(exc)
        detail = getattr(exc, "detail", "")
        if detail:
            console.print(detail, markup=False, highlight=False, soft_wrap=True)
    from rich.markup import escape  # a message may hold brackets: pip install '.[mlx]', a path

    console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    if hint:
        console.print(f"[dim]hint:[/] {escape(hint)}", highlight=False, soft_wrap=True)
    return code
