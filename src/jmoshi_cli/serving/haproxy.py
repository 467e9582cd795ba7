"""HAProxy in front of moshi.server replicas: one URL, one conversation per replica, a fair queue.

moshi.server holds one conversation per process. HAProxy gives each replica `maxconn 1` on the
`/api/chat` websocket and queues the rest in arrival order (`balance leastconn`, `timeout queue`);
a request still queued when that timeout ends gets our 503 page ("all replicas are busy"). The
static web UI goes to any healthy replica without a limit. Health checks are TCP connections: a
replica that is talking may not answer HTTP for seconds (moshi.server runs the model on its event
loop, and on a slow device a backlog of frames holds the loop), but the kernel still accepts its
connections, while a dead or restarting one refuses them at once. The runtime API (a unix socket)
reports active and queued conversations and drains replicas before they stop.
"""

from __future__ import annotations

import csv
import hashlib
import io
import os
import re
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .. import scratch
from ..backends.contract import Access, Launch, Limits
from ..errors import PreflightError
from . import pages, token
from .child import Server

START_TIMEOUT_S = 10.0  # HAProxy makes its runtime socket in milliseconds; this long means it hangs

MIN_VERSION = (2, 4)
CHAT_BACKEND = "chat"
UI_BACKEND = "ui"
STATS_BACKEND = "stats"
INSTALL_HINT = "install it: `sudo apt-get install haproxy` (Debian/Ubuntu) or `sudo dnf install haproxy`"


@dataclass(frozen=True)
class Backend:
    """One moshi.server (or one `jmoshi serve` on another machine) behind the front."""

    name: str
    host: str
    port: int
    slots: int = 1  # conversations it holds at once: 1 per moshi.server, N for a `serve --replicas N`

    @property
    def address(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True)
class FrontConfig:
    host: str
    port: int
    backends: tuple[Backend, ...]
    runtime_socket: Path
    busy_page: Path
    queue_timeout_s: float = 180.0
    pem: Path | None = None  # certificate and key in one file: TLS ends at the front
    check_interval_s: float = 1.0
    # Replicas jmoshi starts itself begin in maintenance and enter rotation once they listen:
    # HAProxy would otherwise count a server as UP before its first check.
    managed: bool = False
    token: str | None = None  # the same token as the servers behind it; None: --no-token
    unauthorized_page: Path | None = None  # the 401 page's body
    busy_body: Path | None = None  # the waiting line is full: the 503 page's body
    max_waiting: int = 8
    idle_s: float = 30.0  # the servers end a conversation silent this long; HAProxy's tunnel timeout follows
    metrics: tuple[str, int] | None = None  # --metrics-host/--metrics-port: /stats and /metrics without the token


@dataclass(frozen=True)
class Version:
    path: str
    version: tuple[int, ...]
    text: str


