"""The worker: claim loop, request processing, heartbeat and fallback sweep.

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

from planbus import effects, queries
from planbus.accounting import ledger
from planbus.backoff import backoff_delay
from planbus.db import ListenerState, connect_for_claims, listen_forever
from planbus.effects import Claim, Outcome
from planbus.errors import PermanentError, PlanningError, Throttled, TransientError
from planbus.logs import request_fields
from planbus.metrics import WorkerMetrics
from planbus.planner import Planner
from planbus.provider_limits import ProviderLimits
from planbus.settings import Settings

log = logging.getLogger(__name__)

WORKER_LOST = "The worker processing this request stopped responding before it finished."
# The outcome of an attempt as logs and metrics name it; `pending` means a retry is scheduled.
OUTCOME_LABELS = {"completed": "completed", "pending": "retry", "failed": "failed", "lost": "lost"}


class Wakeup:
    """A resettable event: `set()` from anywhere, `wait()` until set or timed out."""

    def __init__(self) -> None:
        self._event = anyio.Event()

    def set(self) -> None:
        self._event.set()

    async def wait(self, seconds: float) -> None:
        with anyio.move_on_after(seconds):
            await self._event.wait()
        # Reset before the caller claims: a wake-up arriving after this is not lost, because
        # the claim that follows sees every row committed before that notification.
        self._event = anyio.Event()


class Worker:
    """Claims and processes requests until `stop()`, then drains within the grace period."""

    def __init__(
        self,
        settings: Settings,
        dsn: str,
        pool: AsyncConnectionPool,
        planner: Planner,
        worker_id: str,
    ) -> None:
        self.settings = settings
        self.dsn = dsn
        self.pool = pool
        self.planner = planner
        self.worker_id = worker_id
        self.listener = ListenerState()
        self.metrics = WorkerMetrics(self.listener, lambda: len(self.inflight))
        self.inflight: dict[int, Claim] = {}
        self.limits = ProviderLimits(settings, pool)
        self.limits.register(self.metrics.registry)
        # Half the pool writes effects, so heartbeats, the sweep and retries never queue for long.
        self.completions = effects.Completions(pool, writers=max(1, settings.pool_size // 2))
        self._wakeup = Wakeup()
        self._maybe_more = True  # False once a claim found fewer due rows than free slots
        self._next_due = math.inf  # monotonic time the earliest backed-off request is due
        self._claims_conn: psycopg.AsyncConnection[Any] | None = None
        self._renew_claims_conn = False  # set after LISTEN reconnects: the server may be new
        self._read_pause = True  # read the database's provider pause before the next claim
        self._stopping = False
        self._idle = anyio.Event()
        self._starting = anyio.CancelScope()

    def stop(self) -> None:
        """Claim nothing new; `run` then drains in-flight requests and returns."""
        self._stopping = True
        self._wakeup.set()
        self._starting.cancel()  # still waiting for the first LISTEN connection: give up

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        async with anyio.create_task_group() as background:
            with self._starting:
                await background.start(
                    listen_forever, self.dsn, self._on_notify, self._on_connect, self.listener
                )
            if self._stopping:
                background.cancel_scope.cancel()
                return
            await background.start(self.completions.run)
            background.start_soon(self._heartbeat_loop)
            background.start_soon(self._sweep_loop)
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
                await self._drain(requests)
            await self._hand_back_unfinished()
            background.cancel_scope.cancel()

    # -- claiming --------------------------------------------------------------------------

    async def _claim_loop(self, requests: TaskGroup) -> None:
        failures = 0
        while not self._stopping:
            free = self.limits.allowed(len(self.inflight), time.monotonic())
            if free > 0 and self._due():
                try:
                    claims = await self._claim(free)
                    failures = 0
                except psycopg.Error as exc:
                    failures += 1
                    delay = backoff_delay(failures, base=0.05, cap=2.0)
                    log.warning("claim failed (%s); retrying in %.2fs", _one_line(exc), delay)
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
                continue
            await self._wakeup.wait(self._idle_timeout())

    def _idle_timeout(self) -> float:
        # With every slot busy only a finished request (or stop) can make room; a free slot
        # waits for the provider's pause or spacing, and for the next retry to become due.
        if self.limits.slots(len(self.inflight)) <= 0:
            return math.inf
        now = time.monotonic()
        due = 0.0 if self._maybe_more else self._next_due - now
        return max(0.0, self.limits.wait(now), due)

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
        if self._read_pause:
            self._read_pause = False
            await self.limits.catch_up(conn)
            if self.limits.allowed(len(self.inflight), time.monotonic()) <= 0:
                self._maybe_more = True
                return []
        granted = await self.limits.reserve(conn, limit)
        if granted < limit:
            self._maybe_more = True  # the ceiling, not the queue, held the claim back
            if not granted:
                return []
        cursor = conn.cursor(row_factory=dict_row)
        await cursor.execute(
            queries.CLAIM,
            {
                "worker_id": self.worker_id,
                "lease_seconds": self.settings.lease_seconds,
                "limit": granted,
            },
        )
        rows = await cursor.fetchall()
        seconds = rows[0]["next_due_seconds"] if rows else None
        self._next_due = math.inf if seconds is None else time.monotonic() + max(seconds, 0.0)
        claims = [Claim.from_row(row) for row in rows if row["id"] is not None]
        if len(claims) == granted:
            self._maybe_more = True
        await self.limits.refund(conn, granted - len(claims))
        for claim in claims:
            self.limits.started(claim, time.monotonic())
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
        return claims

    async def _drop_claims_connection(self) -> None:
        conn, self._claims_conn = self._claims_conn, None
        if conn is not None:
            with anyio.CancelScope(shield=True):
                await conn.close()

    def _on_notify(self, notify: psycopg.Notify | None = None) -> None:
        if notify is not None and notify.channel == queries.PROVIDER_CHANNEL:
            self.limits.paused_elsewhere(notify.payload)
            return
        self._maybe_more = True
        self._wakeup.set()

    async def _on_connect(self, reconnected: bool) -> None:
        # After any gap in LISTEN, catch up on rows whose notification we may have missed.
        if reconnected:
            # The database may have restarted: drop pooled connections that died with it.
            with anyio.move_on_after(self.settings.lease_seconds):
                await self.pool.check()
            self._renew_claims_conn = True
        self._read_pause = True  # a peer's pause may have been announced while we were away
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
                with ledger(getattr(self.planner, "model", self.planner.name)) as cost:
                    claim.cost = cost
                    plan = await self.planner.plan(claim.lead)
            except PlanningError as exc:
                error = exc
            except Exception as exc:  # a planner bug must not take the worker down
                log.exception("request %d: unexpected planner error", claim.id)
                error = TransientError(f"Unexpected error while planning ({type(exc).__name__}).")
        self.limits.answered(claim, error, len(self.inflight))
        if claim.lost:
            self._release(claim)
            self.metrics.finished("lost", time.monotonic() - claim.started, error)
            return
        claim.writing = True
        with anyio.CancelScope(shield=True):
            outcome = await self._finish(claim, plan, error)
        self._release(claim)
        self._log_outcome(claim, outcome, error)

    def _release(self, claim: Claim) -> None:
        self.inflight.pop(claim.id, None)
        if self._due():
            self._wakeup.set()  # a slot is free and there may be work for it
        if self._stopping and not self.inflight:
            self._idle.set()

    async def _finish(self, claim: Claim, plan: Any, error: PlanningError | None) -> Outcome:
        deadline = time.monotonic() + self.settings.lease_seconds
        try:
            if error is None:
                return await self.completions.complete(claim, plan, deadline)
            if isinstance(error, Throttled):
                return await self.limits.throttle_back(claim, error, deadline)
            spent = claim.attempt - claim.throttled  # throttled claims spend no attempt
            final = isinstance(error, PermanentError) or spent >= self.settings.max_attempts
            delay = backoff_delay(
                spent,
                base=self.settings.retry_base_seconds,
                cap=self.settings.retry_max_seconds,
            )
            if isinstance(error, TransientError) and error.retry_after is not None:
                delay = max(delay, min(error.retry_after, self.settings.retry_max_seconds))
            claim.retry_delay = delay
            return await effects.give_back(
                self.pool,
                claim,
                error=error.message,
                final=final,
                delay_seconds=delay,
                deadline=deadline,
            )
        except psycopg.Error as exc:
            # The claim stays `processing`; its lease lapses and the sweep hands it on.
            log.error("request %d: could not record its outcome (%s)", claim.id, _one_line(exc))
            return "lost"

    def _log_outcome(self, claim: Claim, outcome: Outcome, error: PlanningError | None) -> None:
        elapsed_ms = (time.monotonic() - claim.started) * 1000
        label = OUTCOME_LABELS[outcome]
        self.metrics.finished(label, elapsed_ms / 1000, error)
        fields = request_fields(claim.id, claim.lead_id, claim.attempt, label, elapsed_ms)
        if error is not None:
            fields["error"] = error.message
        where = f"request {claim.id} lead {claim.lead_id} attempt {claim.attempt}"
        if outcome == "completed":
            log.info("%s completed in %.0f ms", where, elapsed_ms, extra=fields)
        elif outcome == "pending":
            log.warning(
                "%s failed, retrying in %.1fs: %s",
                where,
                claim.retry_delay,
                error.message if error else "",
                extra=fields,
            )
        elif outcome == "failed":
            level = logging.ERROR if isinstance(error, PermanentError) else logging.WARNING
            log.log(
                level, "%s failed for good: %s", where, error.message if error else "", extra=fields
            )
        else:
            log.warning("%s: claim was taken over; wrote nothing", where, extra=fields)

    # -- heartbeat, sweep, shutdown --------------------------------------------------------

    async def _heartbeat_loop(self) -> None:
        while True:
            await anyio.sleep(self.settings.heartbeat_seconds)
            held = [c for c in self.inflight.values() if not c.writing]
            if not held:
                continue
            try:
                async with self.pool.connection() as conn:
                    cursor = await conn.execute(
                        queries.HEARTBEAT,
                        {
                            "ids": [c.id for c in held],
                            "tokens": [c.token for c in held],
                            "lease_seconds": self.settings.lease_seconds,
                        },
                    )
                    still_held = {row[0] for row in await cursor.fetchall()}
            except psycopg.Error as exc:
                log.warning("heartbeat failed (%s); will retry", _one_line(exc))
                continue
            for claim in held:
                if claim.id not in still_held and not claim.writing:
                    log.warning(
                        "request %d: claim lost (lease expired and was taken over)", claim.id
                    )
                    claim.lost = True
                    claim.scope.cancel()

    async def _sweep_loop(self) -> None:
        while True:
            try:
                async with self.pool.connection() as conn:
                    cursor = await conn.execute(
                        queries.RECOVER_EXPIRED,
                        {"max_attempts": self.settings.max_attempts, "lost_error": WORKER_LOST},
                    )
                    for request_id, lead_id, status, attempts, _ in await cursor.fetchall():
                        log.warning(
                            "request %d recovered from an expired claim after attempt %d: now %s",
                            request_id,
                            attempts,
                            status,
                            extra=request_fields(
                                request_id, lead_id, attempts, f"recovered_{status}"
                            ),
                        )
                        self.metrics.recovered(status)
            except psycopg.Error as exc:
                log.warning("sweep failed (%s); will retry", _one_line(exc))
            self._on_notify()  # also catches pending rows that no notification announced
            await anyio.sleep(self.settings.sweep_seconds)

    async def _drain(self, requests: TaskGroup) -> None:
        grace = self.settings.shutdown_grace_seconds
        if self.inflight:
            log.info(
                "stopping: waiting up to %.0fs for %d in-flight requests", grace, len(self.inflight)
            )
            with anyio.move_on_after(grace):
                await self._idle.wait()
        requests.cancel_scope.cancel()

    async def _hand_back_unfinished(self) -> None:
        unfinished = list(self.inflight.values())
        if not unfinished:
            return
        with anyio.CancelScope(shield=True):
            try:
                ids = await effects.hand_back(self.pool, unfinished)
            except psycopg.OperationalError as exc:
                log.error(
                    "could not hand back %d requests (%s); the sweep will recover them",
                    len(unfinished),
                    _one_line(exc),
                )
                return
        handed = set(ids)
        for claim in unfinished:
            if claim.id in handed:
                log.info(
                    "request %d lead %d attempt %d handed back as pending",
                    claim.id,
                    claim.lead_id,
                    claim.attempt,
                    extra=request_fields(claim.id, claim.lead_id, claim.attempt, "handed_back"),
                )
        log.info("handed back %d unfinished requests as pending: %s", len(ids), ids)
        self.inflight.clear()


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__
