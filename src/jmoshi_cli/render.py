"""How results look to a person on stderr: tables, progress bars, or plain lines off a terminal."""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass

from rich.markup import escape
from rich.table import Table

from . import results
from .cache.artifacts import Status
from .console import console, plain
from .reporter import Reporter

STYLE = {"OK": "green", "WARN": "yellow", "FAIL": "bold red"}  # by doctor.Level value


def show_checks(checks, variant) -> None:
    table = Table(title=f"jmoshi doctor — variant {variant.name} ({variant.repo})", show_lines=False,
                  title_justify="left")
    for column in ("", "check", "detail"):
        table.add_column(column, overflow="fold")
    for check in checks:
        detail = check.detail + (f"\n[dim]→ {check.hint}[/]" if check.hint else "")
        table.add_row(f"[{STYLE[check.status.value]}]{check.status.value}[/]", check.name, detail)
    if plain():
        for check in checks:
            hint = f"  (hint: {check.hint})" if check.hint else ""
            console.print(f"{check.status.value:<4} {check.name}: {check.detail}{hint}", soft_wrap=True)
    else:
        console.print(table)
    from .doctor import Level

    fails = sum(c.status is Level.FAIL for c in checks)
    warns = sum(c.status is Level.WARN for c in checks)
    console.print(f"{fails} failed, {warns} warnings. `jmoshi selftest` proves the installed stack end to end "
                  "with a tiny model on the CPU (about a minute, no download).", soft_wrap=True)


def show_variants(catalogue) -> None:
    """Three short lines a variant (a table of six columns wraps every cell at 80 columns)."""
    for v in catalogue.variants.values():
        name = v.name + (" (default)" if v.name == catalogue.default else "")
        revision = f"@{v.revision}" if v.revision != "main" else ""
        int8 = f", int8 {v.vram_min_int8_gb:g} GB" if v.vram_min_int8_gb else ""
        console.print(f"[bold]{name}[/]  {v.repo}{revision}  GPU {v.vram_gb:g} GB{int8}", soft_wrap=True)
        if v.description:
            console.print(f"  {v.description}", soft_wrap=True)
        if v.license:
            console.print(f"  [dim]license: {v.license}{'  ' + v.license_url if v.license_url else ''}[/]",
                          soft_wrap=True)
    console.print(f"catalogue: {', '.join(str(s) for s in catalogue.sources)}", soft_wrap=True)


def _size(n: int | None) -> str:
    if n is None:
        return "?"
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"


def show_plan(plan) -> None:
    console.print(f"{plan.variant.name} ({plan.variant.repo}):", soft_wrap=True)
    for e in plan.entries:
        state = e.status.value if e.status is not Status.PARTIAL else f"partial, {_size(e.partial_bytes)} already here"
        console.print(f"  {e.artifact.repo}/{e.artifact.filename}  {_size(e.artifact.size)}  {state}", soft_wrap=True)
    console.print(f"  to download: {len(plan.missing)} file(s), {_size(plan.missing_bytes)}", soft_wrap=True)


def show_verify(report, derived=None) -> None:
    """Each variant's hub files, then the files jmoshi made from them (`derived`: variant name -> rows)."""
    for plan, entries in report:
        console.print(f"{plan.variant.name} ({plan.variant.repo}):", soft_wrap=True)
        for e in entries:
            _verify_row(e.status, f"{e.artifact.repo}/{e.artifact.filename}", e.detail)
        for made in (derived or {}).get(plan.variant.name, []):
            source = f" of {made.made_from.filename}" if made.made_from else ""
            _verify_row(made.status, f"jmoshi's {made.kind}{source}: {made.path}", made.detail)


def _verify_row(status, name: str, detail: str) -> None:
    mark = {Status.COMPLETE: "[green]ok[/]", Status.UNVERIFIED: "[yellow]unverified[/]"}.get(
        status, f"[bold red]{status.value}[/]")
    console.print(f"  {mark} {escape(name)}{f' ({detail})' if detail else ''}", soft_wrap=True)