def find() -> Version:
    """The haproxy binary and its version; PreflightError with the fix when missing or too old."""
    explicit = os.environ.get("JMOSHI_HAPROXY")
    if explicit and not os.access(explicit, os.X_OK):
        raise PreflightError(f"JMOSHI_HAPROXY={explicit} is not a program that can be run", INSTALL_HINT)
    # Debian installs it in /usr/sbin, which is not on every user's PATH.
    path = explicit or shutil.which("haproxy") or next(
        (p for p in ("/usr/sbin/haproxy", "/usr/local/sbin/haproxy") if Path(p).is_file()), None)
    if path is None:
        raise PreflightError("HAProxy is not installed (needed for --replicas and `jmoshi front`)", INSTALL_HINT)
    try:
        out = subprocess.run([path, "-v"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise PreflightError(f"cannot run {path}: {exc}", INSTALL_HINT) from None
    match = re.search(r"version (\d+)\.(\d+)(?:\.(\d+))?", out)
    if not match:
        raise PreflightError(f"cannot tell the version of {path}", INSTALL_HINT)
    version = tuple(int(part) for part in match.groups() if part is not None)
    if version[:2] < MIN_VERSION:
        raise PreflightError(f"HAProxy {'.'.join(map(str, version))} is too old; jmoshi needs 2.4 or newer",
                             INSTALL_HINT)
    return Version(path, version, out.splitlines()[0] if out else "")


def _seconds(value: float) -> str:
    return f"{max(int(value * 1000), 1)}ms"


def _hashed(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()


def _token_rules(cfg: FrontConfig) -> str:
    """The token as the servers take it (gate.py): `?token=`, the cookie, or `Authorization: Bearer`.

    haproxy.cfg holds digests only, and compares digests: the time a comparison takes says nothing about
    the token."""
    if cfg.token is None:
        return ""
    digest = ",sha2(256),hex,lower -m str "
    return f"""    acl token_ok url_param({token.QUERY}){digest}{_hashed(cfg.token)}
    acl token_ok req.cook({token.cookie_name(cfg.token)}){digest}{_hashed(cfg.token)}
    acl token_ok req.fhdr(authorization){digest}{_hashed("Bearer " + cfg.token)}
    http-request return status 401 content-type "text/html; charset=utf-8" file {cfg.unauthorized_page} \
hdr WWW-Authenticate "Bearer realm=jmoshi" hdr Cache-Control no-store if !token_ok
"""


def _metrics_frontend(cfg: FrontConfig) -> str:
    if cfg.metrics is None:
        return ""
    host, port = cfg.metrics
    bind = f"{host}:{port}" if ":" not in host else f"[{host}]:{port}"
    return f"""
frontend metrics
    bind {bind}
    http-request use-service prometheus-exporter if {{ path /metrics }}
    http-request return status 404 content-type text/plain string "/stats or /metrics" if !{{ path /stats }}
    use_backend {STATS_BACKEND}
"""


def render_config(cfg: FrontConfig) -> str:
    """The whole haproxy.cfg, as text, from data (a pure function: tested without HAProxy)."""
    bind = f"{cfg.host}:{cfg.port}" if ":" not in cfg.host else f"[{cfg.host}]:{cfg.port}"
    tls = f" ssl crt {cfg.pem}" if cfg.pem else ""
    forwarded = "    http-request set-header X-Forwarded-Proto https\n" if cfg.pem else ""
    check = f"check inter {_seconds(cfg.check_interval_s)} fall 2 rise 1" + (" disabled" if cfg.managed else "")
    chat = "\n".join(f"    server {b.name} {b.address} {check} maxconn {b.slots}" for b in cfg.backends)
    ui = "\n".join(f"    server {b.name} {b.address} {check}" for b in cfg.backends)
    full = f"is_chat {{ queue({CHAT_BACKEND}) ge {cfg.max_waiting} }}"
    busy = (f"    http-request return status 503 content-type \"text/html; charset=utf-8\" file {cfg.busy_body} "
            f"hdr Retry-After 30 hdr Cache-Control no-store if {full}\n" if cfg.busy_body else "")
    return f"""# Made by jmoshi for one run; edits are lost when it stops.
global
    stats socket {cfg.runtime_socket} mode 600 level admin
    maxconn 2000
    # One thread picks the replicas one conversation at a time. With a thread per core, two conversations
    # that arrive together can each pick the same free replica before either is counted (leastconn), and the
    # second then waits in that replica's queue while another replica is free. A few dozen audio streams are
    # nothing to one thread.
    nbthread 1

defaults
    mode http
    option dontlognull
    timeout connect 5s
    timeout client 60s
    timeout server 60s
    # A conversation is a websocket: the servers end one that sends no audio for {cfg.idle_s:g} s, and this
    # ends one whose server or client went silent without closing (a talking browser sends every 80 ms).
    timeout tunnel {_seconds(cfg.idle_s + 30)}
    timeout client-fin 10s
    timeout queue {_seconds(cfg.queue_timeout_s)}
    timeout http-request 30s
    # A replica that refuses the connection (restarting) sends the request back to the queue.
    option redispatch
    retries 2

frontend jmoshi
    bind {bind}{tls}
{forwarded}{_token_rules(cfg)}    http-request use-service prometheus-exporter if {{ path /metrics }}
    # A conversation needs a websocket upgrade: every upgrade goes through the queue, however its path is
    # spelled (the servers decode paths: /%61pi/chat, //api/chat and /x/../api/chat are /api/chat to them;
    # HAProxy 2.6's normalize-uri is experimental). Without an upgrade /api/chat is no conversation.
    acl is_chat path_beg /api/
    acl is_chat hdr(upgrade) -i websocket
{busy}    use_backend {STATS_BACKEND} if {{ path /stats }}
    use_backend {CHAT_BACKEND} if is_chat
    default_backend {UI_BACKEND}

backend {STATS_BACKEND}
    stats enable
    stats uri /stats
    stats refresh 5s

backend {CHAT_BACKEND}
    balance leastconn
    errorfile 503 {cfg.busy_page}
{chat}

backend {UI_BACKEND}
    balance roundrobin
{ui}
{_metrics_frontend(cfg)}"""


BUSY_BODY = ("All J-Moshi replicas are busy: every one is in a conversation and the queue wait ran out. "
             "Please try again in a minute.\n"
             "J-Moshi はすべて会話中です。しばらくしてからもう一度お試しください。\n")


def busy_page() -> str:
    """HAProxy's errorfile format: a whole raw HTTP response."""
    body = BUSY_BODY.encode("utf-8")
    return ("HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain; charset=utf-8\r\n"
            f"Cache-Control: no-store\r\nRetry-After: 30\r\nContent-Length: {len(body)}\r\n"
            "Connection: close\r\n\r\n") + BUSY_BODY


def check_config(binary: str, path: Path) -> None:
    done = subprocess.run([binary, "-c", "-q", "-f", str(path)], capture_output=True, text=True, timeout=30)
    if done.returncode != 0:
        lines = [line for line in (done.stderr + done.stdout).splitlines() if "ALERT" in line] or [done.stderr]
        raise PreflightError(f"HAProxy refused the generated configuration: {lines[0].strip()[:300]}",
                             f"the file is {path}; please report it")


# --- the runtime API -------------------------------------------------------------------------------


@dataclass(frozen=True)
class ServerState:
    backend: str
    name: str
    status: str  # HAProxy's own word: UP, DOWN, MAINT, DRAIN, "UP 1/2"...
    active: int  # current sessions (a conversation on the chat backend)
    queued: int
    check: str = ""  # the last health check: L4OK once a TCP connection was accepted

    @property
    def up(self) -> bool:
        # HAProxy calls a server UP before its first check; only a passed check means it listens.
        return self.status.startswith("UP") and self.check.startswith(("L4OK", "L7OK"))


@dataclass(frozen=True)
class Load:
    """Conversations now: in progress, and waiting in the queue."""

    active: int
    queued: int
    servers: tuple[ServerState, ...]
    ui_up: int = 0  # replicas that HAProxy would send the web page to

    @property
    def healthy(self) -> int:
        return sum(s.up for s in self.servers)

    @property
    def serving(self) -> bool:
        """A person who opens the page now can talk: the page and a conversation both have a replica."""
        return self.healthy > 0 and self.ui_up > 0


def command(runtime_socket: Path, line: str, timeout_s: float = 3.0) -> str:
    """Send one command to HAProxy's runtime API and return its answer."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout_s)
        sock.connect(str(runtime_socket))
        sock.sendall(line.encode() + b"\n")
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks).decode("utf-8", "replace")


def parse_stat(text: str) -> Load:
    """`show stat` CSV -> the chat backend's load and each replica's state."""
    rows = list(csv.DictReader(io.StringIO(text.lstrip("# "))))
    servers, active, queued, ui_up = [], 0, 0, 0
    for row in rows:
        if row.get("pxname") == UI_BACKEND and row.get("svname") not in ("BACKEND", "FRONTEND"):
            ui_up += _server(row).up
        if row.get("pxname") != CHAT_BACKEND:
            continue
        if row.get("svname") == "BACKEND":
            # A backend's scur counts the queued streams too: those talking are the rest.
            queued = int(row.get("qcur") or 0)
            active = max(int(row.get("scur") or 0) - queued, 0)
        elif row.get("svname") != "FRONTEND":
            servers.append(_server(row))
    return Load(active, queued, tuple(servers), ui_up)


def _server(row: dict) -> ServerState:
    return ServerState(row["pxname"], row["svname"], row.get("status") or "", int(row.get("scur") or 0),
                       int(row.get("qcur") or 0), row.get("check_status") or "")


def load(runtime_socket: Path) -> Load:
    return parse_stat(command(runtime_socket, "show stat"))


def set_state(runtime_socket: Path, server: str, state: str) -> bool:
    """state: ready, drain or maint, on both backends (the UI stays served while a replica drains).

    True when HAProxy took it on every backend: it answers a change it made with an empty line.
    """
    backends = (CHAT_BACKEND,) if state == "drain" else (CHAT_BACKEND, UI_BACKEND)
    answers = [command(runtime_socket, f"set server {backend}/{server} state {state}") for backend in backends]
    return all(not answer.strip() for answer in answers)


# --- the HAProxy process ---------------------------------------------------------------------------


class Front:
    """HAProxy as a child of jmoshi: its files in a private temp folder, tied to jmoshi's life."""

    def __init__(self, host: str, port: int, backends: list[Backend], queue_timeout_s: float,
                 ssl_dir: Path | None = None, managed: bool = False, access: Access | None = None,
                 limits: Limits | None = None, metrics: tuple[str, int] | None = None):
        self.version = find()
        self.folder = scratch.make("front")
        pem = _combined_pem(ssl_dir, self.folder) if ssl_dir else None
        (self.folder / "busy.http").write_text(busy_page(), encoding="utf-8")
        (self.folder / "401.html").write_text(pages.UNAUTHORIZED, encoding="utf-8")
        (self.folder / "busy.html").write_text(pages.BUSY, encoding="utf-8")
        access, limits = access or Access(), limits or Limits()
        self.config = FrontConfig(host, port, tuple(backends), self.folder / "runtime.sock",
                                  self.folder / "busy.http", queue_timeout_s, pem, managed=managed,
                                  token=access.token, unauthorized_page=self.folder / "401.html",
                                  busy_body=self.folder / "busy.html", max_waiting=limits.max_waiting,
                                  idle_s=limits.idle_s, metrics=metrics)
        (self.folder / "haproxy.cfg").write_text(render_config(self.config))
        self.server: Server | None = None

    @property
    def process(self) -> subprocess.Popen | None:
        return self.server.process if self.server is not None else None

    @property
    def scheme(self) -> str:
        return "https" if self.config.pem else "http"

    def start(self, relay: Callable[[str], None] | None = None) -> None:
        """Start HAProxy tied to jmoshi. Its output is always read (every server DOWN/UP is an alert
        line: a pipe nobody reads fills after a day of a crash-looping replica, and HAProxy then
        blocks), handed to `relay` when given, else kept for the error if it fails to start."""
        from .lifetime import tied_argv

        check_config(self.version.path, self.folder / "haproxy.cfg")
        argv = tied_argv([self.version.path, "-db", "-f", str(self.folder / "haproxy.cfg")])
        launch = Launch(argv, dict(os.environ), self.config.host, self.config.port, self.scheme, name="HAProxy")
        self.server = Server(launch, relay=relay or (lambda line: None)).start()
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self.config.runtime_socket.exists():
            if not self.alive() or time.monotonic() > deadline:
                self.server.stop(grace_s=5)
                output = list(self.server.tail)
                shutil.rmtree(self.folder, ignore_errors=True)
                alert = next((line for line in output if "ALERT" in line), "\n".join(output).strip()[-300:])
                raise PreflightError(f"HAProxy did not start: {alert}",
                                     f"is port {self.config.port} free on {self.config.host}? (`ss -ltnp`)")
            time.sleep(0.05)

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def load(self) -> Load | None:
        try:
            return load(self.config.runtime_socket)
        except OSError:
            return None

    def set_state(self, server: str, state: str) -> bool:
        """False when HAProxy did not take it (busy or gone); the caller may try again."""
        try:
            return set_state(self.config.runtime_socket, server, state)
        except OSError:
            return False

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop(grace_s=5)
        shutil.rmtree(self.folder, ignore_errors=True)


def _combined_pem(ssl_dir: Path, folder: Path) -> Path:
    """HAProxy wants the certificate and its key in one file; it stays private to this run."""
    pem = folder / "front.pem"
    fd = os.open(pem, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write((ssl_dir / "cert.pem").read_text())
        out.write("\n")
        out.write((ssl_dir / "key.pem").read_text())
    return pem
