"""The workloads: W1 pickup latency, W2 drain, W3 slow model, W4 fan-out, idle, recovery.

Each takes the run's `Bench` and returns a dict of plain numbers for the JSON file. Times from
the database (claimed_at, finished_at) and from this process (time.time()) share the machine's
clock, since PostgreSQL, the LLM server and the driver all run here.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg

from benchmarks.harness import (
    BenchError,
    ConnectionSampler,
    EventCounter,
    LLMServer,
    Postgres,
    WorkerProcess,
    drain_window,
    percentiles,
    reset_statements,
    seed,
    statements_sent,
    verify_effects,
    wait_finished,
    wait_until,
)


@dataclass(frozen=True)
class Sizes:
    w1_requests: int = 100
    w1_rate: float = 10.0
    w1_warmup: int = 3
    baseline_w1_requests: int = 20
    w2_requests: int = 5_000
    w3_requests: int = 200
    w3_delay: float = 0.5
    w3_concurrency: int = 32
    w4_requests: int = 2_000
    w4_delay: float = 2.0
    w4_concurrency: int = 256
    idle_seconds: float = 60.0
    # Recovery runs with the worker's defaults; quick mode shortens lease and sweep.
    recovery_flags: tuple[str, ...] = ()
    recovery_hold: float = 20.0  # the live worker's model call: longer than two leases
    # Provider limits: a rate limit (requests/s, burst) and a slot limit (slots, call seconds).
    limits_requests: int = 300
    limits_rate: float = 20.0
    limits_burst: int = 20
    limits_slot_requests: int = 100
    limits_slots: int = 4
    limits_slot_delay: float = 0.2
    # Time to first step: requests one after another, each an 8-step plan at this pace.
    first_step_requests: int = 3
    first_step_tokens_per_second: float = 50.0
    # The fleet: W1's stream against 1, 8 and 32 workers; fairness: 20 + 3 requests.
    fleet_sizes: tuple[int, ...] = (1, 8, 32)
    fleet_requests: int = 100
    fleet_rate: float = 10.0
    fairness_batch: int = 20
    fairness_delay: float = 0.5


FULL = Sizes()
QUICK = Sizes(
    w1_requests=10,
    w1_rate=20.0,
    w1_warmup=1,
    baseline_w1_requests=3,
    w2_requests=300,
    w3_requests=32,
    w3_delay=0.2,
    w3_concurrency=16,
    w4_requests=256,
    w4_delay=0.5,
    w4_concurrency=128,
    idle_seconds=3.0,
    recovery_flags=("--lease-seconds", "1.5", "--sweep-seconds", "0.5"),
    recovery_hold=4.0,
    limits_requests=60,
    limits_slot_requests=20,
    first_step_requests=1,
    first_step_tokens_per_second=200.0,
    fleet_sizes=(1, 8),
    fleet_requests=30,
    fleet_rate=20.0,
)


class Bench:
    """The run's shared pieces: sizes, the PostgreSQL server, the LLM server, the log folder."""

    def __init__(
        self, sizes: Sizes, pg: Postgres, llm: LLMServer, logs: Path, profile: bool = False
    ) -> None:
        self.sizes = sizes
        self.profile = profile  # sample every planbus worker with py-spy, into the log folder
        self.source: Path | None = None  # run planbus from this checkout instead (compare.py)
        self.pg = pg
        self.llm = llm
        self.logs = logs
        self._databases = 0

    def database(self, label: str) -> tuple[str, str]:
        self._databases += 1
        name = f"bench_{self._databases:02d}_{label}"
        return name, self.pg.database(name, self.source)

    def planbus(
        self,
        dsn: str,
        label: str,
        planner: str = "openai",
        *flags: str,
        llm: LLMServer | None = None,
        env: dict[str, str] | None = None,
    ) -> WorkerProcess:
        """A ready worker; `llm` instead of the run's server, `env` added to its environment."""
        log = self.logs / f"{label}.log"
        worker = WorkerProcess.planbus(
            dsn, llm or self.llm, log, planner, *flags, source=self.source, env=env
        )
        worker.wait_ready()
        if self.profile:
            worker.profile(self.logs / f"{label}.pyspy.txt")
        return worker

    def baseline(self, dsn: str, label: str) -> WorkerProcess:
        worker = WorkerProcess.baseline(dsn, self.llm, self.logs / f"{label}.log")
        worker.wait_ready()
        return worker