class DownloadView:
    """Rich progress bars on a terminal; elsewhere one line per file (start, retry, done) and a total.

    Each file is timed from the start of its own fetch, so its line gives its own size, time and
    rate. Hashing a file without downloading it (one another tool put in the cache, or a hash
    catching up after a download) shows as "verifying" once it takes longer than HASH_QUIET_S.
    """

    HASH_QUIET_S = 1.0
    PLAIN_EVERY_S = 5.0  # off a terminal, how often a long hash prints how far it got

    def __init__(self, plan):
        self.plan = plan
        self.progress_bar = None
        self.tasks: dict[str, int] = {}  # label -> rich task, while downloading
        self.started: dict[str, tuple[float, int]] = {}  # label -> (start of its fetch, bytes already there)
        self.hashes: dict[str, _HashClock] = {}  # label -> the hash under way
        self.finished: list[int] = []  # bytes fetched this run, per file done
        self.first_start: float | None = None

    def __enter__(self):
        if not plain():
            from rich.progress import (
                BarColumn,
                DownloadColumn,
                Progress,
                TextColumn,
                TimeRemainingColumn,
                TransferSpeedColumn,
            )

            self.progress_bar = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                                         TransferSpeedColumn(), TimeRemainingColumn(), console=console)
            self.progress_bar.__enter__()
        return self

    # --- downloading -------------------------------------------------------------------------------

    def progress(self, entry, done: int) -> None:
        key = entry.artifact.label
        if entry.status.usable:  # fetched: verified, or unverified when no hash is known for it
            self._done(entry, done)
        elif key not in self.started or entry.status is Status.CORRUPT:
            self._start(entry, done)
        elif self.progress_bar is not None and key in self.tasks:
            self.progress_bar.update(self.tasks[key], completed=done)

    def _start(self, entry, done: int) -> None:
        key, name = entry.artifact.label, entry.artifact.filename
        now = time.monotonic()
        self.first_start = self.first_start or now
        self.started[key] = (now, done)
        if entry.status is Status.CORRUPT:
            console.print(f"[yellow]{key} is corrupt[/] ({entry.detail}); downloading it again", soft_wrap=True)
        if self.progress_bar is not None:
            if key in self.tasks:
                self.progress_bar.reset(self.tasks[key], completed=done)
            else:
                self.tasks[key] = self.progress_bar.add_task(name, total=entry.artifact.size, completed=done)
        elif entry.status is not Status.CORRUPT:
            resume = f", resuming at {_size(done)}" if done else ""
            console.print(f"downloading {key} ({_size(entry.artifact.size)}{resume})", soft_wrap=True)

    def _done(self, entry, done: int) -> None:
        key = entry.artifact.label
        started, already = self.started.get(key, (time.monotonic(), 0))
        seconds = max(time.monotonic() - started, 1e-6)
        fetched = max(done - already, 0)
        self.finished.append(fetched)
        if self.progress_bar is not None and key in self.tasks:
            self.progress_bar.update(self.tasks[key], completed=done)
        if self.progress_bar is None:
            resumed = f" ({_size(fetched)} this run)" if already else ""
            console.print(f"done {key}: {_size(done)}{resumed} in {seconds:.1f} s ({fetched / seconds / 1e6:.1f} MB/s)"
                          f", {_verified_by(entry)}", soft_wrap=True)

    def retry(self, entry, attempt: int, exc: BaseException, delay: float) -> None:
        console.print(f"[yellow]retrying[/] {entry.artifact.filename} in {delay:.1f} s "
                      f"(attempt {attempt} failed: {type(exc).__name__})", soft_wrap=True)

    # --- hashing without downloading ------------------------------------------------------------------

    def hashing(self, entry, done: int) -> None:
        key, now = entry.artifact.label, time.monotonic()
        clock = self.hashes.setdefault(key, _HashClock(now))
        total = _file_size(entry)
        finished = total is not None and done >= total
        if now - clock.started >= self.HASH_QUIET_S:
            self._show_hash(entry, done, total, clock, finished)
        if finished:
            del self.hashes[key]

    def _show_hash(self, entry, done: int, total: int | None, clock: _HashClock, finished: bool) -> None:
        now = time.monotonic()
        if self.progress_bar is not None:
            if clock.task is None:
                clock.task = self.progress_bar.add_task(f"verifying {entry.artifact.filename}", total=total)
            self.progress_bar.update(clock.task, completed=done)
        elif clock.printed is None or finished or now - clock.printed >= self.PLAIN_EVERY_S:
            clock.printed = now
            console.print(f"verifying {entry.artifact.label}: {_size(done)} of {_size(total)} hashed, "
                          f"{now - clock.started:.0f} s", soft_wrap=True)

    def __exit__(self, *exc):
        if self.progress_bar is not None:
            self.progress_bar.__exit__(*exc)
        if exc[0] is None and self.finished:
            self._summary()
        return False

    def _summary(self) -> None:
        fetched = sum(self.finished)
        seconds = max(time.monotonic() - (self.first_start or time.monotonic()), 1e-6)
        console.print(f"downloaded {len(self.finished)} file(s): {_size(fetched)} in {seconds:.1f} s "
                      f"({fetched / seconds / 1e6:.1f} MB/s), every file verified", soft_wrap=True)


