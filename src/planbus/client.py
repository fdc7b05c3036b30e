"""The bus seen from outside the worker: connect, insert a request, read it, wait for its event.

What the operator commands and the demo share; it prints nothing (console.py renders).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any, LiteralString

import anyio
import psycopg
from psycopg import errors
from psycopg.rows import dict_row
from pydantic import BaseModel, ValidationError

from planbus import db, logs, queries, runtime
from planbus.settings import Settings

log = logging.getLogger("planbus.cli")

TERMINAL = ("completed", "failed")


class RequestEvent(BaseModel):
    """The payload of `plan_request_events`; other keys may come and are ignored."""

    id: int
    status: str


@asynccontextmanager
async def connection(settings: Settings) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
    """An autocommit connection to the configured database, or to the embedded server."""
    async with AsyncExitStack() as stack:
        dsn = await stack.enter_async_context(database(settings))
        conn = await psycopg.AsyncConnection.connect(
            dsn, autocommit=True, application_name="planbus-cli"
        )
        async with conn:
            yield conn


@asynccontextmanager
async def database(settings: Settings) -> AsyncIterator[str]:
    """The DSN to use; with no URL, the embedded server in PLANBUS_DATA_DIR, started if needed
    (and stopped again afterwards when this command started it)."""
    async with AsyncExitStack() as stack:
        dsn = await runtime.database_url(settings, stack)
        await db.check_database(dsn, None)
        yield dsn


async def fetchall(
    conn: psycopg.AsyncConnection[Any], query: LiteralString, params: dict[str, Any] | None = None
) -> list[dict[str, Any]]:
    cursor = conn.cursor(row_factory=dict_row)
    await cursor.execute(query, params)
    return await cursor.fetchall()


async def listen_events(conn: psycopg.AsyncConnection[Any]) -> None:
    """LISTEN on `plan_request_events`, the channel quoted as an identifier."""
    await db.listen(conn, queries.EVENTS_CHANNEL)


async def insert_request(
    conn: psycopg.AsyncConnection[Any], lead_id: int, telegram_id: int | None
) -> tuple[int, str, bool]:
    """Insert as the TMA does; on the one-active-request refusal, return the active request."""
    for _ in range(3):  # the active request may finish between the refusal and the read
        try:
            rows = await fetchall(
                conn, queries.INSERT_REQUEST, {"lead_id": lead_id, "telegram_id": telegram_id}
            )
        except errors.UniqueViolation:
            active = await fetchall(conn, queries.ACTIVE_REQUEST, {"lead_id": lead_id})
            if active:
                return active[0]["id"], active[0]["status"], False
            continue
        except errors.NotNullViolation:
            raise LookupError(f"lead {lead_id} has no telegram_id; pass --telegram-id") from None
        if not rows:
            raise LookupError(f"lead {lead_id} does not exist")
        row = rows[0]
        log.info(
            "request %d lead %d requested by an operator",
            row["id"],
            lead_id,
            extra=logs.request_fields(row["id"], lead_id, 0, "requested", None),
        )
        return row["id"], row["status"], True
    raise LookupError(f"lead {lead_id}: could not create or find an active request")


async def wait_for_request(
    conn: psycopg.AsyncConnection[Any], request_id: int, within: float
) -> dict[str, Any]:
    """Wait on `plan_request_events` until the request ends or `within` seconds pass."""
    deadline = anyio.current_time() + within
    row = await request_row(conn, request_id)
    while row["status"] not in TERMINAL:
        remaining = deadline - anyio.current_time()
        if remaining <= 0:
            break
        async for notify in conn.notifies(timeout=remaining):
            if event_id(notify.payload) == request_id:
                break
        row = await request_row(conn, request_id)
    return row


async def request_row(conn: psycopg.AsyncConnection[Any], request_id: int) -> dict[str, Any]:
    rows = await fetchall(conn, queries.REQUEST_ROW, {"id": request_id})
    if rows:
        return rows[0]
    # The lead was deleted and the request with it (ON DELETE CASCADE).
    return {
        "id": request_id,
        "status": "failed",
        "attempts": 0,
        "result": {"error": "The request no longer exists (its lead was deleted)."},
    }


def event_id(payload: str) -> int | None:
    try:
        return RequestEvent.model_validate_json(payload).id
    except ValidationError:
        return None  # someone else's payload on our channel: not ours to judge