# -- W1 ------------------------------------------------------------------------------------


def pickup_latency(bench: Bench, *, baseline: bool = False) -> dict[str, Any]:
    """Requests inserted one at a time at a steady rate: commit -> LLM call, commit -> claim."""
    result, _ = timed_pickups(bench, baseline=baseline)
    return result


def timed_pickups(
    bench: Bench, *, baseline: bool = False, env: dict[str, str] | None = None
) -> tuple[dict[str, Any], dict[int, float]]:
    """W1's figures, and each measured request's commit time by request id (`env`: the
    worker's extra environment, e.g. a traces endpoint)."""
    sizes = bench.sizes
    count = sizes.baseline_w1_requests if baseline else sizes.w1_requests
    warmup = 1 if baseline else sizes.w1_warmup
    label = "w1_baseline" if baseline else "w1_traced" if env else "w1_planbus"
    _, dsn = bench.database(label)
    leads = seed(dsn, warmup + count, pending=False)
    bench.llm.configure(delay=0.0)
    worker = bench.baseline(dsn, label) if baseline else bench.planbus(dsn, label, env=env)
    committed: dict[int, tuple[int, float]] = {}  # key -> (request id, commit time)
    try:
        with psycopg.connect(dsn, autocommit=True) as conn:
            # Warm-up requests (not measured): the first call opens the LLM connection.
            for key in range(1, warmup + 1):
                _insert(conn, leads, key)
                wait_finished(dsn, key, 30)
            start = time.monotonic()
            for index, key in enumerate(range(warmup + 1, warmup + count + 1)):
                pause = start + index / sizes.w1_rate - time.monotonic()
                if pause > 0:
                    time.sleep(pause)
                committed[key] = _insert(conn, leads, key)
        wait_finished(dsn, warmup + count, 60)
        arrivals = bench.llm.first_arrivals()
        with psycopg.connect(dsn, autocommit=True) as conn:
            claimed: dict[int, float] = dict(
                conn.execute(
                    "SELECT id, extract(epoch FROM claimed_at)::float8 FROM plan_requests"
                ).fetchall()
            )
    finally:
        worker.stop()
    to_llm = [(arrivals[key] - at) * 1000 for key, (_, at) in committed.items()]
    to_claim = [(claimed[rid] - at) * 1000 for rid, at in committed.values()]
    result = {
        "requests": count,
        "rate_per_second": sizes.w1_rate,
        "warmup_requests": warmup,
        "to_llm_ms": percentiles(to_llm),
        "to_claim_ms": percentiles(to_claim),
        "samples_to_llm_ms": [round(x, 3) for x in to_llm],
        "samples_to_claim_ms": [round(x, 3) for x in to_claim],
    }
    return result, dict(committed.values())


def _insert(conn: psycopg.Connection[Any], leads: dict[int, int], key: int) -> tuple[int, float]:
    # Autocommit: the INSERT's answer arrives after its commit, so this is the client's
    # moment of commit.
    row = conn.execute(
        "INSERT INTO plan_requests (lead_id, telegram_id) VALUES (%s, %s) RETURNING id",
        (leads[key], key),
    ).fetchone()
    committed_at = time.time()
    assert row is not None
    return int(row[0]), committed_at


# -- W2, W3, W4 ----------------------------------------------------------------------------


