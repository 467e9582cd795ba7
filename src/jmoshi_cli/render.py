"""How results look to a person on stderr: tables, progress bars, or plain lines off a terminal."""

from __future__ import annotations

import time

from rich.table import Table

from .artifacts import Status
from .console import console, plain

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
    table = Table(title_justify="left")
    for column in ("name", "repo", "revision", "VRAM", "license", "description"):
        table.add_column(column, overflow="fold")
    for v in catalogue.variants.values():
        name = v.name + (" (default)" if v.name == catalogue.default else "")
        table.add_row(name, v.repo, v.revision, f"{v.vram_gb:g} GB", v.license, v.description)
    console.print(table)
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


def show_verify(report) -> None:
    for plan, entries in report:
        console.print(f"{plan.variant.name} ({plan.variant.repo}):", soft_wrap=True)
        for e in entries:
            mark = {Status.COMPLETE: "[green]ok[/]", Status.UNVERIFIED: "[yellow]unverified[/]"}.get(
                e.status, f"[bold red]{e.status.value}[/]")
            detail = f" ({e.detail})" if e.detail else ""
            console.print(f"  {mark} {e.artifact.repo}/{e.artifact.filename}{detail}", soft_wrap=True)


class DownloadView:
    """Rich progress bars on a terminal; one line per file (start, retry, done) elsewhere."""

    def __init__(self, plan):
        self.plan = plan
        self.tasks: dict[str, int] = {}
        self.started: dict[str, float] = {}
        self.progress_bar = None

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
        for e in self.plan.missing:
            key = e.artifact.label
            self.started[key] = time.monotonic()
            if self.progress_bar is not None:
                self.tasks[key] = self.progress_bar.add_task(e.artifact.filename, total=e.artifact.size,
                                                             completed=e.partial_bytes)
            else:
                resume = f", resuming at {_size(e.partial_bytes)}" if e.partial_bytes else ""
                console.print(f"downloading {key} ({_size(e.artifact.size)}{resume})", soft_wrap=True)
        return self

    def progress(self, entry, done: int) -> None:
        key = entry.artifact.label
        if self.progress_bar is not None and key in self.tasks:
            self.progress_bar.update(self.tasks[key], completed=done)
        elif self.progress_bar is None and entry.status is Status.COMPLETE:
            seconds = max(time.monotonic() - self.started.get(key, time.monotonic()), 1e-6)
            console.print(f"done {key}: {_size(done)} in {seconds:.1f} s ({done / seconds / 1e6:.1f} MB/s), "
                          "sha256 verified", soft_wrap=True)

    def retry(self, entry, attempt: int, exc: BaseException, delay: float) -> None:
        console.print(f"[yellow]retrying[/] {entry.artifact.filename} in {delay:.1f} s "
                      f"(attempt {attempt} failed: {type(exc).__name__})", soft_wrap=True)

    def __exit__(self, *exc):
        if self.progress_bar is not None:
            self.progress_bar.__exit__(*exc)
        return False


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
    console.print(f"[yellow]note:[/] {text}", soft_wrap=True)


def show_starting(variant, launch) -> None:
    device = launch.argv[launch.argv.index("--device") + 1] if "--device" in launch.argv else "?"
    console.print(f"starting moshi.server ({variant.name}: {variant.repo}, {device}); license {variant.license}",
                  soft_wrap=True)


def show_ready(launch, seconds: float) -> None:
    import socket

    from .serve import is_loopback, lan_addresses

    console.print(f"[bold green]ready[/] at {launch.url} (took {seconds:.1f} s). One conversation at a time: "
                  "a second browser waits until the first one hangs up. Ctrl-C stops the server.", soft_wrap=True)
    if is_loopback(launch.host):
        return
    hosts = lan_addresses() if launch.host in ("0.0.0.0", "::") else [launch.host]
    for address in hosts:
        console.print(f"  on the network: {launch.scheme}://{address}:{launch.port}/", soft_wrap=True)
    if launch.scheme == "http":
        console.print("  browsers give the microphone only to https:// pages or localhost: use --https, or "
                      f"tunnel: ssh -L {launch.port}:localhost:{launch.port} {socket.gethostname()} and open "
                      f"http://localhost:{launch.port}/", soft_wrap=True)


def server_relay(verbose: bool):
    """How the child's output reaches the person: every line as it comes."""
    import sys

    def relay(line: str) -> None:
        sys.stderr.write(line)
        sys.stderr.flush()

    return relay
