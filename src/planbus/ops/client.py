"""The bus seen from outside the worker: connect, name the database, insert, read, follow.

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

from planbus import logs, runtime
from planbus.bus import checks, db, queries
from planbus.errors import ConfigurationError, one_line
from planbus.ops import admin_queries, status
from planbus.settings import Settings

log = logging.getLogger("planbus.cli")

TERMINAL = ("completed", "failed")
STATUSES = ("pending", "processing", "completed", "failed")
LIST_LIMIT = 50
POLL_SECONDS = 0.25  # how often a waiting command reads a request whose status may change


class RequestEvent(BaseModel):
    """The payload of `plan_request_events`; other keys may come and are ignored."""

    id: int
    status: str


@asynccontextmanager
async def connection(settings: Settings) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
    """An autocommit connection to the configured database, or to the embedded server."""
    async with AsyncExitStack() as stack:
        dsn = await stack.enter_async_context(database(settings))
        async with await connect(dsn) as conn:
            yield conn


@asynccontextmanager
async def database(settings: Settings) -> AsyncIterator[str]:
    """The DSN to use; with no URL, the embedded server in PLANBUS_DATA_DIR, started if needed
    (and stopped again afterwards when this command started it)."""
    async with AsyncExitStack() as stack:
        dsn = await runtime.database_url(settings, stack)
        await db.check_database(dsn, None)
        yield dsn


async def connect(dsn: str) -> psycopg.AsyncConnection[Any]:
    """An autocommit connection, or ConfigurationError in one line (password masked)."""
    try:
        return await psycopg.AsyncConnection.connect(
            dsn, autocommit=True, connect_timeout=10, application_name="planbus-cli"
        )
    except psycopg.Error as exc:
        raise ConfigurationError(
            f"cannot connect to the database at {db.redact(dsn)}: {one_line(exc)}"
        ) from None


async def schema_revision(conn: psycopg.AsyncConnection[Any]) -> str | None:
    """The alembic revision the database is at; None when it was never migrated."""
    try:
        rows = await fetchall(conn, checks.SCHEMA_REVISION)
    except errors.UndefinedTable:
        return None
    return rows[0]["version_num"] if rows else None


async def fetchall(
    conn: psycopg.AsyncConnection[Any], query: LiteralString, params: dict[str, Any] | None = None
) -> list[dict[str, Any]]:
    cursor = conn.cursor(row_factory=dict_row)
    await cursor.execute(query, params)
    return await cursor.fetchall()


async def describe(conn: psycopg.AsyncConnection[Any], settings: Settings) -> str:
    """host:port/dbname of `conn` (never a password), and the data folder when embedded."""
    info = conn.info
    where = f"{info.host}:{info.port}/{info.dbname}"
    if settings.database_url is None:
        (row,) = await fetchall(conn, admin_queries.DATA_DIRECTORY)
        where += f" (embedded PostgreSQL, data folder {row['current_setting']})"
    return where


async def status_report(conn: psycopg.AsyncConnection[Any]) -> dict[str, Any]:
    """Counts by status, the oldest pending request, claims in progress, the last hour's
    failures, the LLM provider's pause and tokens."""
    counts = {status: 0 for status in STATUSES}
    for row in await fetchall(conn, admin_queries.STATUS_COUNTS):
        counts[row["status"]] = row["count"]
    oldest = await fetchall(conn, admin_queries.STATUS_OLDEST_PENDING)
    limit = {"limit": LIST_LIMIT}
    return {
        "counts": counts,
        "oldest_pending": oldest[0] if oldest else None,
        "processing": await fetchall(conn, admin_queries.STATUS_PROCESSING, limit),
        "failed_last_hour": await fetchall(conn, admin_queries.STATUS_RECENT_FAILURES, limit),
        "provider": await status.status_report(conn),
    }


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
                conn, admin_queries.INSERT_REQUEST, {"lead_id": lead_id, "telegram_id": telegram_id}
            )
        except errors.UniqueViolation:
            active = await fetchall(conn, admin_queries.ACTIVE_REQUEST, {"lead_id": lead_id})
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


async def follow_request(
    conn: psycopg.AsyncConnection[Any], request_id: int, within: float
) -> AsyncIterator[dict[str, Any]]:
    """The request's row now and at every change of status or attempt, until it ends or
    `within` seconds pass. Needs `listen_events(conn)` first."""
    deadline = anyio.current_time() + within
    row = await request_row(conn, request_id)
    yield row
    while row["status"] not in TERMINAL:
        remaining = deadline - anyio.current_time()
        if remaining <= 0:
            return
        # The end comes as an event; a claim or a retry sends none, so look every so often.
        async for notify in conn.notifies(timeout=min(remaining, POLL_SECONDS)):
            if event_id(notify.payload) == request_id:
                break
        seen, row = row, await request_row(conn, request_id)
        if (row["status"], row["attempts"]) != (seen["status"], seen["attempts"]):
            yield row


async def request_row(conn: psycopg.AsyncConnection[Any], request_id: int) -> dict[str, Any]:
    """The request with its timings and lead, or a failed stand-in when it no longer exists."""
    rows = await fetchall(conn, admin_queries.REQUEST_STORY, {"id": request_id})
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