def drain(bench: Bench, planner: str) -> dict[str, Any]:
    """W2: a backlog present when the worker starts; requests/s until all are completed."""
    count = bench.sizes.w2_requests
    label = f"w2_{planner}"
    dbname, dsn = bench.database(label)
    seed(dsn, count, pending=True)
    bench.llm.configure(delay=0.0)
    with EventCounter(dsn) as events:
        reset_statements(bench.pg.admin)
        worker = bench.planbus(dsn, label, planner)
        try:
            cpu_before, pg_before = worker.cpu_seconds(), bench.pg.cpu_seconds()
            wait_finished(dsn, count, 300)
            cpu = worker.cpu_seconds() - cpu_before
            pg_cpu = bench.pg.cpu_seconds() - pg_before
        finally:
            worker.stop()
        wait_until(lambda: events.count >= count, 10, "every plan_request_events notification")
    first_claim, last_finish = drain_window(dsn)
    seconds = last_finish - first_claim
    statements = statements_sent(bench.pg.admin, dbname)
    return {
        "requests": count,
        "planner": planner,
        "seconds": seconds,
        "requests_per_second": count / seconds,
        "worker_cpu_ms_per_request": cpu * 1000 / count,
        "postgres_cpu_ms_per_request": pg_cpu * 1000 / count,
        "effects": verify_effects(dsn, count, events.count),
        "statements_per_request": {
            s["kind"]: round(s["calls"] / count, 3) for s in statements if s["kind"] != "other"
        },
        "statement_mean_ms": {s["kind"]: s["mean_ms"] for s in statements if s["kind"] != "other"},
    }


def slow_model(bench: Bench, *, fan_out: bool = False, baseline: bool = False) -> dict[str, Any]:
    """W3 (0.5 s answers, concurrency 32) or W4 (2 s answers, concurrency 256)."""
    sizes = bench.sizes
    count = sizes.w4_requests if fan_out else sizes.w3_requests
    delay = sizes.w4_delay if fan_out else sizes.w3_delay
    concurrency = sizes.w4_concurrency if fan_out else sizes.w3_concurrency
    label = ("w4" if fan_out else "w3") + ("_baseline" if baseline else "_planbus")
    dbname, dsn = bench.database(label)
    seed(dsn, count, pending=True)
    bench.llm.configure(delay=delay)
    result: dict[str, Any] = {"requests": count, "answer_delay": delay}
    if baseline:
        worker = bench.baseline(dsn, label)
        result["concurrency"] = 1
        result["ideal_seconds"] = count * delay
    else:
        worker = bench.planbus(dsn, label, "openai", "--concurrency", str(concurrency))
        result["concurrency"] = concurrency
        result["ideal_seconds"] = math.ceil(count / concurrency) * delay
    try:
        with ConnectionSampler(bench.pg.admin, dbname) as connections:
            wait_finished(dsn, count, result["ideal_seconds"] * 3 + 60)
        result["peak_rss_mb"] = worker.peak_rss_mb()
    finally:
        worker.stop()
    first_claim, last_finish = drain_window(dsn)
    result["seconds"] = last_finish - first_claim
    result["ratio_to_ideal"] = result["seconds"] / result["ideal_seconds"]
    result["max_connections_open"] = connections.max_open
    result["max_connections_busy"] = connections.max_busy
    result["effects"] = verify_effects(dsn, count, None)
    return result


# -- idle ----------------------------------------------------------------------------------

# What one sweep does: the sweep statement (which also renews the worker's row in
# planbus_workers), then the claim it wakes, only when a request is due ("next due": the
# separate statement that code before the claim learned the next retry's due time sent).
SWEEP_CYCLE = ("sweep", "claim", "next due")


def idle(bench: Bench) -> dict[str, Any]:
    """A worker with nothing to do: its CPU seconds and the statements it sends."""
    seconds = bench.sizes.idle_seconds
    dbname, dsn = bench.database("idle")
    bench.llm.configure(delay=0.0)
    worker = bench.planbus(dsn, "idle")
    try:
        # Let start-up settle (the first sweep and claim run right after "listening").
        time.sleep(1.0)
        reset_statements(bench.pg.admin)
        cpu_before = worker.cpu_seconds()
        time.sleep(seconds)
        cpu = worker.cpu_seconds() - cpu_before
        statements = statements_sent(bench.pg.admin, dbname)
    finally:
        worker.stop()
    total = sum(s["calls"] for s in statements)
    return {
        "seconds": seconds,
        "cpu_seconds": cpu,
        "cpu_seconds_per_minute": cpu * 60 / seconds,
        "statements": total,
        "statements_per_minute": total * 60 / seconds,
        "statements_not_from_sweep": sum(
            s["calls"] for s in statements if s["kind"] not in SWEEP_CYCLE
        ),
        "by_statement": statements,
    }


