"""Database plumbing: the work pool, the LISTEN connection, and the start-up checks."""

from __future__ import annotations

import logging
import os
import re
import secrets
import socket
import time
from collections.abc import Awaitable, Callable
from contextlib import aclosing
from typing import Any
from urllib.parse import unquote

import anyio
import psycopg
from anyio.abc import TaskStatus
from psycopg import sql
from psycopg.abc import RV, PQGen
from psycopg_pool import AsyncConnectionPool

from planbus.bus import checks, provider_queries, queries
from planbus.bus.retry import Backoff
from planbus.errors import ConfigurationError, one_line

log = logging.getLogger(__name__)


# `scheme://user:password@`: the password runs to the last '@' before the host, since libpq
# ends it at the first one and reads the rest as the host (which it then echoes in errors).
URL_PASSWORD = re.compile(r"(\b[a-z][a-z0-9+.-]*://[^:/@?#\s]*:)([^/?#\s]*)@", re.IGNORECASE)
# `password=...` in a conninfo string (quoted, with backslash escapes) or a URL's query.
KEYWORD_PASSWORD = re.compile(r"(\bpassword\s*=\s*)('(?:[^'\\]|\\.)*'|[^\s&']+)", re.IGNORECASE)


def redact(text: str, dsn: str | None = None) -> str:
    """`text` (a DSN, or a message about one) with every password in it masked.

    Given the `dsn` a message is about, its password is also masked wherever the driver echoed
    it: whole, percent-decoded, or the part after an '@' that libpq took for the host.
    """
    echoes = _password_echoes(dsn or "")
    for echo in sorted(echoes, key=len, reverse=True):
        text = text.replace(echo, echoes[echo])
    text = URL_PASSWORD.sub(r"\1***@", text)
    return KEYWORD_PASSWORD.sub(r"\1***", text)


def _password_echoes(dsn: str) -> dict[str, str]:
    """Each form in which `dsn`'s password may appear in a message, and its masked form."""
    found = {match.group(2) for match in URL_PASSWORD.finditer(dsn)}
    for match in KEYWORD_PASSWORD.finditer(dsn):
        value = match.group(2)
        found.add(re.sub(r"\\(.)", r"\1", value[1:-1]) if value.startswith("'") else value)
    found |= {unquote(password) for password in found}
    echoes = {}
    for password in found:
        parts = password.split("@")
        echoes.update({"@".join(parts[i:]) + "@": "***@" for i in range(1, len(parts))})
        # A shorter one cannot be told from ordinary words; the patterns mask it in place.
        if len(password) >= 3:
            echoes[password] = "***"
    echoes.pop("@", None)
    return echoes


def worker_name() -> str:
    """host:pid, stored on each claim so an operator can see who holds it."""
    return f"{socket.gethostname()}:{os.getpid()}"


async def check_database(dsn: str, head: str | None) -> None:
    """Fail fast, with what to do, when the database is unreachable or not migrated."""
    try:
        conn = await psycopg.AsyncConnection.connect(dsn, connect_timeout=10, autocommit=True)
    except psycopg.ProgrammingError as exc:
        reason = redact(str(exc).strip(), dsn)
        raise ConfigurationError(f"invalid database URL {redact(dsn)!r}: {reason}") from None
    except psycopg.OperationalError as exc:
        raise ConfigurationError(
            f"cannot connect to the database at {redact(dsn)}: {redact(one_line(exc), dsn)}"
        ) from None
    async with conn:
        await check_rights(conn)  # first: without rights the schema looks missing
        ready = await (await conn.execute(checks.SCHEMA_READY)).fetchone()
        if not ready or not ready[0]:
            raise ConfigurationError(
                "the database has no planbus schema: run `alembic upgrade head` first"
            )
        if head is not None:
            row = await (await conn.execute(checks.SCHEMA_REVISION)).fetchone()
            if row is None or row[0] != head:
                raise ConfigurationError(
                    f"the database schema is at revision {row[0] if row else 'none'}, this "
                    f"worker needs {head}: run `alembic upgrade head`"
                )
            allowed = await (await conn.execute(checks.EVENT_RIGHTS)).fetchone()
            if not allowed or not allowed[0]:
                raise ConfigurationError(
                    "this role may not send request events: run `GRANT EXECUTE ON FUNCTION "
                    "public.planbus_request_event(bigint, bigint, bigint, text) TO <role>` "
                    "as the tables' owner"
                )


