"""The "time to first step" workload: how soon the Mini App sees a plan the model is still writing.

A model writes an 8-step plan at `first_step_tokens_per_second` (50 tokens/s, four characters a
token: about 12 s), streamed when the worker asks for a stream (`python -m tests.llm_server
--tokens-per-second`). Requests run one after another; for each, the benchmark reads its row as
the Mini App does (role `authenticated` with its `request.jwt.claims`, a poll every 100 ms) and
notes when each step became readable: from `plan_requests.progress` (revision 0006_progress)
while `processing`, from `result.plan` once `completed`. The provider says when the model wrote
the piece that closed each step and when the answer ended, on the same clock.

Progress writes are counted by a trigger the benchmark adds to its own database: an UPDATE that
changes `progress` while the request stays `processing` (the claim, the completion and a give-back
are not progress writes). Without the `progress` column the workload reports "not available".
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import psycopg

from benchmarks.harness import percentiles, seed
from benchmarks.provider import FakeProvider
from benchmarks.workloads import Bench

STEPS = 8
POLL_SECONDS = 0.1

COUNT_PROGRESS_WRITES = """
CREATE TABLE bench_progress_writes (
    request_id bigint NOT NULL,
    written_at timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE FUNCTION bench_count_progress_write() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO bench_progress_writes (request_id) VALUES (NEW.id);
    RETURN NEW;
END
$$;
CREATE TRIGGER bench_count_progress_write AFTER UPDATE OF progress ON plan_requests
    FOR EACH ROW
    WHEN (OLD.progress IS DISTINCT FROM NEW.progress
          AND OLD.status = 'processing' AND NEW.status = 'processing')
    EXECUTE FUNCTION bench_count_progress_write();
"""

ACTIONS = (
    ("linkedin_like", None, 0),
    ("linkedin_comment", None, 2),
    (
        "linkedin_connect",
        "Hi Sam, your talk on platform reliability was sharp.",
        4,
    ),
    ("linkedin_dm", "Thanks for connecting. How is on-call holding up this quarter?", 6),
    ("email_outreach", "A short note with the incident-review template, no pitch.", 9),
    ("followup_message", "Did the review template suit your team?", 13),
    ("mutual_intro", "Ask our shared contact for a two-line introduction.", 18),
    ("meeting_request", "Would 20 minutes next week work to compare notes?", 24),
)


def plan_steps() -> list[dict[str, Any]]:
    """Eight valid steps of about 300 characters: about 600 tokens, 12 s at 50 tokens/s."""
    filler = "Keep it specific to their recent posts about reliability"
    return [
        {
            "step_id": n,
            "action_type": action,
            "description": f"Step {n} of the sequence: {action.replace('_', ' ')}. {filler}.",
            "suggested_text": text,
            "timing": f"Day {delay}",
            "delay_days": delay,
            "status": "pending",
            "completed_at": None,
        }
        for n, (action, text, delay) in enumerate(ACTIONS, start=1)
    ]


def time_to_first_step(bench: Bench) -> dict[str, Any]:
    sizes = bench.sizes
    _, dsn = bench.database("first_step")
    if not _has_progress(dsn):
        return {"available": False, "reason": "no plan_requests.progress (revision 0006_progress)"}
    leads = seed(dsn, sizes.first_step_requests, pending=False)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(COUNT_PROGRESS_WRITES)
    plan_file = bench.logs / "first_step_plan.json"
    plan_file.write_text(json.dumps(plan_steps()))
    pace = f"{sizes.first_step_tokens_per_second:g}"
    provider = FakeProvider("--tokens-per-second", pace, "--steps-file", str(plan_file))
    worker = bench.planbus(dsn, "first_step", llm=provider)
    samples = []
    try:
        for key in sorted(leads):
            samples.append(_one_request(dsn, leads[key], key, provider))
    except psycopg.errors.InsufficientPrivilege as exc:
        return {"available": False, "reason": f"the Mini App cannot read its row: {exc}"}
    finally:
        worker.stop()
        provider.stop()
    writes = _progress_writes(dsn)
    return _summary(samples, writes, sizes.first_step_tokens_per_second, plan_file)


def _has_progress(dsn: str) -> bool:
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute(
            "SELECT 1 FROM information_schema.columns "
            "WHERE table_schema = 'public' AND table_name = 'plan_requests' "
            "AND column_name = 'progress'"
        ).fetchone()
    return row is not None


def _one_request(dsn: str, lead_id: int, key: int, provider: FakeProvider) -> dict[str, Any]:
    """Insert one request, poll it as its Mini App until it ends; when each step was readable."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute(
            "INSERT INTO plan_requests (lead_id, telegram_id) VALUES (%s, %s) RETURNING id",
            (lead_id, key),
        ).fetchone()
        inserted = time.time()
        assert row is not None
        request_id = int(row[0])
        conn.execute("SET ROLE authenticated")
        claims = {"telegram_id": key, "role": "authenticated"}
        conn.execute("SELECT set_config('request.jwt.claims', %s, false)", (json.dumps(claims),))
        readable: list[float] = []
        status = "pending"
        started = time.monotonic()
        for poll in range(1, 10_000):
            found = conn.execute(
                "SELECT status, progress, result FROM plan_requests WHERE id = %s", (request_id,)
            ).fetchone()
            seen = time.time()
            assert found is not None, "the Mini App cannot see its own request"
            status, progress, result = found
            steps = _steps_readable(status, progress, result)
            readable.extend([seen] * (steps - len(readable)))
            if status in ("completed", "failed") or seen - inserted > 120:
                break
            pause = started + poll * POLL_SECONDS - time.monotonic()
            if pause > 0:
                time.sleep(pause)
    call = _answered_call(provider, key)
    return {
        "request_id": request_id,
        "status": status,
        "inserted": inserted,
        "readable": readable,
        "written": call.get("step_times", []),
        "answer_end": call.get("finished"),
        "streamed": call.get("stream"),
    }


