"""Time to first step: how soon the Mini App can read each step while the model writes it.

The benchmark's LLM server streams an eight-step plan at a set pace (50 tokens/s: about 11 s
per plan) and records when each step's text was fully sent. A reader polls each request every
100 ms as the Mini App does (role `authenticated`, the user's JWT claims) and records when each
step first appeared in `progress` and when the request was `completed`. The figures: step k
visible minus step k sent (the last step: completion visible minus answer end), the insert to
the first visible step, and the progress writes per request (pg_stat_statements).
"""

from __future__ import annotations

import json
import time
from typing import Any

import psycopg

from benchmarks.harness import percentiles, reset_statements, seed, statements_sent, wait_until
from benchmarks.workloads import Bench

POLL_SECONDS = 0.1


def time_to_first_step(bench: Bench) -> dict[str, Any]:
    """Requests inserted together, each polled as its user until completed."""
    count, rate = bench.sizes.first_step_requests, bench.sizes.first_step_rate
    dbname, dsn = bench.database("first_step")
    leads = seed(dsn, count, pending=False, old_reminders=False)
    bench.llm.configure(stream_rate=rate)
    reset_statements(bench.pg.admin)
    worker = bench.planbus(dsn, "first_step", "openai")
    try:
        inserted, seen = _insert_and_watch(dsn, leads, within=60 + 3 * 600 / rate)
    finally:
        worker.stop()
    sent = bench.llm.step_times()
    visible_after_sent: list[float] = []
    last_after_end: list[float] = []
    first_after_insert: list[float] = []
    steps = 0
    for key, times in sent.items():
        *step_sent, answer_end = times
        steps = len(step_sent)
        shown = seen[key]
        visible_after_sent += [shown[k] - step_sent[k - 1] for k in range(1, steps) if k in shown]
        last_after_end.append(shown["completed"] - answer_end)
        first = min(when for k, when in shown.items() if k != "completed")
        first_after_insert.append(first - inserted[key])
    writes = next(
        (s["calls"] for s in statements_sent(bench.pg.admin, dbname) if s["kind"] == "progress"), 0
    )
    shown_early = sum(1 for key in seen for k in seen[key] if k != "completed")
    return {
        "requests": count,
        "tokens_per_second": rate,
        "steps": steps,
        "poll_seconds": POLL_SECONDS,
        "step_visible_after_written_s": percentiles(visible_after_sent),
        "last_step_visible_after_answer_end_s": percentiles(last_after_end),
        "insert_to_first_step_s": percentiles(first_after_insert),
        "steps_seen_before_completion": shown_early,
        "progress_writes_per_request": writes / count,
    }


def _insert_and_watch(
    dsn: str, leads: dict[int, int], within: float
) -> tuple[dict[int, float], dict[int, dict[int | str, float]]]:
    """Insert one request per lead, then poll each as its user: when each step was first seen."""
    inserted: dict[int, float] = {}
    ids: dict[int, int] = {}
    with psycopg.connect(dsn, autocommit=True) as conn:
        for key, lead_id in leads.items():
            row = conn.execute(
                "INSERT INTO plan_requests (lead_id, telegram_id) VALUES (%s, %s) RETURNING id",
                (lead_id, key),
            ).fetchone()
            assert row is not None
            inserted[key], ids[key] = time.time(), row[0]
    seen: dict[int, dict[int | str, float]] = {key: {} for key in leads}
    with psycopg.connect(dsn, autocommit=True) as reader:
        reader.execute("SET ROLE authenticated")

        def poll() -> bool:
            for key, request_id in ids.items():
                if "completed" in seen[key]:
                    continue
                claims = json.dumps({"role": "authenticated", "telegram_id": key})
                reader.execute("SELECT set_config('request.jwt.claims', %s, false)", (claims,))
                row = reader.execute(
                    "SELECT status, progress FROM plan_requests WHERE id = %s", (request_id,)
                ).fetchone()
                now = time.time()
                if row is None:
                    continue
                status, progress = row
                for number in range(1, len((progress or {}).get("steps", [])) + 1):
                    seen[key].setdefault(number, now)
                if status in ("completed", "failed"):
                    seen[key]["completed"] = now
            return all("completed" in found for found in seen.values())

        wait_until(poll, within, "every streamed request to complete", every=POLL_SECONDS)
    return inserted, seen
