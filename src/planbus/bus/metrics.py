"""Prometheus metrics and the health check; `metrics_server` serves them on `--metrics-port`.

Each Worker owns a registry of its own (never the global default), so several workers in one
process, as in the tests, never collide. Queue depth and the oldest pending age are read from
the database at scrape time: a worker nobody scrapes sends no extra statements.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import anyio
import psycopg
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from planbus.bus import checks
from planbus.errors import PermanentError, PlanningError
from planbus.llm.accounting import Cost
from planbus.llm.pacing import Pace

if TYPE_CHECKING:
    from psycopg_pool import AsyncConnectionPool

    from planbus.bus.db import ListenerState

log = logging.getLogger(__name__)

HEALTH_TIMEOUT_SECONDS = 2.0

# From a NOTIFY round trip (sub-millisecond) to a request that waited out retries.
PICKUP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
# From the template planner (milliseconds) to a slow model (the LLM timeout defaults to 60 s).
PROCESSING_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120)


class WorkerMetrics:
    """The metrics of one worker, in a registry of its own."""

    def __init__(self, listener: ListenerState, inflight: Callable[[], int]) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "planbus_requests",
            "Claims that ended, by outcome (completed, retry, failed, lost).",
            ["outcome"],
            registry=r,
        )
        self.pickup_latency = Histogram(
            "planbus_pickup_latency_seconds",
            "Insert to first claim of a request.",
            buckets=PICKUP_BUCKETS,
            registry=r,
        )
        self.processing_time = Histogram(
            "planbus_processing_seconds",
            "Claim to final write of one attempt.",
            buckets=PROCESSING_BUCKETS,
            registry=r,
        )
        self.sweep_recoveries = Counter(
            "planbus_sweep_recoveries",
            "Expired claims the sweep put back, by the status they got (pending, failed).",
            ["status"],
            registry=r,
        )
        self.planner_errors = Counter(
            "planbus_planner_errors",
            "Failed planning attempts by kind (e.g. transient, permanent, or the planner's own).",
            ["kind"],
            registry=r,
        )
        in_flight = Gauge(
            "planbus_requests_in_flight", "Requests this worker holds right now.", registry=r
        )
        in_flight.set_function(lambda: float(inflight()))
        connected = Gauge(
            "planbus_listen_connected", "1 while the LISTEN connection is up.", registry=r
        )
        connected.set_function(lambda: 1.0 if listener.connected else 0.0)
        self.queue_depth = Gauge(
            "planbus_queue_depth",
            "Requests in `pending` (including those waiting out a retry delay), at scrape time.",
            registry=r,
        )
        self.oldest_pending_age = Gauge(
            "planbus_oldest_pending_age_seconds",
            "Age of the oldest `pending` request at scrape time (0 when none).",
            registry=r,
        )
        r.register(_ReconnectsCollector(listener))

    def claimed(self, attempt: int, waited_seconds: float) -> None:
        """A claim started; only a first attempt measures insert-to-claim."""
        if attempt == 1:
            self.pickup_latency.observe(waited_seconds)

    def finished(self, outcome: str, seconds: float, error: PlanningError | None) -> None:
        """An attempt ended with `outcome`, after `seconds`, with `error` if planning failed."""
        self.requests.labels(outcome=outcome).inc()
        self.processing_time.observe(seconds)
        if error is not None:
            self.planner_errors.labels(kind=error_kind(error)).inc()

    def recovered(self, status: str) -> None:
        """The sweep put an expired claim back to `status`."""
        self.sweep_recoveries.labels(status=status).inc()


class _ReconnectsCollector(Collector):
    """Reads the listener's own counter at scrape time, so db.py needs no metrics code."""

    def __init__(self, listener: ListenerState) -> None:
        self.listener = listener

    def collect(self) -> Iterator[Metric]:
        yield CounterMetricFamily(
            "planbus_listen_reconnects",
            "Times the LISTEN connection was re-established after it was lost.",
            value=self.listener.reconnects,
        )