def _steps_readable(status: str, progress: Any, result: Any) -> int:
    """Steps the Mini App can show: the plan once completed, else the progress so far."""
    if status == "completed" and isinstance(result, dict):
        return len(result.get("plan") or [])
    if isinstance(progress, dict):
        progress = progress.get("steps", progress.get("plan"))
    return len(progress) if isinstance(progress, list) else 0


def _answered_call(provider: FakeProvider, key: int) -> dict[str, Any]:
    """The last call for this lead that the model answered in full."""
    mark = f"Bench Prospect {key}"
    answered = [
        call
        for call in provider.calls_made()
        if call["status"] == 200 and call["finished"] and mark in call["user"]
    ]
    return answered[-1] if answered else {}


def _progress_writes(dsn: str) -> dict[int, int]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT r.id, count(w.request_id) FROM plan_requests AS r "
            "LEFT JOIN bench_progress_writes AS w ON w.request_id = r.id GROUP BY r.id"
        ).fetchall()
    return {int(rid): int(count) for rid, count in rows}


def _summary(
    samples: list[dict[str, Any]], writes: dict[int, int], pace: float, plan_file: Path
) -> dict[str, Any]:
    step_lag, first_lag, last_lag, first_seen = [], [], [], []
    seen_early = 0
    for sample in samples:
        readable, written, end = sample["readable"], sample["written"], sample["answer_end"]
        if readable:
            first_seen.append(readable[0] - sample["inserted"])
        if readable and written:
            first_lag.append(readable[0] - written[0])
            step_lag += [shown - wrote for shown, wrote in zip(readable, written, strict=False)]
        if end is not None:
            seen_early += sum(1 for shown in readable if shown < end)
        if len(readable) >= STEPS and end is not None:
            last_lag.append(readable[-1] - end)
    return {
        "available": True,
        "requests": len(samples),
        "steps": STEPS,
        "tokens_per_second": pace,
        "poll_seconds": POLL_SECONDS,
        "plan_characters": len(json.dumps({"steps": json.loads(plan_file.read_text())})),
        "completed": sum(1 for s in samples if s["status"] == "completed"),
        "streamed_calls": sum(1 for s in samples if s["streamed"]),
        "first_step_seconds": _spread(first_seen),
        "first_step_lag_seconds": _spread(first_lag),
        "step_lag_seconds": _spread(step_lag),
        "last_step_lag_seconds": _spread(last_lag),
        # Steps the Mini App read before the model's answer had ended: 0 without openai_stream.
        "steps_seen_before_completion": seen_early,
        "progress_writes_per_request": max(writes.values(), default=0),
        "progress_writes_by_request": writes,
        "samples": samples,
    }


def _spread(values: list[float]) -> dict[str, float] | None:
    return percentiles(values) if values else None
