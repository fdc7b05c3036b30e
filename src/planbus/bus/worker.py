"""The worker: the claim loop, processing a claimed request, and the drain on stop.

The lease (heartbeat, sweep, hand-back) lives in `leases`, the final writes in `effects`, the
retry rules in `retry`; `runtime.open_worker` builds a Worker.

A notification is only a wake-up call: the claim loop wakes on NOTIFY, on a freed slot, on the
sweep, on the next retry becoming due, or on stop, and then claims with SKIP LOCKED. A lost
notification costs latency (until the next sweep), never work.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any

import anyio
import psycopg
from anyio.abc import TaskGroup, TaskStatus
from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool

from planbus.bus import effects, provider_queries, queries
from planbus.bus.claim import Claim
from planbus.bus.db import ListenerState, connect_for_claims, listen_forever
from planbus.bus.finish import Finisher
from planbus.bus.fleet import Fleet
from planbus.bus.leases import Leases
from planbus.bus.metrics import PaceCollector, TokenCounters, WorkerMetrics
from planbus.bus.outcomes import report_outcome
from planbus.bus.progress import ProgressWriter
from planbus.bus.retry import Backoff
from planbus.bus.throttling import HeldBackCollector, ProviderLimits
from planbus.bus.tracing import NO_TRACING, Tracing
from planbus.bus.wakeup import Wakeup
from planbus.errors import (
    ConfigurationError,
    PermanentError,
    PlanningError,
    TransientError,
    one_line,
)
from planbus.llm.accounting import ledger
from planbus.llm.planner import Planner
from planbus.logs import request_fields
from planbus.settings import Settings

log = logging.getLogger(__name__)


class Worker:
    """Claims and processes requests until `stop()`, then drains within the grace period."""

    def __init__(
        self,
        settings: Settings,
        dsn: str,
        pool: AsyncConnectionPool,
        planner: Planner,
        worker_id: str,
        tracing: Tracing = NO_TRACING,
    ) -> None:
        self.settings = settings
        self.dsn = dsn
        self.pool = pool
        self.planner = planner
        self.worker_id = worker_id
        self.tracing = tracing
        self.listener = ListenerState()
        self.metrics = WorkerMetrics(self.listener, lambda: len(self.inflight))
        self.inflight: dict[int, Claim] = {}
        # Half the pool writes effects, so heartbeats, the sweep and retries never queue for long.
        self.completions = effects.Completions(pool, writers=max(1, settings.pool_size // 2))
        self.limits = ProviderLimits(settings, pool)
        self.fleet = Fleet(worker_id, pool, settings.sweep_seconds)
        self.leases = Leases(settings, pool, self.inflight, self.metrics, self.fleet, self._beat)
        self.metrics.registry.register(PaceCollector(self.limits.pace))
        self.metrics.registry.register(HeldBackCollector(self.limits, lambda: len(self.inflight)))
        self.limits.tokens = TokenCounters(self.metrics.registry)
        self.progress = ProgressWriter(pool, settings.progress_interval_seconds)
        self.finisher = Finisher(
            settings, pool, self.completions, self.limits, self.leases.write_deadline
        )
        self._wakeup = Wakeup()
        self._maybe_more = True  # False once a claim found fewer due rows than free slots
        self._next_due = math.inf  # monotonic time the earliest backed-off request is due
        self._claims_conn: psycopg.AsyncConnection[Any] | None = None
        self._renew_claims_conn = False  # set after LISTEN reconnects: the server may be new
        self._stopping = False
        self._idle = anyio.Event()
        self._starting = anyio.CancelScope()
        self.failure: ConfigurationError | None = None  # why it stopped on its own, if it did

    def stop(self) -> None:
        """Claim nothing new; `run` then drains in-flight requests and returns."""
        self._stopping = True
        self._wakeup.set()
        self._starting.cancel()  # still waiting for the first LISTEN connection: give up

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        async with anyio.create_task_group() as background:
            with self._starting:
                await background.start(self._listen)
            if self._stopping:
                background.cancel_scope.cancel()
                return
            await self.fleet.start(self._beat())
            background.start_soon(self.fleet.refresh_loop, self._beat)
            await background.start(self.completions.run)
            await background.start(self.progress.run)
            background.start_soon(self.leases.heartbeat_loop)
            # The sweep also catches pending rows that no notification announced.
            background.start_soon(self.leases.sweep_loop, self._after_sweep)
            log.info(
                "listening on channel %s (worker %s, planner %s, concurrency %d)",
                queries.LISTEN_CHANNEL,
                self.worker_id,
                self.planner.name,
                self.settings.concurrency,
            )
            task_status.started()
            async with anyio.create_task_group() as requests:
                try:
                    await self._claim_loop(requests)
                finally:
                    await self._drop_claims_connection()
                await self.fleet.leave()  # nothing new is meant for this worker while it drains
                await self._drain(requests)
            await self.leases.hand_back()
            background.cancel_scope.cancel()

    async def _listen(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """The LISTEN connection. Found deaf (the URL reaches a transaction pooler), at
        start-up or after a reconnect, it stops the worker gracefully and leaves the reason in
        `failure`, for the entry point to exit 2 with."""
        try:
            await listen_forever(
                self.dsn,
                self.pool,
                self._on_notify,
                self._on_connect,
                self.listener,
                task_status=task_status,
            )
        except ConfigurationError as exc:
            self.failure = exc
            if self.listener.started:
                log.error("%s; stopping", exc)
            else:
                task_status.started()  # `run` then sees the stop and returns at once
            self.stop()

    # -- claiming --------------------------------------------------------------------------

    async def _claim_loop(self, requests: TaskGroup) -> None:
        backoff = Backoff(base=0.05, cap=2.0)
        while not self._stopping:
            self.limits.shed_queued(time.monotonic())
            if self.fleet.fallback_due(time.monotonic()):
                self._maybe_more = True  # a request's designated claimer did not take it
            free = self.limits.allowed(len(self.inflight), time.monotonic())
            if free > 0 and self._due():
                try:
                    claims = await self._claim(free)
                    backoff.succeeded()
                except psycopg.Error as exc:
                    delay = backoff.failed(time.monotonic())
                    log.warning("claim failed (%s); retrying in %.2fs", one_line(exc), delay)
                    self._maybe_more = True
                    await anyio.sleep(delay)
                    continue
                self.inflight.update((claim.id, claim) for claim in claims)
                for claim in claims:
                    requests.start_soon(self._process, claim)
                    # Let each request reach the network before the next one is built: the
                    # HTTP client sends from a task of its own, so without this pause a batch
                    # of n claims sends nothing until all n requests are built.
                    await anyio.lowlevel.checkpoint()
                self._claimed(claims)  # its log line and metrics: after the requests left
                continue
            await self._wakeup.wait(self._idle_timeout(), self._next_fallback())

    def _idle_timeout(self) -> float:
        # With every slot busy only a finished request, a call presumed hung (see
        # throttling.STALL_FLOOR) or stop can make room; a free slot waits for the provider's
        # pause or spacing, and for the next retry to become due.
        now = time.monotonic()
        # A call that waits for its first token may be handed back from the server's queue
        # (throttling.shed_queued) or stop counting against the limit: wake up for it too.
        waiting = self.limits.stall_wait(now)
        if self.limits.slots(len(self.inflight)) <= 0:
            return waiting
        due = 0.0 if self._maybe_more else self._next_due - now
        return min(max(0.0, self.limits.wait(now), due), waiting)

    def _next_fallback(self) -> float:
        """When a planned fallback claim is due (monotonic); never while every slot is busy."""
        if self.limits.slots(len(self.inflight)) <= 0:
            return math.inf
        return max(
            self.fleet.next_fallback(), time.monotonic() + self.limits.wait(time.monotonic())
        )

    def _due(self) -> bool:
        return self._maybe_more or time.monotonic() >= self._next_due

    async def _claim(self, limit: int) -> list[Claim]:
        # Cleared before the statement, so a notification that lands while it runs counts.
        self._maybe_more = False
        conn = self._claims_conn
        if conn is None or conn.closed or self._renew_claims_conn:
            await self._drop_claims_connection()
            self._renew_claims_conn = False
            conn = self._claims_conn = await connect_for_claims(self.pool)
            await self._announce_claim_connection(conn)
        granted = await self._grant(conn, limit)
        if self._stopping:  # stopped while connecting or granted: a row inserted since stays
            await self.limits.refund(conn, granted)
            return []
        if not granted:
            return []
        cursor = conn.cursor(row_factory=dict_row)
        claimed_from = self.tracing.clock()
        sent = time.monotonic()
        await cursor.execute(
            queries.CLAIM,
            {
                "worker_id": self.worker_id,
                "lease_seconds": self.settings.lease_seconds,
                "limit": granted,
                "fair_window": queries.FAIR_WINDOW,
                "announce": self.fleet.announce,
            },
        )
        rows = await cursor.fetchall()
        seconds = rows[0]["next_due_seconds"] if rows else None
        self._next_due = math.inf if seconds is None else time.monotonic() + max(seconds, 0.0)
        claims = [Claim.from_row(row) for row in rows if row["id"] is not None]
        self.fleet.claimed_here([c.id for c in claims], len(claims) < granted, sent)
        if len(claims) == granted:
            self._maybe_more = True
        await self.limits.refund(conn, granted - len(claims))
        for claim in claims:
            claim.trace = self.tracing.attempt(
                claim.id, claim.lead_id, claim.attempt, claim.traceparent, claimed_from
            )
            self.limits.started(claim, time.monotonic())
        return claims

    def _claimed(self, claims: list[Claim]) -> None:
        """Log and count claims whose requests are already on their way to the model."""
        for claim in claims:
            log.info(
                "request %d lead %d claimed (attempt %d, waited %.1f ms)",
                claim.id,
                claim.lead_id,
                claim.attempt,
                claim.waited_seconds * 1000,
                extra=request_fields(
                    claim.id, claim.lead_id, claim.attempt, "claimed", claim.waited_seconds * 1000
                ),
            )
            self.metrics.claimed(claim.attempt, claim.waited_seconds)

    async def _grant(self, conn: psycopg.AsyncConnection[Any], wanted: int) -> int:
        """How many calls the provider's limits allow now (all `wanted` when none applies)."""
        if self.limits.stale or self.limits.ending_backoff:  # a peer's pause, or ours ended
            await self.limits.sync(conn)
            if self.limits.allowed(len(self.inflight), time.monotonic()) <= 0:
                self._maybe_more = True
                return 0
        granted = await self.limits.reserve(conn, wanted)
        if granted < wanted:
            self._maybe_more = True  # the ceiling, not the queue, held the claim back
        return granted

    async def _announce_claim_connection(self, conn: psycopg.AsyncConnection[Any]) -> None:
        """Note the new claim connection's backend for this worker's row: its claim
        announcements count only once the peers know it (bus/fleet.py). With peers, write it
        and tell them now; alone, the next sweep writes it (no statement on a lone worker's
        first claim)."""
        self.fleet.claim_pid = conn.info.backend_pid
        if self.fleet.announce and not self.fleet.leaving:
            await self.fleet.start(self._beat())

    async def _drop_claims_connection(self) -> None:
        conn, self._claims_conn = self._claims_conn, None
        if conn is not None:
            with anyio.CancelScope(shield=True):
                await conn.close()

    def _on_notify(self, notify: psycopg.Notify | None = None) -> None:
        if notify is not None:
            if notify.channel == provider_queries.PROVIDER_CHANNEL:
                # No authority in a notification (any role may send one): read the row instead.
                self.limits.stale = True
                return
            if notify.channel == queries.CLAIMS_CHANNEL:
                self.fleet.claimed_elsewhere(notify.payload, notify.pid)
                self._wakeup.by(self._next_fallback())  # a dropped fallback wakes no one
                return
            if notify.channel == queries.WORKERS_CHANNEL:
                self.fleet.peer_changed(notify.payload)
                return
            if not self.fleet.heard(notify.payload, time.monotonic()):
                self._wakeup.by(self._next_fallback())  # another worker claims it (or we do)
                return
        self._maybe_more = True
        self._wakeup.set()

    def _after_sweep(self, due: bool) -> None:
        if due:  # a due request after a sweep: its notification was lost, or its claimer gone
            self._on_notify()

    def _beat(self) -> dict[str, Any]:  # this worker's row in planbus_workers
        limit = self.limits.pace.current_limit
        held_back = self.limits.held_back(len(self.inflight), time.monotonic())
        return self.fleet.beat_params(
            len(self.inflight), self.settings.concurrency, limit, held_back
        )

    async def _on_connect(self, reconnected: bool) -> None:
        # After any gap in LISTEN, catch up on rows whose notification we may have missed.
        if reconnected:
            # The database may have restarted: drop pooled connections that died with it.
            with anyio.move_on_after(self.settings.lease_seconds):
                await self.pool.check()
            self._renew_claims_conn = True
        self.limits.stale = True
        self._on_notify()

    # -- processing ------------------------------------------------------------------------

    async def _process(self, claim: Claim) -> None:
        """Plan one claimed request and write its outcome; the final write is shielded."""
        error: PlanningError | None = None
        plan = None
        with claim.scope:
            try:
                if claim.lead is None:
                    missing = f"Lead {claim.lead_id} does not exist."
                    raise PermanentError(missing, kind="lead_missing")
                with (
                    ledger(getattr(self.planner, "model", self.planner.name)) as claim.cost,
                    self.progress.follow(claim.id, claim.token) as on_progress,
                ):
                    claim.trace.asking()
                    plan = await self.planner.plan(claim.lead, on_progress)
            except PlanningError as exc:
                error = exc
            except Exception as exc:  # a planner bug must not take the worker down
                log.exception("request %d: unexpected planner error", claim.id)
                error = TransientError(f"Unexpected error while planning ({type(exc).__name__}).")
        error = self.limits.shed_error(claim, error, plan is not None)  # from a server's queue
        self.limits.answered(claim, error, len(self.inflight))
        claim.trace.answered(claim.cost, error)
        if claim.lost:
            self._release(claim)
            self.metrics.finished("lost", time.monotonic() - claim.started, error)
            claim.trace.finished("lost", error)
            return
        claim.writing = True
        with anyio.CancelScope(shield=True):
            outcome, error, retry = await self.finisher.finish(claim, plan, error)
        claim.trace.finished(outcome, error)
        self._release(claim)
        report_outcome(claim, outcome, error, retry, self.metrics)

    def _release(self, claim: Claim) -> None:
        self.inflight.pop(claim.id, None)
        # A slot is free: the loop recomputes its wait, which was endless while every slot was
        # busy, even when nothing is due yet (a backed-off retry then waits for its due time,
        # not for the next sweep).
        self._wakeup.set()
        if self._stopping and not self.inflight:
            self._idle.set()

    # -- shutdown ------------------------------------------------------------------------

    async def _drain(self, requests: TaskGroup) -> None:
        grace = self.settings.shutdown_grace_seconds
        if self.inflight:
            log.info(
                "stopping: waiting up to %.0fs for %d in-flight requests", grace, len(self.inflight)
            )
            with anyio.move_on_after(grace):
                await self._idle.wait()
        requests.cancel_scope.cancel()