@dataclass
class _HashClock:
    """One file being hashed: since when, when a line was last printed, its bar."""

    started: float
    printed: float | None = None
    task: int | None = None


def _verified_by(entry) -> str:
    from .cache.artifacts import expected_hash

    expected = expected_hash(entry)
    if expected is None:
        return "no content hash known to verify it"
    return f"{'sha256' if expected[0] == 'sha256' else 'git blob id'} verified"


def _file_size(entry) -> int | None:
    if entry.artifact.size is not None:
        return entry.artifact.size
    try:
        return entry.path.stat().st_size if entry.path is not None else None
    except OSError:
        return None


class InferView:
    """A bar over files and one over the current file's frames; plain lines off a terminal."""

    def __init__(self, count: int):
        self.count = count
        self.bar = None
        self.files_task = self.frames_task = None

    def __enter__(self):
        if not plain():
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                TimeRemainingColumn(), console=console)
            self.bar.__enter__()
            self.files_task = self.bar.add_task("files", total=self.count)
            self.frames_task = self.bar.add_task("frames", total=None)
        return self

    def file(self, index: int, count: int, source) -> None:
        if self.bar is not None:
            self.bar.update(self.frames_task, description=f"{source.name}", completed=0, total=None)
        else:
            console.print(f"[{index + 1}/{count}] {source}", soft_wrap=True)

    def frame(self, done: int, total: int) -> None:
        if self.bar is not None:
            self.bar.update(self.frames_task, completed=done, total=total)

    def result(self, result) -> None:
        if self.bar is not None:
            self.bar.advance(self.files_task)
        if not result.ok:
            console.print(f"[bold red]failed:[/] {result.error}", soft_wrap=True)
        elif result.note:
            console.print(f"[yellow]note:[/] {result.source.name}: {result.note}", soft_wrap=True)

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.__exit__(*exc)
        return False


def show_infer_summary(results, totals) -> None:
    table = Table(title_justify="left")
    for column in ("file", "audio (s)", "real-time factor", "result"):
        table.add_column(column, overflow="fold")
    for r in results:
        table.add_row(str(r.source), f"{r.audio_s:.1f}", f"{r.rtf:.2f}" if r.ok else "-",
                      "[green]ok[/]" if r.ok else f"[red]{r.error}[/]")
    console.print(table)
    console.print(f"{totals['ok']} of {totals['files']} files done, {totals['audio_s']:.1f} s of audio in "
                  f"{totals['compute_s']:.1f} s (real-time factor {totals['rtf']:.2f}; below 1 is faster than "
                  "real time)", soft_wrap=True)


def show_note(text: str) -> None:
    console.print(f"[yellow]note:[/] {escape(text)}", soft_wrap=True)


def show_starting(prepared) -> None:
    """serve.Prepared: which server, model, device and precision, and the weights' license."""
    variant, spec = prepared.variant, prepared.spec
    many = f", {spec.conversations} conversations at once" if spec.conversations > 1 else ""
    console.print(f"starting {prepared.launch.name} ({variant.name}: {variant.repo}, {spec.device}, "
                  f"{spec.precision.label}{many}); license {variant.license}", soft_wrap=True)


