"""The dashboard's Starlette app: the page, its event stream, its script and style, the actions.

GET /            the page, its sections from the latest shared reading
GET /events      server-sent events: every new reading's sections (feed.py)
GET /static/...  the page's script and style (no CDN, nothing from the internet)
POST /requests/{id}/retry, /requests/{id}/cancel
                 what `python -m planbus retry ID` / `cancel ID` do (ops/actions.py)
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from importlib import resources
from typing import Any
from urllib.parse import parse_qs

import psycopg
from psycopg_pool import AsyncConnectionPool
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import (
    HTMLResponse,
    JSONResponse,
    RedirectResponse,
    Response,
    StreamingResponse,
)
from starlette.routing import Route

from planbus.errors import one_line
from planbus.ops import actions
from planbus.ops.dashboard.feed import Feed, Stopping
from planbus.ops.dashboard.guard import Guard
from planbus.ops.dashboard.render import Renderer

log = logging.getLogger(__name__)

MAX_FORM_BYTES = 4096
MAX_ID = 2**63 - 1  # plan_requests.id is a bigint
STATIC = {"dashboard.js": "text/javascript", "dashboard.css": "text/css"}
# A page opened while no stream keeps the feed reading waits for a reading at most this old.
PAGE_MAX_AGE_SECONDS = 1.0


@dataclass(frozen=True)
class Dashboard:
    """What the routes share: the feed, the templates, the pool for actions, the CSRF token."""

    feed: Feed
    renderer: Renderer
    pool: AsyncConnectionPool
    csrf: str

    async def page(self, request: Request) -> Response:
        try:
            snapshot = await self.feed.current(PAGE_MAX_AGE_SECONDS)
        except Stopping:
            return self.refuse(503, "Stopping", "the dashboard is stopping")
        html = self.renderer.page(snapshot.sections, snapshot.data.get("now"), snapshot.error)
        return HTMLResponse(html)

    async def events(self, request: Request) -> Response:
        return StreamingResponse(
            self._stream(),
            media_type="text/event-stream",
            headers={"x-accel-buffering": "no"},  # a reverse proxy must not hold events back
        )

    async def _stream(self) -> AsyncIterator[bytes]:
        yield b"retry: 1000\n\n"  # a dropped stream comes back within a second
        if self.feed.latest is not None:
            yield self.feed.latest.message  # a reconnecting page catches up at once
        async for snapshot in self.feed.updates():
            yield snapshot.message

    async def static(self, request: Request) -> Response:
        name = request.path_params["name"]
        if name not in STATIC:
            return self.refuse(404, "Not found", "no such file")
        text = resources.files("planbus.ops.dashboard").joinpath("static", name).read_bytes()
        return Response(text, media_type=STATIC[name])

    async def act(self, request: Request) -> Response:
        """Retry or Cancel one request, as the commands do, then read the database again."""
        fields = await _form(request)
        given = fields.get("csrf") or request.headers.get("x-planbus-csrf", "")
        if not hmac.compare_digest(given.encode(), self.csrf.encode()):
            return self.refuse(403, "Refused", "the page's CSRF token is missing or wrong")
        request_id, verb = int(request.path_params["id"]), request.path_params["action"]
        if verb not in ("retry", "cancel") or request_id > MAX_ID:
            return self.refuse(404, "Not found", "no such action")
        try:
            async with self.pool.connection() as conn:
                if verb == "retry":
                    outcome = await actions.retry(conn, [request_id])
                else:
                    outcome = await actions.cancel(conn, [request_id])
        except psycopg.Error as exc:
            message = (
                f"request {request_id} not changed: cannot reach the database ({one_line(exc)})"
            )
            return JSONResponse({"ok": False, "message": message}, status_code=503)
        self.feed.poke()
        ok, message = _said(outcome, request_id, verb)
        if "application/json" in request.headers.get("accept", ""):
            return JSONResponse({"ok": ok, "message": message}, status_code=200 if ok else 409)
        return RedirectResponse("../../", status_code=303)  # a form posted without the script

    def refuse(self, status: int, title: str, text: str) -> Response:
        return HTMLResponse(self.renderer.refusal(title, text), status_code=status)


def _said(outcome: actions.Outcome, request_id: int, verb: str) -> tuple[bool, str]:
    """Whether it was done, and the sentence the page shows (the commands' own words)."""
    if outcome.race:
        return False, actions.RETRY_RACE
    if not outcome.done:
        return False, outcome.refused.get(request_id, f"request {request_id} not changed")
    row = outcome.done[0]
    if verb == "retry":
        return True, f"request {row['id']} (lead {row['lead_id']}) is pending again"
    return True, f"request {row['id']} (lead {row['lead_id']}) cancelled: it is failed now"


async def _form(request: Request) -> dict[str, str]:
    """A small urlencoded form's fields (the CSRF token), first value of each."""
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_FORM_BYTES:
            return {}
    parsed = parse_qs(body.decode("utf-8", "replace"), max_num_fields=10)
    return {name: values[0] for name, values in parsed.items()}


def build(dashboard: Dashboard, *, token: str | None, loopback_only: bool) -> Any:
    """The app, behind its guard."""
    app = Starlette(
        routes=[
            Route("/", dashboard.page, methods=["GET"]),
            Route("/events", dashboard.events, methods=["GET"]),
            Route("/static/{name}", dashboard.static, methods=["GET"]),
            Route(
                "/requests/{id:int}/{action:str}",
                dashboard.act,
                methods=["POST"],
            ),
        ]
    )
    return Guard(app, token=token, loopback_only=loopback_only, refuse=dashboard.refuse)