# -- recovery ------------------------------------------------------------------------------


def recovery(bench: Bench) -> dict[str, Any]:
    """Two workers hold requests mid-call; SIGKILL one and time the other's takeover.

    The model holds every first call for longer than two leases, so the survivor's own
    requests check that a live worker's claim is never taken over.
    """
    sizes = bench.sizes
    _, dsn = bench.database("recovery")
    leads = seed(dsn, 20, pending=False)
    bench.llm.configure(delay=0.0, first_delay=sizes.recovery_hold)
    flags = sizes.recovery_flags
    workers = [bench.planbus(dsn, f"recovery_{n}", "openai", *flags) for n in ("a", "b")]
    try:
        holders = _spread_claims(bench, dsn, leads, workers)
        victim, survivor = workers
        doomed = holders[victim.pid]
        killed_at = time.time()
        victim.kill()
        # Each of the victim's requests, claimed again by the survivor (attempt 2).
        reclaimed = wait_until(
            lambda: _reclaimed(dsn, doomed, survivor.pid), 60, "the survivor to claim again"
        )
        total = sum(len(ids) for ids in holders.values())
        wait_finished(dsn, total, sizes.recovery_hold + 60)
        with psycopg.connect(dsn, autocommit=True) as conn:
            rows = conn.execute(
                "SELECT id, status, attempts FROM plan_requests ORDER BY id"
            ).fetchall()
    finally:
        for worker in workers:
            if worker.process.poll() is None:
                worker.stop()
    outcome = {rid: (status, attempts) for rid, status, attempts in rows}
    live = holders[survivor.pid]
    false_takeovers = [rid for rid in live if outcome[rid] != ("completed", 1)]
    not_recovered = [rid for rid in doomed if outcome[rid] != ("completed", 2)]
    if not_recovered:
        raise BenchError(f"killed worker's requests did not complete on attempt 2: {outcome}")
    seconds = [claimed - killed_at for claimed in reclaimed.values()]
    return {
        "settings": "defaults" if not flags else " ".join(flags),
        "killed_worker_requests": len(doomed),
        "live_worker_requests": len(live),
        "live_call_seconds": sizes.recovery_hold,
        "reclaimed_after_seconds": {"max": max(seconds), "min": min(seconds)},
        "false_takeovers": len(false_takeovers),
    }


def _spread_claims(
    bench: Bench, dsn: str, leads: dict[int, int], workers: list[WorkerProcess]
) -> dict[int, list[int]]:
    """Insert requests one at a time until each worker holds at least one mid-call."""
    holders: dict[int, list[int]] = {w.pid: [] for w in workers}
    with psycopg.connect(dsn, autocommit=True) as conn:
        for key in sorted(leads):
            request_id, _ = _insert(conn, leads, key)
            wait_until(_called(bench.llm, key), 30, "the model call")
            row = conn.execute(
                "SELECT worker_id FROM plan_requests WHERE id = %s", (request_id,)
            ).fetchone()
            assert row is not None
            pid = int(str(row[0]).rsplit(":", 1)[1])
            holders[pid].append(request_id)
            if all(len(ids) > 0 for ids in holders.values()):
                return holders
    raise BenchError(f"one worker claimed all {len(leads)} requests; cannot test a takeover")


def _called(llm: LLMServer, key: int) -> Callable[[], bool]:
    return lambda: key in llm.first_arrivals()


def _reclaimed(dsn: str, ids: list[int], survivor: int) -> dict[int, float] | None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT id, extract(epoch FROM claimed_at)::float8 FROM plan_requests "
            "WHERE id = ANY(%s) AND attempts >= 2 AND (status = 'completed' OR worker_id LIKE %s)",
            (ids, f"%:{survivor}"),
        ).fetchall()
    if len(rows) < len(ids):
        return None
    return {int(rid): float(at) for rid, at in rows}
