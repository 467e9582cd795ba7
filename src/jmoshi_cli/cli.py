"""The Typer app. Commands are thin: parse flags, call the library, show results, choose exit codes.

Heavy modules (torch, moshi, huggingface_hub) are imported inside commands so `--help` stays fast.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from pathlib import Path
from typing import Annotated, Callable, Optional

import typer

from . import __version__
from .console import console
from .errors import JMoshiError

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

def _debug() -> bool:
    return os.environ.get("JMOSHI_DEBUG", "") not in ("", "0")


def _fail(message: str, hint: str, code: int, exc: BaseException) -> typer.Exit:
    if _debug():
        import traceback

        traceback.print_exception(exc)
    console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    if hint:
        console.print(f"[dim]hint:[/] {hint}", highlight=False, soft_wrap=True)
    return typer.Exit(code)


def handled(command: Callable) -> Callable:
    """Turn expected failures into one line + hint and an exit code; Ctrl-C into 130."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except JMoshiError as exc:
            raise _fail(exc.message, exc.hint, exc.exit_code, exc) from None
        except KeyboardInterrupt:
            console.print("[yellow]interrupted[/]")
            raise typer.Exit(130) from None
        except (typer.Exit, typer.Abort):
            raise
        except Exception as exc:  # noqa: BLE001 - the last line of defence: one line, no bare traceback
            raise _fail(f"unexpected error: {type(exc).__name__}: {exc}",
                        "please report it with the output of JMOSHI_DEBUG=1", 1, exc) from None

    return wrapper


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
DeviceOpt = Annotated[str, typer.Option("--device", help="cuda, or cpu (development and tests: not real time).")]
HalfOpt = Annotated[bool, typer.Option("--half", help="float16 instead of bfloat16 (GPUs older than Ampere).")]
MoshiWeightOpt = Annotated[Optional[Path], typer.Option(
    "--moshi-weight", help="A local LM checkpoint (e.g. fine-tuned J-Moshi) instead of the variant's.",
    show_default=False)]


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
    if verbose:
        os.environ["JMOSHI_DEBUG"] = os.environ.get("JMOSHI_DEBUG") or "1"


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
@handled
def doctor(
    variant: VariantOpt = None,
    port: Annotated[int, typer.Option("--port", help="Port to check.")] = 8998,
    host: Annotated[str, typer.Option("--host", help="Address to check the port on.")] = "127.0.0.1",
    as_json: JsonOpt = False,
) -> None:
    """Check this machine for J-Moshi: OS, packages, GPU, VRAM, disk, cache, hub, port."""
    from . import doctor as doc

    catalogue, chosen = _catalogue_and_variant(variant)
    checks = doc.evaluate(doc.gather(catalogue, chosen, host, port), chosen)
    if as_json:
        typer.echo(json.dumps(doc.as_json(checks, chosen), ensure_ascii=False, indent=2))
    else:
        from .render import show_checks

        show_checks(checks, chosen)
    if any(c.status == doc.FAIL for c in checks):
        raise typer.Exit(1)


@app.command()
@handled
def variants(as_json: JsonOpt = False) -> None:
    """List the model variants jmoshi knows (built-in and from your variants.toml)."""
    from dataclasses import asdict

    from .variants import load_catalogue

    catalogue = load_catalogue()
    if as_json:
        rows = [asdict(v) | {"default": v.name == catalogue.default} for v in catalogue.variants.values()]
        typer.echo(json.dumps(rows, ensure_ascii=False, indent=2))
        return
    from .render import show_variants

    show_variants(catalogue)