def show_ready(launch, seconds: float, replicas: str | None = None) -> None:
    import socket

    from .addresses import is_loopback, reachable_hosts

    url = launch.page_url()
    at_once = ("One conversation at a time: a second browser waits until the first one hangs up" if launch.slots == 1
               else f"{launch.slots} conversations at once: one more browser waits until one of them hangs up")
    if replicas is None:
        console.print(f"[bold green]ready[/] at {url} (took {seconds:.1f} s). {at_once}. Ctrl-C stops the server.",
                      soft_wrap=True)
    else:
        per = "One conversation" if launch.slots == 1 else f"{launch.slots} conversations"
        console.print(f"[bold green]ready[/] at {url} (took {seconds:.1f} s; {replicas} up behind the "
                      f"front). {per} per replica; others wait in a queue. Live numbers: "
                      f"{launch.url}stats and {launch.url}metrics (Prometheus; with the token). Ctrl-C drains and "
                      "stops.", soft_wrap=True)
    if launch.token is None and not is_loopback(launch.host):
        console.print("[bold red]warning:[/] --no-token on a network address: anyone on the network can talk to "
                      "J-Moshi" + (" and be recorded" if _records(launch) else "") + ".", soft_wrap=True)
    hosts = reachable_hosts(launch.host)
    for address in hosts:
        console.print(f"  on the network: {launch.page_url(address)}", soft_wrap=True)
    if hosts:
        show_qr(launch.page_url(hosts[0]))
    if hosts and launch.scheme == "http":
        console.print("  browsers give the microphone only to https:// pages or localhost: use --https, or "
                      f"tunnel: ssh -L {launch.port}:localhost:{launch.port} {socket.gethostname()} and open "
                      f"http://localhost:{launch.port}/", soft_wrap=True)


def _records(launch) -> bool:
    return launch.contract is not None and launch.contract.record is not None


def show_qr(url: str) -> None:
    """The URL as a QR code in the terminal, for phones and tablets (two rows of modules per line)."""
    import io

    import segno

    out = io.StringIO()
    segno.make(url, error="m").terminal(out=out, compact=True, border=2)
    console.print(f"  QR code of {url}:", soft_wrap=True)
    console.print(out.getvalue(), markup=False, highlight=False, soft_wrap=True, end="")


def server_relay(verbose: bool, name: str | None = None, server: str = "moshi.server"):
    """How the child's output reaches the person, one relay per child (`name`, a replica's, prefixes its
    lines; `server` names the program in the steps it reports, as its launch does).

    With --verbose, every line as it came. Otherwise through server_log: frame times as a summary,
    a browser hanging up as one line, known harmless lines left out, everything else as it came.
    """
    import sys

    from .serving.server_log import FRAME_BUDGET_MS, Kind, ServerLog

    if verbose:
        def raw(line: str) -> None:
            sys.stderr.write(line)
            sys.stderr.flush()

        return raw

    log, prefix = ServerLog(), f"{name}: " if name else ""
    said = {Kind.CONNECTED: "a browser connected", Kind.HUNG_UP: "the browser hung up"}

    def frames(stats) -> str:
        if stats.real_time:
            pace = "real time"
        elif stats.median_ms <= FRAME_BUDGET_MS:
            pace = f"real time on most frames; some take longer than {FRAME_BUDGET_MS:g} ms"
        else:
            pace = "slower than real time: J-Moshi's answers will lag and stutter"
        scope = "conversation over: " if stats.final else ""
        return (f"{scope}{stats.frames} frames, median {stats.median_ms:.0f} ms, p95 {stats.p95_ms:.0f} ms "
                f"per {FRAME_BUDGET_MS:g} ms frame: {pace}")

    def show(event) -> None:
        if event.kind is Kind.QUIET:
            return
        text, style = event.text, None
        if event.kind is Kind.FRAMES:
            text, style = frames(event.stats), "dim"
        elif event.kind in said:
            text = said[event.kind]
        elif event.kind is Kind.STEP:
            text, style = f"{server}: {event.text}", "dim"
        console.print(prefix + text, style=style, markup=False, highlight=False, soft_wrap=True)

    def relay(line: str) -> None:
        for event in log.feed(line, time.monotonic()):
            show(event)

    return relay


def show_load(load) -> None:
    servers = len(load.servers)
    console.print(f"conversations: {load.active} active, {load.queued} waiting; "
                  f"{load.healthy}/{servers} replicas healthy", soft_wrap=True)


def show_event(text: str) -> None:
    console.print(f"[yellow]replicas:[/] {escape(text)}", soft_wrap=True)


def show_recording(folder) -> None:
    from .recording.format import BYTES_PER_MINUTE

    console.print(f"[bold]recording[/] every conversation into {folder}/<UTC start>-<id>/ (both voices, transcript, "
                  f"settings; about {BYTES_PER_MINUTE / 1e6:.0f} MB per minute). Tell participants that they are "
                  "recorded.", soft_wrap=True)


