"""`python -m planbus.listen`: run the worker until SIGINT, SIGTERM or SIGHUP."""

from __future__ import annotations

import gc
import logging
import signal
import sys
from collections.abc import Sequence
from contextlib import AsyncExitStack
from functools import partial

import anyio
from anyio.abc import TaskStatus

from planbus import logs, runtime
from planbus.bus.worker import Worker
from planbus.errors import ConfigurationError
from planbus.ops import metrics_server
from planbus.settings import Settings, settings_from_args

log = logging.getLogger("planbus.listen")


async def serve(settings: Settings) -> None:
    """Run one worker until a signal stops it; a signal during start-up ends it cleanly."""
    shutdown = Shutdown()
    failure: ConfigurationError | None = None
    async with anyio.create_task_group() as tg:
        await tg.start(stop_on_signals, shutdown)
        try:
            await run_worker(settings, shutdown)
        except ConfigurationError as exc:
            failure = exc  # raised here, outside the task group, as one plain error
        tg.cancel_scope.cancel()
    if failure is not None:
        raise failure
    log.info("stopped")


class Shutdown:
    """Where a signal goes: the running worker, or the start-up still under way."""

    def __init__(self) -> None:
        self.starting = anyio.CancelScope()
        self.worker: Worker | None = None

    def request(self) -> None:
        if self.worker is not None:
            self.worker.stop()
        else:
            self.starting.cancel()


async def run_worker(settings: Settings, shutdown: Shutdown) -> None:
    """Build the worker and run it until `shutdown` asks it to stop."""
    async with AsyncExitStack() as stack:
        bound = None
        if settings.metrics_port:
            # Bound first: a port in use ends start-up before the database is touched.
            host, port = settings.metrics_host, settings.metrics_port
            bound = await stack.enter_async_context(await metrics_server.listen(host, port))
        with shutdown.starting:
            shutdown.worker = await stack.enter_async_context(runtime.open_worker(settings))
        if shutdown.starting.cancel_called:
            log.info("stopped during start-up; nothing was claimed")
            return
        worker = shutdown.worker
        assert worker is not None
        settle_heap()
        async with anyio.create_task_group() as tg:
            if bound is not None:
                await tg.start(
                    partial(runtime.serve_metrics, bound=bound),
                    worker,
                    settings.metrics_host,
                    settings.metrics_port,
                )
            await worker.run()
            tg.cancel_scope.cancel()
        if worker.failure is not None:  # e.g. a LISTEN URL that hears nothing: exit 2
            raise worker.failure


def settle_heap() -> None:
    """Put what start-up built out of the cyclic collector's reach.

    The modules, the SDK's and pydantic's types and the settings (about 150,000 objects) live
    as long as the process, yet every full collection walked them all: 40-80 ms each on the
    benchmark machine, several times a drain, each one a stall for every request in flight.
    Frozen, a full collection walks only what requests allocated.
    """
    gc.collect()
    gc.freeze()


async def stop_on_signals(
    shutdown: Shutdown, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED
) -> None:
    # SIGHUP too: a closed terminal is a request to stop, not a crash mid-write.
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as signals:
        task_status.started()
        async for signum in signals:
            log.info(
                "received %s: claiming nothing new, finishing in-flight requests",
                signal.Signals(signum).name,
            )
            shutdown.request()


def main(argv: Sequence[str] | None = None) -> int:
    try:
        settings, args = settings_from_args(argv, "python -m planbus.listen")
    except ConfigurationError as exc:
        log.error("%s", exc)  # logging is set up by now: in the chosen format
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
