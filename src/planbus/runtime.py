"""Building a worker: the database (embedded or by URL), start-up checks, pool, planner.

`open_worker` is the one place a `Worker` is built: the entry point, the demo, the tests and
the benchmarks all go through it, so they run the worker production runs.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from functools import partial

import anyio
from anyio.abc import SocketStream, TaskStatus
from anyio.streams.stapled import MultiListener

from planbus.bus import db, metrics
from planbus.bus.worker import Worker
from planbus.llm.planner import Planner, make_planner
from planbus.ops import metrics_server, migrate
from planbus.ops.embedded import EmbeddedPostgres
from planbus.settings import Settings

log = logging.getLogger("planbus.listen")


async def database_url(settings: Settings, stack: AsyncExitStack) -> str:
    """The configured database URL; with none, the embedded server in `settings.data_dir`,
    started if needed and left when `stack` closes (its last user stops it)."""
    if settings.database_url is not None:
        return settings.database_url
    return await anyio.to_thread.run_sync(start_embedded, settings, stack)


def start_embedded(settings: Settings, stack: AsyncExitStack) -> str:
    """The newcomer default: a local server in `settings.data_dir`, migrated to head."""
    dsn = join_embedded(settings, stack)
    migrate.upgrade(dsn)
    log.info("embedded PostgreSQL ready; connect with: psql '%s'", dsn)
    return dsn


def join_embedded(settings: Settings, stack: AsyncExitStack) -> str:
    """The local server in `settings.data_dir` as it is (`migrate` upgrades it itself), left
    when `stack` closes."""
    server = EmbeddedPostgres(settings.data_dir)
    dsn = server.start()
    if server.owned:
        stack.callback(server.stop)
    log.info("embedded PostgreSQL data folder: %s", server.data_dir)
    return dsn


@asynccontextmanager
async def open_worker(
    settings: Settings, *, planner: Planner | None = None, worker_id: str | None = None
) -> AsyncIterator[Worker]:
    """A worker ready to `run()`, its database checked, its pool open; closed on exit.

    `planner` replaces the one the settings name (it is then the caller's to close).
    """
    async with AsyncExitStack() as stack:
        dsn = await database_url(settings, stack)
        await db.check_database(dsn, migrate.head_revision())
        if settings.work_database_url:
            await db.check_database(settings.work_database_url, None)
        if planner is None:
            planner = make_planner(settings)
            stack.push_async_callback(planner.aclose)
        # The work URL may be a transaction pooler; the database URL is a session (the LISTEN
        # probe stops the worker otherwise), where prepared statements save the planning.
        work_url = settings.work_database_url
        pool = db.make_pool(work_url or dsn, settings.pool_size, prepare=work_url is None)
        await pool.open(wait=True, timeout=30)
        stack.push_async_callback(pool.close)
        yield Worker(settings, dsn, pool, planner, worker_id or db.worker_name())


async def serve_metrics(
    worker: Worker,
    host: str,
    port: int,
    *,
    bound: MultiListener[SocketStream] | None = None,
    task_status: TaskStatus[int] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """The worker's /metrics and /healthz on host:port (or on `bound`, bound there by
    `metrics_server.listen`) until cancelled; reports the port."""
    await metrics_server.serve(
        host,
        port,
        partial(metrics.scrape, worker.metrics, worker.pool),
        partial(metrics.health, worker.listener, worker.pool),
        bound=bound,
        task_status=task_status,
    )
