"""The HTTP seam of every server jmoshi starts (moshi.server's app in the torch child, jmoshi's MLX
server): one aiohttp middleware, outermost, that decides who gets in and follows each conversation.

In order, for every request:
1. the token (contract `Access.token`): a cookie, `?token=` or `Authorization: Bearer`; anything else
   gets 401 and a page that says how to get in. A page asked for with `?token=` gets the cookie and a
   redirect to the same URL without it, so the web UI works unchanged (its websocket carries the cookie);
2. `/api/chat`: a browser's websocket (it always sends `Origin`) must come from the server's own
   page, or an origin the operator allowed (`--allow-origin`); a cross-site page cannot talk;
3. with `--record`, a browser must have agreed to be recorded (the consent page, first thing it sees);
   a program (no `Origin`, the token shown) is the operator's own client and is not asked;
4. a bounded waiting line: beyond the slots and `Limits.max_waiting` waiting, a "busy" answer;
5. each conversation is a `Visit` (visits.py), watched for silence and for its time limit.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import time
from datetime import datetime, timezone
from typing import Any, Callable
from urllib.parse import urlsplit

from ..backends.contract import Access, Limits
from . import pages, token, visits

CHAT_PATH = "/api/chat"
CONSENT_COOKIE = "jmoshi-consent"
COOKIE_DAYS = 30
QUIET_S = 10.0  # refused attempts from one address: one console line per this long


def install(app: Any, access: Access, limits: Limits, notify: Callable[[str], None], slots: int = 1) -> Gate:
    """Put the gate in front of everything the app serves (before the app starts)."""
    gate = Gate(access, limits, notify, slots)
    app.middlewares.insert(0, gate.middleware)
    if access.consent is not None:
        app.router.add_post(pages.CONSENT_PATH, gate.agree)
    return gate


def html_response(status: int, body: str, **headers: str) -> Any:
    from aiohttp import web

    return web.Response(status=status, text=body, content_type="text/html", charset="utf-8",
                        headers={"Cache-Control": "no-store", **headers})


def _upgrade(request: Any) -> bool:
    return request.headers.get("Upgrade", "").lower() == "websocket"


class Gate:
    def __init__(self, access: Access, limits: Limits, notify: Callable[[str], None], slots: int):
        from aiohttp import web

        self.access, self.limits, self.notify, self.slots = access, limits, notify, slots
        self.cookie = token.cookie_name(access.token) if access.token else None
        self.visits: set[visits.Visit] = set()  # talking and waiting
        self.refused_at: dict[str, float] = {}

        async def middleware(request: Any, handler: Any) -> Any:
            return await self._middleware(request, handler)

        self.middleware = web.middleware(middleware)

    async def _middleware(self, request: Any, handler: Any) -> Any:
        if self.access.token is not None:
            if not self._authorized(request):
                self._refused(request, "no valid token")
                return html_response(401, pages.UNAUTHORIZED, **{"WWW-Authenticate": 'Bearer realm="jmoshi"'})
            if request.method == "GET" and token.QUERY in request.query and not _upgrade(request):
                return self._clean_redirect(request)
        if request.path == CHAT_PATH:
            return await self._chat(request, handler)
        if self._wants_consent(request):
            return html_response(200, pages.consent(self.access.consent or "", self._max_minutes()))
        return await handler(request)

    # --- 1. the token ----------------------------------------------------------------------------

    def _authorized(self, request: Any) -> bool:
        assert self.access.token is not None and self.cookie is not None
        auth = request.headers.get("Authorization", "")
        bearer = auth[7:].strip() if auth[:7].lower() == "bearer " else None
        presented = (request.query.get(token.QUERY), request.cookies.get(self.cookie), bearer)
        return any(token.same(value, self.access.token) for value in presented if value)

    def _refused(self, request: Any, why: str) -> None:
        who = request.remote or "?"
        now, key = time.monotonic(), f"{who} {why}"
        if now - self.refused_at.get(key, -QUIET_S) < QUIET_S:
            return  # a client retrying in a loop is one line, not a flood
        if len(self.refused_at) > 1000:
            self.refused_at.clear()
        self.refused_at[key] = now
        self.notify(f"jmoshi: refused {request.method} {request.path} from {who}: {why}")

    def _clean_redirect(self, request: Any) -> Any:
        """The same page without the token in its URL, the browser holding it in a cookie from now on."""
        rest = [(key, value) for key, value in request.query.items() if key != token.QUERY]
        response = html_response(303, "", Location=str(request.rel_url.with_query(rest)))
        assert self.cookie is not None and self.access.token is not None
        response.set_cookie(self.cookie, self.access.token, max_age=COOKIE_DAYS * 86400, path="/",
                            httponly=True, samesite="Strict", secure=_secure(request))
        return response

    # --- 2-5. a conversation ---------------------------------------------------------------------------

    async def _chat(self, request: Any, handler: Any) -> Any:
        origin = request.headers.get("Origin")
        if origin is not None and not self._same_site(origin, request):
            self._refused(request, f"a page of {origin} is not this server's (--allow-origin allows one)")
            return html_response(403, pages.FOREIGN_ORIGIN)
        client = visits.Client.PROGRAM if origin is None else visits.Client.BROWSER
        consent_utc = None
        if self.access.consent is not None and client is visits.Client.BROWSER:
            consent_utc = self._consented(request)
            if consent_utc is None:
                self._refused(request, "the browser has not agreed to be recorded")
                return html_response(403, pages.NO_CONSENT)
        live = [visit for visit in self.visits if not visit.gone]
        if len(live) >= self.slots + self.limits.max_waiting:
            self.notify(f"jmoshi: turned a conversation away: {self.slots} talking and {self.limits.max_waiting} "
                        "waiting already (--max-waiting)")
            return html_response(503, pages.BUSY, **{"Retry-After": "30"})
        visit = visits.Visit(client, consent_utc, loop=asyncio.get_running_loop(), transport=request.transport)
        return await self._follow(request, handler, visit)

    async def _follow(self, request: Any, handler: Any, visit: visits.Visit) -> Any:
        visits.keepalive(request.transport)
        self.visits.add(visit)
        reset = visits.CURRENT.set(visit)
        watcher = asyncio.ensure_future(visits.watch(visit, self.limits.idle_s, self.limits.max_s))
        try:
            return await handler(request)
        finally:
            watcher.cancel()
            visits.CURRENT.reset(reset)
            self.visits.discard(visit)
            if visit.ended is not None and visit.ended is not visits.End.SERVER_STOP:
                self.notify(f"jmoshi: conversation ended: {self._why(visit.ended)}")

    def _why(self, end: visits.End) -> str:
        if end is visits.End.IDLE:
            return f"{end.value} for {self.limits.idle_s:g} s"
        return end.value

    def _same_site(self, origin: str, request: Any) -> bool:
        allowed = self.access.allow_origins
        if "*" in allowed or origin.rstrip("/") in (o.rstrip("/") for o in allowed):
            return True
        return urlsplit(origin).netloc.lower() == request.host.lower() and bool(request.host)

    def _max_minutes(self) -> float | None:
        return self.limits.max_s / 60 if self.limits.max_s else None

    # --- consent -----------------------------------------------------------------------------------------

    def _wants_consent(self, request: Any) -> bool:
        return (self.access.consent is not None and request.method == "GET"
                and request.path in ("/", "/index.html") and self._consented(request) is None)

    def _signature(self, stamp: str) -> str:
        return hmac.new(self.access.secret.encode(), stamp.encode(), hashlib.sha256).hexdigest()

    def _consented(self, request: Any) -> str | None:
        """When this browser agreed (UTC, ISO 8601), from its signed cookie; None if it has not."""
        stamp, _, signature = request.cookies.get(CONSENT_COOKIE, "").partition(".")
        if not stamp.isdigit() or not hmac.compare_digest(signature, self._signature(stamp)):
            return None
        return datetime.fromtimestamp(int(stamp), timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")

    async def agree(self, request: Any) -> Any:
        """POST from the consent page: the browser keeps a signed note of when, then loads the web UI."""
        origin = request.headers.get("Origin")
        if origin is not None and origin != "null" and not self._same_site(origin, request):
            return html_response(403, pages.FOREIGN_ORIGIN)
        stamp = str(int(time.time()))
        response = html_response(303, "", Location="/")
        response.set_cookie(CONSENT_COOKIE, f"{stamp}.{self._signature(stamp)}", path="/", httponly=True,
                            samesite="Strict", secure=_secure(request))
        self.notify(f"jmoshi: a participant agreed to be recorded ({request.remote or '?'})")
        return response


def _secure(request: Any) -> bool:
    # Behind jmoshi's HTTPS front the replica speaks plain HTTP; the front says what the browser used.
    return bool(request.secure or request.headers.get("X-Forwarded-Proto") == "https")
