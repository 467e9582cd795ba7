"""What a long run (serve, front, infer, download) tells the person as it goes: one interface.

Library code is handed a `Reporter` and calls it; it never prints. This base class shows nothing
(library use, tests); `render.ConsoleReporter` is the one that shows it, on stderr, with the URL on
stdout as the run's result.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ContextManager

if TYPE_CHECKING:
    from .backends.contract import Launch
    from .cache.artifacts import WatchFactory
    from .serving.haproxy import Load

Relay = Callable[[str], None]


class Reporter:
    # Per-file download progress: artifacts' watch factory (None: nothing watches).
    watch_download: WatchFactory | None = None

    def note(self, text: str) -> None:
        """Something decided for the person (a precision picked, a fallback, a license)."""

    def event(self, text: str) -> None:
        """Something that happened to a running fleet (a replica crashed, restarted, rejoined...)."""

    def load(self, load: Load) -> None:
        """The front's conversations, active and waiting, when they change."""

    def starting(self, prepared: Any) -> None:
        """serve.Prepared: which server starts, with which model, on which device."""

    def recording(self, folder: Path) -> None:
        """Where `serve --record` saves conversations."""

    def ready(self, launch: Launch, seconds: float, replicas: str | None = None) -> None:
        """The server (or the front: `replicas` says how many of the servers behind it are up, as "2/2") accepts
        connections."""

    def relay(self, server: str, name: str | None = None) -> Relay | None:
        """Where the output of a server child goes (None: to stderr as it is); `server` is what people call
        it (the launch's name), `name` the replica's."""
        return lambda line: None

    def other_relay(self) -> Relay | None:
        """Where another program's output goes (HAProxy's alerts); None: read and kept, not shown."""
        return None

    def loading(self, what: str) -> ContextManager[Any]:
        return contextlib.nullcontext()

    def progress(self, count: int) -> ContextManager[Any] | None:
        """infer: a context manager with file(index, count, source), frame(done, total), result(r); None: none."""
        return None
