"""`python -m planbus.listen`: run the worker until SIGINT or SIGTERM."""

from __future__ import annotations

import logging
import signal
import sys
from collections.abc import Sequence
from contextlib import AsyncExitStack

import anyio
from anyio.abc import TaskStatus

from planbus import db, logs, metrics, migrate
from planbus.embedded import EmbeddedPostgres
from planbus.errors import ConfigurationError
from planbus.planner import make_planner
from planbus.settings import Settings, settings_from_args
from planbus.worker import Worker

log = logging.getLogger("planbus.listen")


async def serve(settings: Settings) -> None:
    """Connect, check the schema, and run one worker until a signal stops it."""
    async with AsyncExitStack() as stack:
        dsn = settings.database_url
        if dsn is None:
            dsn = await anyio.to_thread.run_sync(start_embedded, settings, stack)
        await db.check_database(dsn, migrate.head_revision())
        if settings.work_database_url:
            await db.check_database(settings.work_database_url, None)
        planner = make_planner(settings)
        stack.push_async_callback(planner.aclose)
        pool = db.make_pool(settings.work_database_url or dsn, settings.pool_size)
        await pool.open(wait=True, timeout=30)
        stack.push_async_callback(pool.close)
        worker = Worker(settings, dsn, pool, planner, db.worker_name())
        async with anyio.create_task_group() as tg:
            await tg.start(stop_on_signals, worker)
            if settings.metrics_port:
                await tg.start(metrics.serve, worker, settings.metrics_host, settings.metrics_port)
            await worker.run()
            tg.cancel_scope.cancel()
    log.info("stopped")


def start_embedded(settings: Settings, stack: AsyncExitStack) -> str:
    """The newcomer default: a local server in `settings.data_dir`, migrated to head."""
    server = EmbeddedPostgres(settings.data_dir)
    dsn = server.start()
    if server.owned:
        stack.callback(server.stop)
    log.info("embedded PostgreSQL data folder: %s", server.data_dir)
    migrate.upgrade(dsn)
    log.info("embedded PostgreSQL ready; connect with: psql '%s'", dsn)
    return dsn


async def stop_on_signals(
    worker: Worker, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED
) -> None:
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        task_status.started()
        async for signum in signals:
            log.info(
                "received %s: claiming nothing new, finishing in-flight requests",
                signal.Signals(signum).name,
            )
            worker.stop()


def main(argv: Sequence[str] | None = None) -> int:
    try:
        settings, args = settings_from_args(argv, "python -m planbus.listen")
    except ConfigurationError as exc:
        print(f"planbus: {exc}", file=sys.stderr)
        return 2
    logs.configure(args.log_format, args.log_level)
    try:
        anyio.run(serve, settings)
    except ConfigurationError as exc:
        log.error("%s", exc)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