@app.command()
@handled
def download(
    variant: VariantOrAllOpt = None,
    revision: RevisionOpt = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Show what is missing and its size; fetch nothing.")] = False,
    no_web_ui: Annotated[bool, typer.Option("--no-web-ui", help="Skip the browser UI bundle.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Fetch weights, tokenizer, Mimi codec and web UI into the Hugging Face cache (verified)."""
    from . import artifacts
    from .render import DownloadView, show_plan

    catalogue, names = _variant_names(variant)
    results = []
    for name in names:
        plan = artifacts.resolve(catalogue, catalogue.get(name), revision, web_ui=not no_web_ui)
        if dry_run:
            show_plan(plan)
        else:
            if plan.missing:
                with DownloadView(plan) as view:
                    plan = artifacts.download(plan, on_progress=view.progress, on_retry=view.retry)
            else:
                plan = artifacts.download(plan)
                console.print(f"[green]✓[/] {name}: everything already cached")
        results.append(plan)
    _print_paths(results, as_json, dry_run)


def _print_paths(plans, as_json: bool, dry_run: bool) -> None:
    if as_json:
        out = [{"variant": p.variant.name, "repo": p.variant.repo, "missing_bytes": p.missing_bytes,
                "files": [{"role": e.artifact.role, "repo": e.artifact.repo, "file": e.artifact.filename,
                           "commit": e.artifact.commit, "size": e.artifact.size, "sha256": e.artifact.sha256,
                           "status": e.status, "path": str(e.path) if e.path else None} for e in p.entries]}
               for p in plans]
        typer.echo(json.dumps(out, ensure_ascii=False, indent=2))
    elif not dry_run:
        for plan in plans:
            for entry in plan.entries:
                typer.echo(str(entry.path))


@app.command()
@handled
def verify(
    variant: VariantOrAllOpt = None,
    revision: RevisionOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Re-hash what is cached for a variant; report corrupt or missing files (exit 1 if any)."""
    from . import artifacts
    from .render import show_verify

    catalogue, names = _variant_names(variant)
    bad = False
    report = []
    for name in names:
        plan = artifacts.resolve(catalogue, catalogue.get(name), revision, offline=True)
        entries = [artifacts.verify(e) for e in plan.entries]
        bad = bad or any(e.status not in ("complete", "unverified") for e in entries)
        report.append((plan, entries))
    if as_json:
        typer.echo(json.dumps([{"variant": p.variant.name, "files": [
            {"file": e.artifact.filename, "repo": e.artifact.repo, "status": e.status, "detail": e.detail,
             "path": str(e.path) if e.path else None} for e in entries]} for p, entries in report],
            ensure_ascii=False, indent=2))
    else:
        show_verify(report)
    if bad:
        raise typer.Exit(1)


@app.command()
@handled
def serve(
    variant: VariantOpt = None,
    host: HostOpt = "127.0.0.1",
    port: PortOpt = 8998,
    device: DeviceOpt = "cuda",
    half: HalfOpt = False,
    offline: OfflineOpt = False,
    https: Annotated[bool, typer.Option("--https", help="Serve HTTPS with a self-signed certificate (made once, "
                                        "kept in jmoshi's data folder): browsers give the microphone to "
                                        "other machines only over HTTPS.")] = False,
    ssl: Annotated[Optional[Path], typer.Option("--ssl", help="Folder with your own cert.pem and key.pem.",
                                                show_default=False)] = None,
    revision: RevisionOpt = None,
    moshi_weight: MoshiWeightOpt = None,
    open_browser: Annotated[bool, typer.Option("--open", help="Open the browser when the server is ready.")] = False,
) -> None:
    """Talk to J-Moshi in the browser: check, fetch what is missing, then run moshi.server."""
    from .serve import ServeOptions

    options = ServeOptions(variant, host, port, device, half, offline, https, ssl, revision, moshi_weight)
    raise typer.Exit(_run_serve(options, open_browser))


def _local_files(catalogue, chosen, revision, offline: bool, weight, web_ui: bool):
    """Every file the model needs, in the cache (downloaded and verified if missing, unless offline)."""
    from . import artifacts
    from .render import DownloadView

    plan = artifacts.resolve_or_cached(catalogue, chosen, revision, offline=offline, web_ui=web_ui)
    for note in plan.notes:
        console.print(f"[yellow]note:[/] {note}", soft_wrap=True)
    if weight is not None:
        plan = dataclasses.replace(plan, entries=[e for e in plan.entries if e.artifact.role != "moshi"])
    if plan.missing and not plan.offline:
        with DownloadView(plan) as view:
            plan = artifacts.download(plan, on_progress=view.progress, on_retry=view.retry)
    else:
        plan = artifacts.download(plan)
    return plan, artifacts.model_files_with(plan, weight)


def _run_serve(options, open_browser: bool) -> int:
    """Preflight (seconds), artifacts (cache or download), then supervise moshi.server."""
    from . import artifacts, serve, tls
    from .errors import UsageError

    catalogue, chosen = _catalogue_and_variant(options.variant)
    if options.https and options.ssl_dir:
        raise UsageError("--https and --ssl both given", "--https makes a certificate; --ssl DIR uses yours")
    serve.check_address(options.host, options.port)
    ssl_dir = tls.check_ssl_dir(options.ssl_dir) if options.ssl_dir else None
    weight = serve.check_moshi_weight(options.moshi_weight)
    notes = serve.check_gpu(options.device, chosen.vram_min_gb, chosen.name)
    plan, files = _local_files(catalogue, chosen, options.revision, options.offline, weight, web_ui=True)
    static = artifacts.unpack_web_ui(plan.entry("web_ui"))
    if options.https:
        ssl_dir = tls.ensure_certificate(artifacts.data_dir() / "tls", serve.certificate_names(options.host))
    launch = serve.build_launch(files, static, chosen.repo, options, ssl_dir,
                                half=options.half or serve.needs_half(notes), notes=tuple(notes))
    for note in notes:
        console.print(f"[yellow]note:[/] {note}", soft_wrap=True)
    console.print(f"starting moshi.server ({chosen.name}: {chosen.repo}, {options.device}); "
                  f"license {chosen.license}", soft_wrap=True)

    def on_ready(seconds: float) -> None:
        _announce_ready(launch, seconds, open_browser)

    return serve.supervise(serve.Server(launch), on_ready)


def _announce_ready(launch, seconds: float, open_browser: bool) -> None:
    import socket

    from .serve import is_loopback, lan_addresses

    console.print(f"[bold green]ready[/] at {launch.url} (took {seconds:.1f} s). One conversation at a time: "
                  "a second browser waits until the first one hangs up. Ctrl-C stops the server.", soft_wrap=True)
    if not is_loopback(launch.host):
        hosts = lan_addresses() if launch.host in ("0.0.0.0", "::") else [launch.host]
        for address in hosts:
            console.print(f"  on the network: {launch.scheme}://{address}:{launch.port}/", soft_wrap=True)
        if launch.scheme == "http":
            console.print("  browsers give the microphone only to https:// pages or localhost: use --https, or "
                          f"tunnel: ssh -L {launch.port}:localhost:{launch.port} {socket.gethostname()} and open "
                          f"http://localhost:{launch.port}/", soft_wrap=True)
    typer.echo(launch.url)
    if open_browser:
        import webbrowser

        webbrowser.open(launch.url)


@app.command()
@handled
def selftest(as_json: JsonOpt = False) -> None:
    """Prove the installed stack works, before downloading 16 GB: a tiny model on the CPU (about a minute)."""
    from . import selftest as st

    with console.status("selftest") as status:
        result = st.run(on_step=lambda step: status.update(f"selftest: {step}"))
    figures = {"ready_s": round(result.ready_s, 2), "handshake_s": round(result.handshake_s, 3),
               "audio_samples": result.audio_samples, "audio_s": round(result.audio_samples / 24000, 2),
               "text_pieces": len(result.text_pieces), "frames_sent": result.sent_frames,
               "ms_per_frame": round(result.mean_frame_ms, 1)}
    if as_json:
        typer.echo(json.dumps({"ok": True, **figures}, ensure_ascii=False))
    console.print(f"[green]OK[/] moshi.server ready in {figures['ready_s']} s; handshake {figures['handshake_s']} s; "
                  f"{figures['audio_samples']} audio samples ({figures['audio_s']} s) and {figures['text_pieces']} "
                  f"text pieces back for {figures['frames_sent']} frames sent; {figures['ms_per_frame']} ms per frame "
                  "on this CPU (80 ms is real time)", soft_wrap=True)


@app.command()
@handled
def infer(
    inputs: Annotated[list[Path], typer.Argument(help="Audio files or folders (wav, flac, mp3, ogg; any rate).",
                                                 show_default=False)],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the results.")] = Path("jmoshi-out"),
    channel: Annotated[str, typer.Option("--channel", help="The user's side of a stereo file: left, right or mix.")]
    = "left",
    variant: VariantOpt = None,
    revision: RevisionOpt = None,
    device: DeviceOpt = "cuda",
    half: HalfOpt = False,
    offline: OfflineOpt = False,
    moshi_weight: MoshiWeightOpt = None,
    temp: Annotated[Optional[float], typer.Option("--temp", help="Audio sampling temperature [default: 0.8]",
                                                  show_default=False)] = None,
    temp_text: Annotated[Optional[float], typer.Option("--temp-text", help="Text temperature [default: 0.7]",
                                                       show_default=False)] = None,
    top_k: Annotated[Optional[int], typer.Option("--top-k", help="Audio top-k [default: 250]",
                                                 show_default=False)] = None,
    top_k_text: Annotated[Optional[int], typer.Option("--top-k-text", help="Text top-k [default: 25]",
                                                      show_default=False)] = None,
    seed: Annotated[Optional[int], typer.Option("--seed", help="Make the run reproducible.",
                                                show_default=False)] = None,
    as_json: JsonOpt = False,
) -> None:
    """Talk to J-Moshi from audio files: its voice, a stereo dialogue wav and a timed transcript per file."""
    from . import infer as inf
    from . import serve
    from .render import InferView, show_infer_summary

    options = inf.InferOptions(device=device, half=half, channel=channel, temp=temp, temp_text=temp_text,
                               top_k=top_k, top_k_text=top_k_text, seed=seed)
    sources = inf.collect_inputs(inputs, on_warning=lambda text: console.print(f"[yellow]note:[/] {text}"))
    inf.prepare_out_dir(out)
    catalogue, chosen = _catalogue_and_variant(variant)
    weight = serve.check_moshi_weight(moshi_weight)
    notes = serve.check_gpu(device, chosen.vram_min_gb, chosen.name)
    for note in notes:
        console.print(f"[yellow]note:[/] {note}", soft_wrap=True)
    if serve.needs_half(notes):
        options = dataclasses.replace(options, half=True)
    _, files = _local_files(catalogue, chosen, revision, offline, weight, web_ui=False)
    if channel == "left":
        console.print("the user is the left channel of stereo inputs (--channel right|mix to change)")
    with console.status(f"loading {chosen.name} on {device}"):
        session = inf.Session(files, options)
    with InferView(len(sources)) as view:
        results = session.run_many(sources, out, on_file=view.file, on_frame=view.frame, on_result=view.result)
    show_infer_summary(results, inf.summarize(results))
    if as_json:
        typer.echo(json.dumps([_result_json(r) for r in results], ensure_ascii=False, indent=2))
    else:
        for result in results:
            for path in result.outputs.values():
                typer.echo(str(path))
    if any(not r.ok for r in results):
        raise typer.Exit(1)


def _result_json(result) -> dict:
    return {"source": str(result.source), "ok": result.ok, "error": result.error, "audio_s": result.audio_s,
            "compute_s": result.compute_s, "rtf": result.rtf, "note": result.note, "channel": result.channel,
            "frames": result.frames, "segments": result.segments, "text": result.text,
            "outputs": {k: str(v) for k, v in result.outputs.items()}}


def main() -> None:
    """Console entry point."""
    app(prog_name="jmoshi")