def error_kind(error: PlanningError) -> str:
    """A short label for a planning error: its own `kind` when it has one, else its class."""
    kind = getattr(error, "kind", None)
    if isinstance(kind, str) and kind:
        return kind
    return "permanent" if isinstance(error, PermanentError) else "transient"


# -- read at scrape time ----------------------------------------------------------------------


async def scrape(metrics: WorkerMetrics, pool: AsyncConnectionPool) -> bytes:
    """The text exposition, after reading queue depth and age from the database."""
    try:
        with anyio.fail_after(HEALTH_TIMEOUT_SECONDS):
            async with pool.connection(timeout=HEALTH_TIMEOUT_SECONDS) as conn:
                row = await (await conn.execute(checks.QUEUE_STATS)).fetchone()
        depth, age = (row[0], row[1]) if row else (0, None)
        metrics.queue_depth.set(depth)
        metrics.oldest_pending_age.set(age or 0.0)
    except (psycopg.Error, TimeoutError) as exc:
        # Stale numbers would look healthy; NaN says "unknown" to Prometheus.
        log.warning("metrics: cannot read the queue (%s)", type(exc).__name__)
        metrics.queue_depth.set(math.nan)
        metrics.oldest_pending_age.set(math.nan)
    return generate_latest(metrics.registry)


async def health(listener: ListenerState, pool: AsyncConnectionPool) -> tuple[bool, str]:
    """Healthy while LISTEN is connected and the database answers a trivial query."""
    if not listener.connected:
        return False, "LISTEN connection is down"
    try:
        with anyio.fail_after(HEALTH_TIMEOUT_SECONDS):
            async with pool.connection(timeout=HEALTH_TIMEOUT_SECONDS) as conn:
                await conn.execute(checks.HEALTH_CHECK)
    except (psycopg.Error, TimeoutError) as exc:
        return False, f"database does not answer ({type(exc).__name__})"
    return True, "ok"


MAX_MODEL_LABELS = 16  # model names /metrics counts tokens under; the rest count as "other"


class TokenCounters:
    """Tokens the provider reported, by kind and model, on /metrics."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._tokens = Counter(
            "planbus_llm_tokens",
            "Tokens the provider reported (`usage`), by kind (prompt, completion) and model.",
            ["kind", "model"],
            registry=registry,
        )
        self._by_model: dict[str, tuple[Counter, Counter]] = {}

    def count(self, cost: Cost) -> None:
        """Add one answer's tokens."""
        model = cost.model or "unknown"
        counters = self._by_model.get(model)
        if counters is None:
            # The model name is the provider's word: a server naming a new model in every
            # answer must not grow /metrics without end. Past MAX_MODEL_LABELS names, the
            # rest count as "other" (and the cache, which saves `labels()` on every answer,
            # stops growing with them).
            if len(self._by_model) >= MAX_MODEL_LABELS:
                model = "other"
            counters = self._by_model[model] = (
                self._tokens.labels(kind="prompt", model=model),
                self._tokens.labels(kind="completion", model=model),
            )
        if cost.prompt_tokens:
            counters[0].inc(cost.prompt_tokens)
        if cost.completion_tokens:
            counters[1].inc(cost.completion_tokens)


class PaceCollector(Collector):
    def __init__(self, pace: Pace) -> None:
        self.pace = pace

    def collect(self) -> Iterator[Metric]:
        yield GaugeMetricFamily(
            "planbus_llm_concurrency_limit",
            "The adaptive limit on this worker's LLM calls in flight.",
            value=self.pace.current_limit,
        )
        yield CounterMetricFamily(
            "planbus_llm_throttled_calls",
            "LLM calls the provider throttled (HTTP 429 rate limit, 503 overloaded).",
            value=self.pace.throttled_calls,
        )
        yield CounterMetricFamily(
            "planbus_llm_paused_seconds",
            "Seconds this worker held new LLM calls back for a provider's pause.",
            value=self.pace.paused_seconds,
        )
