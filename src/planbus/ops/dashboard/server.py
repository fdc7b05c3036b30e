"""`python -m planbus dashboard`: where it may listen, then the feed and uvicorn until stopped.

The checks come first and each is one line with exit 2 (ConfigurationError): an address other
machines can reach without PLANBUS_DASHBOARD_TOKEN, a port in use, an unreachable or
unmigrated database. The socket is bound before the database is touched, so a refusal starts
nothing. SIGINT and SIGTERM stop it: the event streams end, uvicorn closes, exit 0.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import secrets
import signal
import socket
from collections.abc import Callable, Iterator
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from typing import Any

import anyio
import uvicorn
from anyio.abc import TaskStatus
from psycopg import errors
from psycopg_pool import AsyncConnectionPool

from planbus.errors import ConfigurationError
from planbus.ops import client
from planbus.ops.dashboard import feed, web
from planbus.ops.dashboard.render import Renderer
from planbus.settings import Settings

log = logging.getLogger(__name__)

# One reading of the database per second for every open page: at most ~1 s old when shown.
REFRESH_SECONDS = 1.0
# On stop, how long open connections may take to finish (the event streams end at once).
GRACE_SECONDS = 2
EXIT_OK = 0


@dataclass
class Running:
    """A started dashboard: its address, its database, its feed; `stop()` ends it."""

    url: str
    where: str
    feed: feed.Feed
    stop: Callable[[], None]
    stopped: anyio.Event = field(default_factory=anyio.Event)


class _Server(uvicorn.Server):
    """uvicorn, minus its own signal handlers: the command handles SIGINT and SIGTERM."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def listen_address(host: str, port: int, token: str | None) -> tuple[Any, ...]:
    """The address to bind, and whether it is loopback; refused beyond loopback sans token."""
    try:
        infos = socket.getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except socket.gaierror as exc:
        raise ConfigurationError(f"cannot listen on {host!r}: {exc.strerror}") from None
    loopback = all(
        ipaddress.ip_address(str(info[4][0]).split("%")[0]).is_loopback for info in infos
    )
    if not loopback and not token:
        raise ConfigurationError(
            f"the dashboard would listen on {host or '*'}, which other machines can reach: set "
            "PLANBUS_DASHBOARD_TOKEN (every page and action then needs it), or keep --host "
            "127.0.0.1"
        )
    return infos[0], loopback


def bind(info: tuple[Any, ...], host: str, port: int) -> socket.socket:
    family, kind, proto, _, address = info
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as exc:
        sock.close()
        raise ConfigurationError(
            f"cannot serve the dashboard on {host}:{port} ({exc.strerror or exc}): "
            "choose another --port"
        ) from None
    return sock


def url_of(sock: socket.socket) -> str:
    address, port = sock.getsockname()[:2]
    shown = f"[{address}]" if ":" in address else address
    return f"http://{shown}:{port}/"


async def serve(
    settings: Settings,
    *,
    refresh: float = REFRESH_SECONDS,
    signals: bool = False,
    task_status: TaskStatus[Running] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the dashboard until `Running.stop()` (or, with `signals`, SIGINT or SIGTERM);
    reports `Running` once it answers. A refusal to start is raised as is, not in a group."""
    secret = settings.dashboard_token
    # An empty token is no token: it would open the dashboard to anyone who sends nothing.
    token = (secret.get_secret_value() if secret is not None else "") or None
    host, port = settings.dashboard_host, settings.dashboard_port
    info, loopback = listen_address(host, port, token)
    async with AsyncExitStack() as stack:
        sock = stack.enter_context(bind(info, host, port))
        dsn = await stack.enter_async_context(client.database(settings))
        pool = await stack.enter_async_context(open_pool(dsn))
        async with pool.connection() as conn:
            where = await client.describe(conn, settings)
        await first_reading(pool, where)
        csrf = secrets.token_urlsafe(32)
        renderer = Renderer(csrf, where)
        shared = feed.Feed(pool, renderer.sections, refresh)
        dashboard = web.Dashboard(shared, renderer, pool, csrf)
        # With a token, the token guards against another site's page; without, the Host name.
        app = web.build(dashboard, token=token, loopback_only=loopback and token is None)
        server = _Server(config(app))

        def stop() -> None:
            shared.close()
            server.should_exit = True

        running = Running(url_of(sock), where, shared, stop)
        try:
            async with anyio.create_task_group() as tg:
                await tg.start(shared.run)
                if signals:
                    tg.start_soon(_stop_on_signal, running)
                sock.listen()
                task_status.started(running)
                await server.serve(sockets=[sock])
                tg.cancel_scope.cancel()
        finally:
            running.stopped.set()


def config(app: Any) -> uvicorn.Config:
    return uvicorn.Config(
        app,
        lifespan="off",
        log_config=None,
        access_log=False,
        server_header=False,
        http="h11",
        ws="none",
        timeout_graceful_shutdown=GRACE_SECONDS,
    )


@contextlib.asynccontextmanager
async def open_pool(dsn: str) -> Any:
    """Two connections at most: one for the shared reading, one for an action."""
    pool = AsyncConnectionPool(
        dsn,
        min_size=1,
        max_size=2,
        kwargs={"autocommit": True, "application_name": "planbus-dashboard"},
        open=False,
        timeout=10,
        name="planbus-dashboard",
    )
    await pool.open(wait=True, timeout=30)
    try:
        yield pool
    finally:
        await pool.close()


async def first_reading(pool: AsyncConnectionPool, where: str) -> None:
    """Fail at start, in one line, on a database the migrations have not reached."""
    try:
        await feed.read(pool)
    except (errors.UndefinedTable, errors.UndefinedColumn) as exc:
        raise ConfigurationError(
            f"the database {where} is not migrated ({exc.diag.message_primary}): run "
            "`python -m planbus migrate`"
        ) from None


class _Announce(TaskStatus[Running]):
    """Says where the dashboard answers, once it does."""

    def started(self, value: Running | None = None) -> None:
        assert value is not None
        print(f"planbus dashboard on {value.url} (database {value.where})", flush=True)


async def run(settings: Settings) -> int:
    """The command: serve, say where, stop on SIGINT or SIGTERM."""
    await serve(settings, signals=True, task_status=_Announce())
    return EXIT_OK


async def _stop_on_signal(running: Running) -> None:
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for _ in signals:
            log.info("stopping the dashboard")
            running.stop()
            return