async def check_rights(conn: psycopg.AsyncConnection[Any]) -> None:
    """Fail when this role cannot see or change the rows it works on; warn when the Mini App's
    roles may write lead_registry (that defeats the ownership rule)."""
    problems = []
    for table, role, missing, hidden in await (await conn.execute(checks.WORKER_RIGHTS)).fetchall():
        if missing:
            problems.append(
                f"role {role} lacks {missing} on {table} (GRANT {missing} ON {table} TO {role})"
            )
        if hidden:
            problems.append(
                f"role {role} cannot see the rows of {table}: row-level security is on and the "
                f"role is neither the table's owner nor BYPASSRLS (as a superuser: ALTER ROLE "
                f"{role} BYPASSRLS, or connect as the owner)"
            )
    if problems:
        raise ConfigurationError("; ".join(problems) + "; see docs/security.md")
    warning = await (await conn.execute(checks.LEAD_REGISTRY_WRITABLE_BY_API)).fetchone()
    if warning is not None:
        log.warning("%s", warning[0])


def make_pool(dsn: str, size: int, *, prepare: bool = True) -> AsyncConnectionPool:
    """The pool for effects, heartbeats and the sweep; every statement we send is atomic alone,
    so connections run in autocommit and a write costs one round trip.

    `prepare=False` for a URL that may reach a transaction pooler (PLANBUS_WORK_DATABASE_URL):
    psycopg prepares a statement on the server after five runs on one connection, and behind
    such a pooler the next run may land on another server connection, where the name is
    unknown or taken ("prepared statement "_pg3_1" does not exist"; PgBouncer 1.18 has no
    protocol-level prepared statements, 1.21+ only with max_prepared_statements). Unprepared,
    a statement is still one round trip, but the server plans it every time: on a direct
    connection that cost 0.7 ms of server CPU per request (W2) and +43 % W1 pickup, so the
    database URL, which the LISTEN probe proves is a session, keeps preparing.
    """
    kwargs: dict[str, Any] = {"autocommit": True, "application_name": "planbus"}
    if not prepare:
        kwargs["prepare_threshold"] = None
    return AsyncConnectionPool(
        dsn,
        min_size=min(2, size),
        max_size=size,
        kwargs=kwargs,
        open=False,
        timeout=10,
        name="planbus",
    )


async def connect_for_claims(pool: AsyncConnectionPool) -> psycopg.AsyncConnection[Any]:
    """The claim loop's own connection, to the database `pool` serves, made like the pool's
    (a transaction pooler is fine: each claim is one autocommit statement).

    One backend that runs nothing but claims answers sooner than whichever pooled connection
    is next, and a claim never waits behind effects for a connection. In three side-by-side
    comparisons: W1 commit -> claim 6-19% shorter, commit -> LLM call p99 7-9% shorter.
    """
    assert isinstance(pool.conninfo, str), "make_pool builds every pool from a URL"
    assert isinstance(pool.kwargs, dict), "make_pool builds every pool with a dict of kwargs"
    kwargs = {**pool.kwargs, "application_name": "planbus-claim", "connect_timeout": 10}
    return await psycopg.AsyncConnection.connect(pool.conninfo, **kwargs)


async def listen(conn: psycopg.AsyncConnection[Any], channel: str) -> None:
    """LISTEN on `channel`, the name quoted as an identifier."""
    await conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(channel)))


class ListenerState:
    """What /healthz and the logs need to know about the LISTEN connection."""

    def __init__(self) -> None:
        self.connected = False
        self.started = False  # True once the first connection listens
        self.reconnects = 0


