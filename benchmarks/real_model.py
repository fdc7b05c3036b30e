"""The real-model workload: a small self-hosted model answers real requests end to end.

`llama-server` (2 slots) serving SmolLM2-135M-Instruct (see `benchmarks/llama.py`; built once
into a cache, about 15 minutes on 2 cores) behind a real `python -m planbus.listen` worker with
its default concurrency and `PLANBUS_LLM_TIMEOUT_SECONDS=240`. Six requests are inserted at
once, as six users would; the benchmark then reads the rows as the Mini App would (every
250 ms) until each request is completed or failed, and reports: how many completed, tokens and
seconds per plan, the time from the insert until the first step was readable (the `progress`
column while `processing`, `result.plan` once completed), the reminders written, how many
calls the server held queued at once (its `/metrics`), and every failed attempt with its error
(timeouts among them). Nothing here is faked: the plans are the model's.
"""

from __future__ import annotations

import re
import time
from collections import Counter
from typing import Any

import psycopg

from benchmarks.harness import percentiles, seed
from benchmarks.llama import LlamaServer, build, cached
from benchmarks.workloads import Bench

REQUESTS = 6
TIMEOUT_SECONDS = 240
POLL_SECONDS = 0.25
# Three attempts of up to 240 s each, queued two at a time behind each other: a bound, not a goal.
DEADLINE_SECONDS = 1500

READ = """
SELECT id, status, attempts, result,
       coalesce(jsonb_array_length(progress -> 'steps'), 0) AS progress_steps,
       extract(epoch FROM claimed_at)::float8 AS claimed,
       extract(epoch FROM finished_at)::float8 AS finished
  FROM plan_requests ORDER BY id
"""
ATTEMPT = re.compile(r"request (\d+) lead \d+ attempt (\d+) (failed, retrying.*|failed for good.*)")


def real_model(bench: Bench, requests: int = REQUESTS) -> dict[str, Any]:
    llama = cached()
    if llama is None:
        with (bench.logs / "llama_build.log").open("w") as log:
            llama = build(log)
    _, dsn = bench.database("real_model")
    seed(dsn, requests, pending=False, old_reminders=False)
    with LlamaServer(llama, bench.logs / "llama_server.log") as server:
        env = {"PLANBUS_LLM_TIMEOUT_SECONDS": str(TIMEOUT_SECONDS)}
        worker = bench.planbus(dsn, "real_model", "openai", llm=server, env=env)  # type: ignore[arg-type]
        try:
            seen = watch(dsn, server, requests)
        finally:
            worker.stop()
    worker_log = (bench.logs / "real_model.log").read_text(errors="replace")
    return summary(dsn, seen, worker_log, requests)


def watch(dsn: str, server: LlamaServer, requests: int) -> dict[str, Any]:
    """Insert the requests at once, then read them as the Mini App does until they all end."""
    first_step: dict[int, float] = {}
    queued: list[float] = []
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO plan_requests (lead_id, telegram_id) "
            "SELECT id, telegram_id FROM lead_registry ORDER BY id"
        )
        inserted = time.time()
        while time.time() - inserted < DEADLINE_SECONDS:
            rows = conn.execute(READ).fetchall()
            now = time.time()
            for request_id, status, _, result, progress_steps, _, _ in rows:
                plan = (result or {}).get("plan") if status == "completed" else None
                if request_id not in first_step and (progress_steps or plan):
                    first_step[request_id] = now - inserted
            deferred = server.metric("requests_deferred")
            if deferred is not None:
                queued.append(deferred)
            if all(row[1] in ("completed", "failed") for row in rows):
                break
            time.sleep(POLL_SECONDS)
    return {"inserted": inserted, "first_step": first_step, "queued": queued, "rows": rows}


def summary(dsn: str, seen: dict[str, Any], log: str, requests: int) -> dict[str, Any]:
    inserted = seen["inserted"]
    per_request = []
    for request_id, status, attempts, result, _, claimed, finished in seen["rows"]:
        usage = (result or {}).get("usage") or {}
        per_request.append(
            {
                "id": request_id,
                "status": status,
                "attempts": attempts,
                "steps": (result or {}).get("step_count"),
                "completion_tokens": usage.get("completion_tokens"),
                "prompt_tokens": usage.get("prompt_tokens"),
                "model_seconds": (result or {}).get("model_seconds"),
                "insert_to_finish_seconds": round(finished - inserted, 1) if finished else None,
                "last_claim_to_finish_seconds": (
                    round(finished - claimed, 1) if finished and claimed else None
                ),
                "first_step_seconds": _round(seen["first_step"].get(request_id)),
                "error": (result or {}).get("error"),
            }
        )
    failures = [
        {"request": int(m[0]), "attempt": int(m[1]), "outcome": m[2][:300]}
        for m in ATTEMPT.findall(log)
    ]
    completed = [r for r in per_request if r["status"] == "completed"]
    with psycopg.connect(dsn, autocommit=True) as conn:
        reminders = conn.execute("SELECT count(*) FROM scheduled_reminders").fetchone()
    return {
        "requests": requests,
        "completed": len(completed),
        "failed": sum(1 for r in per_request if r["status"] == "failed"),
        "unfinished": sum(1 for r in per_request if r["status"] not in ("completed", "failed")),
        "timeout_seconds": TIMEOUT_SECONDS,
        "first_step_seconds": _spread(list(seen["first_step"].values())),
        # The first step any user saw: the two slots' first answers, not queued behind others.
        "earliest_first_step_seconds": _round(min(seen["first_step"].values(), default=None)),
        "completion_tokens_per_plan": _spread(
            [r["completion_tokens"] for r in completed if r["completion_tokens"] is not None]
        ),
        "model_seconds_per_plan": _spread(
            [r["model_seconds"] for r in completed if r["model_seconds"] is not None]
        ),
        "insert_to_finish_seconds": _spread(
            [r["insert_to_finish_seconds"] for r in per_request if r["insert_to_finish_seconds"]]
        ),
        "failed_attempts": len(failures),
        "timeouts": sum(1 for f in failures if "timed out" in f["outcome"]),
        "failed_attempts_by_kind": dict(Counter(_kind(f["outcome"]) for f in failures)),
        "max_calls_queued_at_server": max(seen["queued"], default=None),
        "reminders_written": int(reminders[0]) if reminders else 0,
        "by_request": per_request,
        "failed_attempt_log": failures,
    }


def _kind(outcome: str) -> str:
    for fragment, kind in (
        ("timed out", "timeout"),
        ("output was invalid", "invalid output"),
        ("connect", "connection"),
        ("broke off", "connection"),
    ):
        if fragment in outcome:
            return kind
    return "other"


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 2)


def _spread(values: list[float]) -> dict[str, float] | None:
    return percentiles(values) if values else None
