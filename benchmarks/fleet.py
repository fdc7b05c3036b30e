"""The fleet and fairness workloads: many workers on one database, many users in one queue.

- `fleet`: 1, 8 and 32 workers (`fleet_sizes`) started and settled, then `fleet_requests`
  requests inserted one at a time at `fleet_rate`: claim statements and all statements per
  request (pg_stat_statements), and pickup (insert commit -> claim, -> LLM call) p50/p99. The
  target (CONTRACT.md): with 8 workers at most 1.5 claim statements per request, pickup p99 no
  worse than one worker's in the same run.
- `fairness`: one worker with 2 calls at once and 0.5 s answers; one user's 20 requests, then
  three other users' one each. The target: each of the three completes within 2.5 s of its
  insert (oldest first, the order before fair turns, took 5.5-6 s).
"""

from __future__ import annotations

import time
from typing import Any

import psycopg

from benchmarks.harness import (
    BenchError,
    WorkerProcess,
    percentiles,
    reset_statements,
    seed,
    statements_sent,
    wait_finished,
    wait_until,
)
from benchmarks.workloads import Bench, _insert

START_BATCH = 4


def fleet(bench: Bench) -> dict[str, Any]:
    """Each fleet size in turn, on a database of its own."""
    return {f"workers_{n}": _fleet_run(bench, n) for n in bench.sizes.fleet_sizes}


def _fleet_run(bench: Bench, workers: int) -> dict[str, Any]:
    sizes = bench.sizes
    count = sizes.fleet_requests
    dbname, dsn = bench.database(f"fleet_{workers}")
    # One warm-up request per worker: each opens its LLM connection before the measured ones
    # (consecutive ids go to consecutive workers).
    warmup = workers
    leads = seed(dsn, warmup + count, pending=False)
    bench.llm.configure(delay=0.0)
    # Small pools: 32 workers must fit the server's connections (and a 2-core machine).
    flags = ("--pool-size", "2")
    procs: list[WorkerProcess] = []
    committed: dict[int, tuple[int, float]] = {}
    try:
        # A few at a time: 32 interpreters starting at once on 2 cores take minutes.
        for first in range(0, workers, START_BATCH):
            batch = [
                WorkerProcess.planbus(
                    dsn,
                    bench.llm,
                    bench.logs / f"fleet_{workers}_{n}.log",
                    "openai",
                    *flags,
                    source=bench.source,
                )
                for n in range(first, min(first + START_BATCH, workers))
            ]
            procs += batch
            for proc in batch:
                proc.wait_ready(300)
        _settle(dsn, workers)
        with psycopg.connect(dsn, autocommit=True) as conn:
            for key in range(1, warmup + 1):
                _insert(conn, leads, key)
                wait_finished(dsn, key, 30)
        reset_statements(bench.pg.admin)
        with psycopg.connect(dsn, autocommit=True) as conn:
            start = time.monotonic()
            for index, key in enumerate(range(warmup + 1, warmup + count + 1)):
                pause = start + index / sizes.fleet_rate - time.monotonic()
                if pause > 0:
                    time.sleep(pause)
                committed[key] = _insert(conn, leads, key)
        wait_finished(dsn, warmup + count, 60)
        statements = statements_sent(bench.pg.admin, dbname)
        arrivals = bench.llm.first_arrivals()
        with psycopg.connect(dsn, autocommit=True) as conn:
            claimed: dict[int, float] = dict(
                conn.execute(
                    "SELECT id, extract(epoch FROM claimed_at)::float8 FROM plan_requests"
                ).fetchall()
            )
    finally:
        for proc in procs:
            proc.stop()
    claims = sum(s["calls"] for s in statements if s["kind"] == "claim")
    worker_statements = sum(s["calls"] for s in statements if s["kind"] != "other")
    return {
        "workers": workers,
        "requests": count,
        "rate_per_second": sizes.fleet_rate,
        "warmup_requests": warmup,
        "claims_per_request": round(claims / count, 3),
        "statements_per_request": round(worker_statements / count, 3),
        "by_statement": {
            s["kind"]: round(s["calls"] / count, 3) for s in statements if s["kind"] != "other"
        },
        "to_claim_ms": percentiles([(claimed[r] - at) * 1000 for r, at in committed.values()]),
        "to_llm_ms": percentiles([(arrivals[k] - at) * 1000 for k, (_, at) in committed.items()]),
    }


def _settle(dsn: str, workers: int) -> None:
    """Until every worker is in planbus_workers, then a moment for the last join to be heard."""

    def registered() -> bool:
        with psycopg.connect(dsn, autocommit=True) as conn:
            row = conn.execute("SELECT count(*) FROM planbus_workers").fetchone()
        return row is not None and row[0] >= workers

    try:
        wait_until(registered, 20, f"{workers} workers in planbus_workers")
    except (BenchError, psycopg.errors.UndefinedTable):  # code without a fleet: nothing to wait for
        pass
    time.sleep(1.0)


# -- fairness --------------------------------------------------------------------------------

BUSY_USER = 1_000_001
OTHER_USERS = (1_000_002, 1_000_003, 1_000_004)


def fairness(bench: Bench) -> dict[str, Any]:
    """One user's 20 requests, then three others' one each: how long the three waited."""
    sizes = bench.sizes
    _, dsn = bench.database("fairness")
    leads = seed(dsn, sizes.fairness_batch + len(OTHER_USERS), pending=False)
    keys = sorted(leads)
    bench.llm.configure(delay=sizes.fairness_delay)
    worker = bench.planbus(dsn, "fairness", "openai", "--concurrency", "2")
    try:
        with psycopg.connect(dsn, autocommit=True) as conn:
            for key in keys[: sizes.fairness_batch]:
                conn.execute(
                    "INSERT INTO plan_requests (lead_id, telegram_id) VALUES (%s, %s)",
                    (leads[key], BUSY_USER),
                )
            others = [
                int(
                    conn.execute(
                        "INSERT INTO plan_requests (lead_id, telegram_id) VALUES (%s, %s) "
                        "RETURNING id",
                        (leads[key], user),
                    ).fetchone()[0]  # type: ignore[index]
                )
                for key, user in zip(keys[sizes.fairness_batch :], OTHER_USERS, strict=True)
            ]
        total = sizes.fairness_batch + len(OTHER_USERS)
        wait_finished(dsn, total, total * sizes.fairness_delay + 60)
        with psycopg.connect(dsn, autocommit=True) as conn:
            rows = conn.execute(
                "SELECT id, extract(epoch FROM finished_at - created_at)::float8, status "
                "FROM plan_requests WHERE id = ANY(%s) ORDER BY id",
                (others,),
            ).fetchall()
            busy = conn.execute(
                "SELECT max(extract(epoch FROM finished_at - created_at))::float8 "
                "FROM plan_requests WHERE telegram_id = %s",
                (BUSY_USER,),
            ).fetchone()
    finally:
        worker.stop()
    waits = [float(seconds) for _, seconds, _ in rows]
    return {
        "busy_user_requests": sizes.fairness_batch,
        "other_users": len(OTHER_USERS),
        "concurrency": 2,
        "answer_delay": sizes.fairness_delay,
        "others_done_after_seconds": {"max": max(waits), "min": min(waits)},
        "others_completed": sum(1 for *_, status in rows if status == "completed"),
        "busy_user_last_done_after_seconds": float(busy[0]) if busy and busy[0] else None,
    }
