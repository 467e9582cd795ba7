"""doctor's hub check sends HF_TOKEN to the hub's host alone, never on to where the hub redirects."""

from __future__ import annotations

import http.server
import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from conftest import run_cli
from jmoshi_cli import doctor

TOKEN = "hf_secret_for_the_hub_only"


class _Server:
    """A loopback HTTP server that records each request's path and Authorization header: a path in
    `redirects` answers 302 to the URL given there, one in `pages` 200, any other 404. GET and HEAD alike:
    urllib before Python 3.13 follows a HEAD's redirect with a GET."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str | None]] = []
        self.redirects: dict[str, str] = {}
        self.pages: set[str] = set()
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_HEAD(self) -> None:  # noqa: N802 - http.server's name
                server.seen.append((self.path, self.headers.get("Authorization")))
                target = server.redirects.get(self.path)
                self.send_response(302 if target else 200 if self.path in server.pages else 404)
                if target:
                    self.send_header("Location", target)
                self.send_header("Content-Length", "0")
                self.end_headers()

            do_GET = do_HEAD  # noqa: N815 - http.server's name

            def log_message(self, *args) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"


@contextmanager
def _servers() -> Iterator[tuple[_Server, _Server]]:
    """The hub, and a CDN on another host (here: another port of the loopback, so another netloc)."""
    hub, cdn = _Server(), _Server()
    # Polled every 20 ms: shutdown() waits for the next poll (0.5 s by default, twice per test).
    threads = [threading.Thread(target=s.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
               for s in (hub, cdn)]
    for thread in threads:
        thread.start()
    try:
        yield hub, cdn
    finally:
        for server, thread in zip((hub, cdn), threads, strict=True):
            server.httpd.shutdown()
            server.httpd.server_close()
            thread.join(timeout=5)


def test_a_redirect_to_another_host_is_followed_without_the_token():
    with _servers() as (hub, cdn):
        hub.redirects["/api/models/org/model"] = f"{cdn.url}/blob"
        cdn.pages.add("/blob")
        probe = doctor.hub_reachable(f"{hub.url}/api/models/org/model", TOKEN)
    assert probe.ok and probe.value == 200
    assert hub.seen == [("/api/models/org/model", f"Bearer {TOKEN}")]
    assert cdn.seen == [("/blob", None)]


def test_a_redirect_on_the_hub_itself_keeps_the_token():
    with _servers() as (hub, cdn):
        hub.redirects["/api/models/org/old-name"] = "/api/models/org/new-name"
        hub.pages.add("/api/models/org/new-name")
        probe = doctor.hub_reachable(f"{hub.url}/api/models/org/old-name", TOKEN)
    assert probe.ok and probe.value == 200
    assert hub.seen == [("/api/models/org/old-name", f"Bearer {TOKEN}"),
                        ("/api/models/org/new-name", f"Bearer {TOKEN}")]
    assert cdn.seen == []


def test_doctor_sends_hf_token_to_the_hub_and_not_to_its_redirect(env):
    with _servers() as (hub, cdn):
        hub.redirects["/api/models/nu-dialogue/j-moshi-ext"] = f"{cdn.url}/elsewhere"
        cdn.pages.add("/elsewhere")
        result = run_cli("doctor", "--json", env={**env, "HF_ENDPOINT": hub.url, "HF_TOKEN": TOKEN})
    checks = {c["name"]: c for c in json.loads(result.stdout)["checks"]}
    assert checks["hub"]["status"] == "OK", checks["hub"]
    assert ("/api/models/nu-dialogue/j-moshi-ext", f"Bearer {TOKEN}") in hub.seen
    assert cdn.seen and all(auth is None for _, auth in cdn.seen), cdn.seen
