"""A provider with limits, for the benchmarks: `python -m tests.llm_server` in a process of its own.

The tests' fake LLM enforces what real providers enforce (an account's rate limit, a box's
slots) and streams at a set pace; the benchmark starts one per scenario with the flags it
needs and reads its counts (`GET /stats`) and its calls (`GET /calls`: arrival, status, when
each plan step was written, when the answer ended).
"""

from __future__ import annotations

import time
from typing import Any

import psycopg

from benchmarks.harness import BenchError, LLMServer, wait_finished


class FakeProvider(LLMServer):
    """`python -m tests.llm_server FLAGS`; the same base URL and stop as the bench server."""

    def __init__(self, *flags: str) -> None:
        super().__init__("tests.llm_server", *flags)

    def stats(self) -> dict[str, int]:
        """accepted, refused (= rate_limited + busy), quota, max_in_flight, ..."""
        return dict(self._request("/stats"))

    def calls_made(self) -> list[dict[str, Any]]:
        return list(self._request("/calls")["calls"])


def insert_all(dsn: str) -> float:
    """One pending request per lead, in one statement; its commit time (`time.time()`)."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO plan_requests (lead_id, telegram_id) "
            "SELECT id, telegram_id FROM lead_registry ORDER BY id"
        )
        return time.time()


def outcome(dsn: str) -> dict[str, Any]:
    """Requests by status, the last finish (epoch seconds) and the claims made."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        rows = conn.execute("SELECT status, count(*) FROM plan_requests GROUP BY status").fetchall()
        row = conn.execute(
            "SELECT extract(epoch FROM max(finished_at))::float8, coalesce(sum(attempts), 0) "
            "FROM plan_requests"
        ).fetchone()
    assert row is not None
    by_status = {str(status): int(count) for status, count in rows}
    return {"by_status": by_status, "last_finish": row[0], "claims": int(row[1])}


def settle(dsn: str, count: int, within: float) -> bool:
    """Wait until `count` requests are completed or failed; False at the deadline (no raise:
    a request the worker never finishes is a result to report, not a broken benchmark)."""
    try:
        wait_finished(dsn, count, within)
    except BenchError:
        return False
    return True