class ListenConnection(psycopg.AsyncConnection[Any]):
    """The LISTEN connection, which waits for its socket without a polling timer.

    psycopg wakes every 0.1 s while it waits, to notice interruptions; on a connection that
    waits for notifications all day that was most of an idle worker's CPU (0.2 s a minute,
    measured; 0.04 s without it). Asyncio cancellation and a closed socket still end the wait.
    """

    async def wait(
        self,
        gen: PQGen[RV],
        interval: float = 3600.0,
        timeout: float | None = None,  # noqa: ASYNC109 (psycopg's signature)
    ) -> RV:
        return await super().wait(gen, interval=max(interval, 3600.0), timeout=timeout)


# How long a probe notification may take to come back once it is committed. A session
# connection hears it within milliseconds; behind a transaction pooler it never arrives.
PROBE_SECONDS = 2.0

DEAF_LISTEN = (
    "PLANBUS_DATABASE_URL (or DATABASE_URL, --database-url) hears no notifications: LISTEN "
    "needs a session connection (direct, or a pooler in session mode), not a transaction "
    "pooler (PgBouncer pool_mode = transaction, Supavisor port 6543); put the pooled URL in "
    "PLANBUS_WORK_DATABASE_URL instead (docs/deploy.md)"
)


async def hears_itself(
    conn: psycopg.AsyncConnection[Any],
    pool: AsyncConnectionPool,
    on_notify: Callable[[psycopg.Notify], None],
) -> bool:
    """True when a notification sent from another (pooled) connection reaches `conn`.

    The channel is this connection's own, so no other worker hears the probe. Notifications
    on the real channels that arrive meanwhile go to `on_notify` as usual.
    """
    channel = f"planbus_probe_{secrets.token_hex(8)}"
    await listen(conn, channel)
    async with pool.connection() as other:
        await other.execute(checks.LISTEN_PROBE, {"channel": channel})
    heard = False
    # Closed before the UNLISTEN: until then the generator holds the connection's lock.
    async with aclosing(conn.notifies(timeout=PROBE_SECONDS)) as notifies:
        async for notify in notifies:
            if notify.channel == channel:
                heard = True
                break
            on_notify(notify)
    if heard:
        await conn.execute(sql.SQL("UNLISTEN {}").format(sql.Identifier(channel)))
    return heard


async def listen_forever(
    dsn: str,
    pool: AsyncConnectionPool,
    on_notify: Callable[[psycopg.Notify], None],
    on_connect: Callable[[bool], Awaitable[None]],
    state: ListenerState,
    *,
    task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """LISTEN on a dedicated autocommit connection; reconnect with backoff, never exit.

    `on_connect(reconnected)` runs after every (re)connect so the caller can catch up on
    notifications it may have missed while disconnected. A connection that does not hear its
    own probe (see `hears_itself`) raises ConfigurationError, at start-up (before
    `task_status.started()`) or after a reconnect (`state.started` is then True).
    """
    backoff = Backoff(base=0.05, cap=5.0)
    while True:
        try:
            # TCP keepalives: a LISTEN connection that dies silently would cost every wake-up.
            async with await ListenConnection.connect(
                dsn,
                autocommit=True,
                application_name="planbus-listen",
                keepalives=1,
                keepalives_idle=10,
                keepalives_interval=5,
                keepalives_count=3,
            ) as conn:
                await listen(conn, queries.LISTEN_CHANNEL)
                await listen(conn, provider_queries.PROVIDER_CHANNEL)  # a peer's provider pause
                await listen(conn, queries.CLAIMS_CHANNEL)  # what a peer's claim took
                await listen(conn, queries.WORKERS_CHANNEL)  # a peer joined or left
                state.connected = True
                if state.started:
                    state.reconnects += 1
                    log.info(
                        "LISTEN connection reconnected after %d failed attempts", backoff.failures
                    )
                backoff.succeeded()
                await on_connect(state.started)  # first: it drops pooled connections that died
                if not await hears_itself(conn, pool, on_notify):
                    raise ConfigurationError(DEAF_LISTEN)
                if not state.started:
                    state.started = True
                    task_status.started()
                async for notify in conn.notifies():
                    on_notify(notify)
        except psycopg.OperationalError as exc:
            state.connected = False
            delay = backoff.failed(time.monotonic())
            log.warning("LISTEN connection lost (%s); reconnecting in %.2fs", one_line(exc), delay)
            await anyio.sleep(delay)
