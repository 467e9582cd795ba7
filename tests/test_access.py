"""Who may talk to a server jmoshi starts, end to end on the real moshi.server child (tiny model, CPU): the
token (401 without it, the cookie a tokened URL leaves, the bearer header), the websocket's Origin, the
idle timeout that frees the slot, and the bounded waiting line. One server for the module: every test
here only talks to it (none kills it), and each leaves it free for the next."""

from __future__ import annotations

import asyncio
import socket
import time
import urllib.error
import urllib.request

import pytest

from conftest import TEST_TOKEN
from jmoshi_cli.selftest import speech_like
from jmoshi_cli.serving import token
from jmoshi_cli.serving.chat import ChatRefused

from helpers import AUTH, converse, converse_sync, got, module_server, wait_until

pytestmark = pytest.mark.slow
IDLE_S = 6


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_hub_root):
    with module_server(tmp_path_factory.mktemp("access"), tiny_hub_root, "--idle-timeout", str(IDLE_S),
                       "--max-waiting", "1", "--allow-origin", "https://lab.example.org") as running:
        yield running


def _status(url: str, headers: dict | None = None) -> tuple[int, str, dict]:
    """Status, body and headers of one request, redirects not followed."""
    class NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *args, **kwargs):
            return None

    opener = urllib.request.build_opener(NoRedirect)
    try:
        with opener.open(urllib.request.Request(url, headers=headers or {}), timeout=30) as response:
            return response.status, response.read().decode(), dict(response.headers)
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(), dict(exc.headers)


def _upgrade(port: int, path: str = "/api/chat", headers: str = "") -> str:
    """The first line of the answer to a websocket upgrade sent by hand."""
    request = (f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
               f"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n{headers}\r\n")
    with socket.create_connection(("127.0.0.1", port), timeout=30) as conn:
        conn.sendall(request.encode())
        return conn.makefile("rb").readline().decode().strip()


def test_without_the_token_every_path_answers_401_and_no_conversation_starts(server):
    served, port = server
    base = f"http://127.0.0.1:{port}"
    for path in ("/", "/index.html", "/assets/app.js", "/api/chat", "/nowhere"):
        for headers in ({}, {"Authorization": "Bearer wrong-token-0123456789"},
                        {"Cookie": f"{token.cookie_name(TEST_TOKEN)}=wrong-token-0123456789"}):
            status, body, _ = _status(base + path, headers)
            assert status == 401 and "トークンが必要です" in body and "A token is needed" in body, (path, headers)
    assert _status(base + "/?token=wrong-token-0123456789")[0] == 401
    assert _upgrade(port).startswith("HTTP/1.1 401")
    with pytest.raises(ChatRefused) as refused:
        converse_sync(f"ws://127.0.0.1:{port}/api/chat", speech_like(0.5), token=None, timeout_s=30)
    assert refused.value.status == 401 and TEST_TOKEN not in str(refused.value)
    served.wait_for("jmoshi: refused GET")
    assert "wrong-token" not in served.err  # a failed attempt is one line, without what it presented


def test_the_printed_url_leaves_a_cookie_that_opens_the_page_and_the_conversation(server):
    served, port = server
    assert served.url == f"http://127.0.0.1:{port}/?token={TEST_TOKEN}"
    status, _, headers = _status(served.url)
    assert status == 303 and headers["Location"] == "/"
    cookie = headers["Set-Cookie"]
    assert cookie.startswith(f"{token.cookie_name(TEST_TOKEN)}={TEST_TOKEN};")
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Path=/" in cookie

    async def as_a_browser():
        import aiohttp

        # Its cookie jar is the browser's (which, unlike aiohttp's by default, keeps cookies of IP addresses).
        async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as session:
            async with session.get(served.url) as page:
                text = await page.text()
            origin = {"Origin": f"http://127.0.0.1:{port}"}  # the page's own, as a browser sends it
            async with session.ws_connect(f"ws://127.0.0.1:{port}/api/chat", headers=origin) as ws:
                first = await asyncio.wait_for(ws.receive(), 60)
        return text, first.data

    text, first = asyncio.run(as_a_browser())
    assert "J-Moshi test UI" in text and first[:1] == b"\x00"
    # A program: the bearer header, or the token in the websocket's URL.
    assert converse_sync(f"ws://127.0.0.1:{port}/api/chat?token={TEST_TOKEN}", speech_like(1.0), token=None,
                         until=got()).audio_samples > 0


def test_a_page_of_another_origin_cannot_open_a_conversation_even_with_the_token(server):
    served, port = server
    bearer = f"Authorization: Bearer {TEST_TOKEN}\r\n"
    for origin in ("http://evil.example", "http://127.0.0.1:1", "null", f"https://127.0.0.1:{port}.evil.example"):
        assert _upgrade(port, headers=bearer + f"Origin: {origin}\r\n").startswith("HTTP/1.1 403"), origin
    assert _upgrade(port, headers=bearer + "Origin: https://lab.example.org\r\n").startswith("HTTP/1.1 101")
    assert _upgrade(port, headers=bearer + f"Origin: http://127.0.0.1:{port}\r\n").startswith("HTTP/1.1 101")
    served.wait_for("is not this server's")


def test_a_silent_client_loses_its_slot_within_the_idle_timeout_and_the_next_one_talks(server):
    served, port = server

    async def scenario():
        import aiohttp

        async with aiohttp.ClientSession() as session:
            async with session.ws_connect(f"ws://127.0.0.1:{port}/api/chat", headers=AUTH) as ws:
                assert (await asyncio.wait_for(ws.receive(), 60)).data[:1] == b"\x00"
                started = time.monotonic()
                while True:  # J-Moshi may still send; the end is a close, within the timeout and a margin
                    message = await asyncio.wait_for(ws.receive(), IDLE_S + 60)
                    if message.type.name in ("CLOSE", "CLOSING", "CLOSED"):
                        break
                held_s = time.monotonic() - started
                code = ws.close_code
        after = await converse(f"ws://127.0.0.1:{port}/api/chat", speech_like(1.0), until=got())
        return held_s, code, after

    held_s, code, after = asyncio.run(scenario())
    assert IDLE_S - 1 <= held_s < IDLE_S + 30 and code == 4001, (held_s, code)
    assert after.audio_samples > 0
    served.wait_for(f"conversation ended: no audio from the client for {IDLE_S} s")


def test_the_waiting_line_is_bounded_and_says_busy_beyond_it(server):
    served, port = server

    async def scenario():
        import aiohttp

        talking = asyncio.ensure_future(converse(f"ws://127.0.0.1:{port}/api/chat", speech_like(8.0),
                                                 until=got(samples=10**9), deadline_s=1))
        async with aiohttp.ClientSession() as session:
            # The conversation started: one talks. A second waits (the one place in the line); a third is told.
            await asyncio.get_running_loop().run_in_executor(
                None, wait_until, lambda: served.err.count("a browser connected") > 0, 60, "a conversation")
            waiting = await session.ws_connect(f"ws://127.0.0.1:{port}/api/chat", headers=AUTH)
            third = await asyncio.get_running_loop().run_in_executor(None, _upgrade, port, "/api/chat",
                                                                      f"Authorization: Bearer {TEST_TOKEN}\r\n")
            await waiting.close()
        with_talk = await talking
        return third, with_talk

    third, talked = asyncio.run(scenario())
    assert third.startswith("HTTP/1.1 503"), third
    assert talked.sent_frames > 0
    served.wait_for("turned a conversation away")