def show_recordings(folder, sessions) -> None:
    from .recording import Ended

    if not sessions:
        console.print(f"no recordings in {folder}", soft_wrap=True)
        return
    style = {Ended.HANG_UP: "green", Ended.RUNNING: "cyan", Ended.SERVER_STOP: "yellow"}
    table = Table(title_justify="left")
    for column in ("start (UTC)", "duration", "variant", "replica", "ended", "folder"):
        table.add_column(column, overflow="fold")
    for s in sessions:
        minutes, seconds = divmod(round(s.duration_s), 60)
        ended = f"[{style.get(s.ended, 'red')}]{s.ended.value}[/]" + (f" ({s.problem})" if s.problem else "")
        table.add_row(s.start_utc.replace("T", " ")[:19], f"{minutes}:{seconds:02d}", s.variant, s.replica, ended,
                      s.path.name)
    console.print(table)
    total = sum(s.duration_s for s in sessions)
    console.print(f"{len(sessions)} conversation(s), {total / 60:.1f} minutes in {folder}", soft_wrap=True)


# --- command results (results.py), for people -----------------------------------------------------


@functools.singledispatch
def show(result) -> None:
    """The person's view of a command's result, on stderr; each result type registers its own."""
    raise TypeError(f"no view for {type(result).__name__}")


@show.register
def _(result: results.DoctorResult) -> None:
    show_checks(result.checks, result.variant)


@show.register
def _(result: results.VariantsResult) -> None:
    show_variants(result.catalogue)


@show.register
def _(result: results.DownloadResult) -> None:
    for plan in result.plans:
        if result.dry_run:
            show_plan(plan)
        elif not plan.fetched:
            console.print(f"[green]✓[/] {plan.variant.name}: everything already cached")


@show.register
def _(result: results.VerifyResult) -> None:
    show_verify(result.report, result.derived)


@show.register
def _(result: results.RecordingsResult) -> None:
    show_recordings(result.folder, result.sessions)
    if result.figures:
        from .analysis.report import show_session_stats

        show_session_stats(result.figures)


@show.register
def _(result: results.SelftestResult) -> None:
    figures = result.to_json()
    console.print(f"[green]OK[/] {result.server} ready in {figures['ready_s']} s; handshake {figures['handshake_s']} "
                  f"s; {figures['audio_samples']} audio samples ({figures['audio_s']} s) and "
                  f"{figures['text_pieces']} text pieces back for {figures['frames_sent']} frames sent; "
                  f"{figures['ms_per_frame']} ms per frame on this CPU (80 ms is real time)", soft_wrap=True)


@show.register
def _(result: results.InferResult) -> None:
    show_infer_summary(result.files, result.totals)


@show.register
def _(result: results.AnalyzeResult) -> None:
    from .analysis import report

    outcome = result.outcome
    report.show_params(result.params)
    report.show_set(outcome.first)
    if outcome.second is not None:
        report.show_set(outcome.second, "--against")
        report.show_comparison(outcome.first, outcome.second)


class ConsoleReporter(Reporter):
    """The person's view of a long run: notes and events on stderr, the URL on stdout once ready."""

    watch_download = DownloadView

    def __init__(self, verbose: bool = False, open_browser: bool = False):
        self.verbose = verbose
        self.open_browser = open_browser

    def note(self, text: str) -> None:
        show_note(text)

    def event(self, text: str) -> None:
        show_event(text)

    def load(self, load) -> None:
        show_load(load)

    def starting(self, prepared) -> None:
        show_starting(prepared)

    def recording(self, folder) -> None:
        show_recording(folder)

    def ready(self, launch, seconds: float, replicas: str | None = None) -> None:
        import typer

        show_ready(launch, seconds, replicas)
        typer.echo(launch.page_url())  # the result, for scripts
        if self.open_browser:
            import webbrowser

            webbrowser.open(launch.page_url())

    def relay(self, server: str, name: str | None = None):
        return server_relay(self.verbose, name, server)

    def other_relay(self):
        return server_relay(True) if self.verbose else None

    def loading(self, what: str):
        return console.status(what)

    def progress(self, count: int):
        return InferView(count)
