"""`jmoshi front`: one URL over `jmoshi serve` instances on other machines.

The same HAProxy front as `serve --replicas`, over backends that jmoshi does not start: HAProxy's
health checks take a backend out of rotation while it is down, and each backend holds one
conversation at a time, so the queue is fair across machines.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from .. import preflight
from ..backends.contract import Launch
from ..cache import artifacts
from ..errors import UsageError
from ..reporter import Reporter
from . import haproxy, tls


@dataclass(frozen=True)
class FrontOptions:
    backends: list[str]
    host: str = "127.0.0.1"
    port: int = 8998
    https: bool = False
    ssl_dir: Path | None = None
    queue_timeout_s: float = 180.0
    drain_timeout_s: float = 60.0


def parse_backend(text: str, index: int) -> haproxy.Backend:
    """HOST:PORT, or HOST:PORT/N for a `jmoshi serve --replicas N` that holds N conversations."""
    match = re.fullmatch(r"\[?([^\[\]/]+?)\]?:(\d{1,5})(?:/(\d{1,3}))?", text.strip())
    if not match or not 1 <= int(match.group(2)) <= 65535 or match.group(3) == "0":
        raise UsageError(f"--backend {text!r} is not HOST:PORT or HOST:PORT/N",
                         "e.g. --backend 10.0.0.5:8998, or --backend 10.0.0.5:8998/4 for a serve with 4 replicas")
    return haproxy.Backend(f"b{index}", match.group(1), int(match.group(2)), int(match.group(3) or 1))


def run(options: FrontOptions, report: Reporter | None = None) -> int:
    from . import replicas, serve

    report = report or Reporter()
    if not options.backends:
        raise UsageError("no --backend given", "e.g. jmoshi front --backend 10.0.0.5:8998 --backend 10.0.0.6:8998")
    if options.https and options.ssl_dir:
        raise UsageError("--https and --ssl both given", "--https makes a certificate; --ssl DIR uses yours")
    backends = [parse_backend(text, i) for i, text in enumerate(options.backends)]
    preflight.check_address(options.host, options.port)
    ssl_dir = tls.check_ssl_dir(options.ssl_dir) if options.ssl_dir else None
    if options.https:
        ssl_dir = tls.ensure_certificate(artifacts.data_dir() / "tls", serve.certificate_names(options.host))
    front = haproxy.Front(options.host, options.port, backends, options.queue_timeout_s, ssl_dir)
    launch = Launch([], {}, options.host, options.port, front.scheme)
    fleet = replicas.Fleet(front, [], report, launch, options.drain_timeout_s)
    return fleet.run()
