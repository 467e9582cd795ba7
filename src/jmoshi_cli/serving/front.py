"""`jmoshi front`: one URL over `jmoshi serve` instances on other machines.

The same HAProxy front as `serve --replicas`, over backends that jmoshi does not start: HAProxy's
health checks take a backend out of rotation while it is down, and each backend holds one
conversation at a time, so the queue is fair across machines.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from .. import addresses, preflight
from ..backends.contract import ChildContract, Launch
from ..cache import artifacts
from ..errors import UsageError
from ..reporter import Reporter
from . import haproxy, tls
from .access import AccessOptions, decide


@dataclass(frozen=True)
class FrontOptions:
    backends: list[str]
    host: str = "127.0.0.1"
    port: int = 8998
    https: bool = False
    ssl_dir: Path | None = None
    queue_timeout_s: float = 180.0
    drain_timeout_s: float = 60.0
    access: AccessOptions = field(default_factory=AccessOptions)  # the same token as the serves behind it
    metrics_host: str | None = None  # /stats and /metrics without the token, on this address only
    metrics_port: int = 8405


# RFC 1123 host names: dot-separated labels of letters, digits and inner hyphens, 1 to 63 characters each.
_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")


def parse_backend(text: str, index: int) -> haproxy.Backend:
    """HOST:PORT, or HOST:PORT/N for a `jmoshi serve --replicas N` that holds N conversations.

    HOST goes into haproxy.cfg as it is: only an IP address or a host name gets there, so that no value can
    add a line or a comment to the file."""
    match = re.fullmatch(r"(\[[^\[\]]*\]|[^:\[\]/]+):(\d{1,5})(?:/(\d{1,3}))?", text.strip())
    host = _backend_host(match.group(1)) if match else None
    if not match or host is None or not 1 <= int(match.group(2)) <= 65535 or int(match.group(3) or 1) == 0:
        raise UsageError(f"--backend {text!r} is not HOST:PORT or HOST:PORT/N",
                         "HOST is an IP address ([v6] in brackets) or a host name: e.g. --backend 10.0.0.5:8998, "
                         "or --backend 10.0.0.5:8998/4 for a serve with 4 replicas")
    return haproxy.Backend(f"b{index}", host, int(match.group(2)), int(match.group(3) or 1))


def _backend_host(text: str) -> str | None:
    """The host of a --backend (an IPv6 address without its brackets), or None if it is not one."""
    import ipaddress

    if text.startswith("["):
        try:  # no zone id (`%eth0`): its text is free-form
            return str(ipaddress.IPv6Address(text[1:-1])) if "%" not in text else None
        except ValueError:
            return None
    try:
        return str(ipaddress.IPv4Address(text))
    except ValueError:
        pass
    labels = text.split(".")
    # An all-digit last label is a mistyped IPv4 address, not a name (RFC 1123, 2.1).
    if len(text) > 253 or labels[-1].isdigit() or not all(_LABEL.fullmatch(label) for label in labels):
        return None
    return text


def run(options: FrontOptions, report: Reporter | None = None) -> int:
    from . import replicas

    report = report or Reporter()
    if not options.backends:
        raise UsageError("no --backend given", "e.g. jmoshi front --backend 10.0.0.5:8998 --backend 10.0.0.6:8998")
    if options.https and options.ssl_dir:
        raise UsageError("--https and --ssl both given", "--https makes a certificate; --ssl DIR uses yours")
    backends = [parse_backend(text, i) for i, text in enumerate(options.backends)]
    preflight.check_address(options.host, options.port)
    ssl_dir = tls.check_ssl_dir(options.ssl_dir) if options.ssl_dir else None
    if options.https:
        ssl_dir = tls.ensure_certificate(artifacts.data_dir() / "tls", addresses.certificate_names(options.host))
    decided = decide(options.access, artifacts.data_dir(), record=False)
    metrics = check_metrics(options.metrics_host, options.metrics_port, options.host, options.port)
    front = haproxy.Front(options.host, options.port, backends, options.queue_timeout_s, ssl_dir,
                          access=decided.access, limits=decided.limits, metrics=metrics)
    launch = Launch([], {}, options.host, options.port, front.scheme,
                    ChildContract(access=decided.access, limits=decided.limits))
    fleet = replicas.Fleet(front, [], report, launch, options.drain_timeout_s)
    return fleet.run()


def check_metrics(host: str | None, port: int, front_host: str, front_port: int) -> tuple[str, int] | None:
    """--metrics-host/--metrics-port: a second address for /stats and /metrics without the token, or None."""
    if host is None:
        return None
    if port == front_port:
        raise UsageError(f"--metrics-port {port} is the front's own port", "e.g. --metrics-port 8405")
    preflight.check_address(host, port)
    return host, port
