"""Who may see the dashboard and act on it: checked before any page, stream or action runs.

- On loopback with no token, only loopback names may be asked for (`Host`): a page elsewhere
  that points its own name at 127.0.0.1 (DNS rebinding) reads and does nothing.
- With `PLANBUS_DASHBOARD_TOKEN`, every request shows the token: as `Authorization: Bearer`,
  as `?token=` (which also sets an HttpOnly, SameSite=Strict cookie holding a digest of it),
  or as that cookie. Compared with `hmac.compare_digest`.
- Anything but GET and HEAD must come from the dashboard's own page: a browser's
  `Sec-Fetch-Site` must say `same-origin` and its `Origin` must be this host; the action also
  checks the page's CSRF token (web.py). Refused: 403 and a line saying why.
- Every answer carries a strict Content-Security-Policy (scripts and styles from the
  dashboard only, no frames), no referrer, and no caching.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable
from urllib.parse import urlsplit

from starlette.datastructures import MutableHeaders
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

COOKIE = "planbus_dashboard"
LOOPBACK_NAMES = frozenset({"127.0.0.1", "localhost", "::1"})
SAFE_METHODS = frozenset({"GET", "HEAD"})
HEADERS = {
    "content-security-policy": "default-src 'none'; script-src 'self'; style-src 'self'; "
    "img-src 'self' data:; connect-src 'self'; form-action 'self'; frame-ancestors 'none'; "
    "base-uri 'none'",
    "referrer-policy": "no-referrer",
    "x-content-type-options": "nosniff",
    "x-frame-options": "DENY",
    "cache-control": "no-store",
}

Refuse = Callable[[int, str, str], Response]  # status, title, sentence -> the answer


def cookie_value(token: str) -> str:
    """What the cookie holds: a digest of the token, never the token itself."""
    return hmac.new(token.encode(), b"planbus dashboard cookie", hashlib.sha256).hexdigest()


def same(given: str | None, expected: str) -> bool:
    return given is not None and hmac.compare_digest(given.encode(), expected.encode())


def host_name(host_header: str) -> str:
    """`Host` without its port: `[::1]:8787` -> `::1`, `localhost:8787` -> `localhost`."""
    host = host_header.strip().lower()
    if host.startswith("["):
        return host[1 : host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


class Guard:
    """ASGI middleware in front of the whole app."""

    def __init__(
        self, app: ASGIApp, *, token: str | None, loopback_only: bool, refuse: Refuse
    ) -> None:
        self.app = app
        self.token = token
        self.cookie = cookie_value(token) if token else None
        self.loopback_only = loopback_only
        self.refuse = refuse

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request = Request(scope)
        refusal = self.check(request)
        if refusal is not None:
            await self.answer(refusal, scope, receive, send)
            return
        set_cookie = self.cookie is not None and request.query_params.get("token") is not None
        await self.app(scope, receive, self.headed(send, request, set_cookie))

    def check(self, request: Request) -> Response | None:
        """The refusal for this request, or None when it may go on."""
        host = request.headers.get("host", "")
        if self.loopback_only and host_name(host) not in LOOPBACK_NAMES:
            return self.refuse(
                403, "Refused", f"this dashboard answers on loopback names only, not {host!r}"
            )
        if self.token is not None and not self.shows_token(request):
            return self.refuse(
                401,
                "The dashboard needs its token",
                "Open it once as /?token=TOKEN (PLANBUS_DASHBOARD_TOKEN), or send "
                "Authorization: Bearer TOKEN.",
            )
        if request.method not in SAFE_METHODS:
            return self.cross_site(request, host)
        return None

    def shows_token(self, request: Request) -> bool:
        assert self.token is not None and self.cookie is not None
        scheme, _, credentials = request.headers.get("authorization", "").partition(" ")
        return (
            (scheme.lower() == "bearer" and same(credentials.strip(), self.token))
            or same(request.query_params.get("token"), self.token)
            or same(request.cookies.get(COOKIE), self.cookie)
        )

    def cross_site(self, request: Request, host: str) -> Response | None:
        """A change asked for by another site's page: refused. A browser always says where
        a POST comes from; a client that is not a browser says nothing and needs the page's
        CSRF token all the same."""
        fetch_site = request.headers.get("sec-fetch-site")
        if fetch_site is not None and fetch_site != "same-origin":
            return self.refuse(403, "Refused", f"cross-site request refused ({fetch_site})")
        origin = request.headers.get("origin")
        if origin is not None and urlsplit(origin).netloc.lower() != host.lower():
            return self.refuse(403, "Refused", "cross-site request refused (another origin)")
        return None

    def headed(self, send: Send, request: Request, set_cookie: bool) -> Send:
        """`send` with the security headers (and the token's cookie) on the answer."""
        secure = "; Secure" if request.url.scheme == "https" else ""

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for name, value in HEADERS.items():
                    headers.setdefault(name, value)
                if set_cookie and self.cookie is not None:
                    headers.append(
                        "set-cookie",
                        f"{COOKIE}={self.cookie}; Path=/; HttpOnly; SameSite=Strict{secure}",
                    )
            await send(message)

        return send_with_headers

    async def answer(self, response: Response, scope: Scope, receive: Receive, send: Send) -> None:
        for name, value in HEADERS.items():
            response.headers.setdefault(name, value)
        await response(scope, receive, send)
