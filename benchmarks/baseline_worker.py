"""What planbus replaces: a loop that polls every 3 s and processes one request at a time.

It selects the oldest pending row, marks it `processing`, asks the LLM (the same openai SDK and
prompt as planbus), validates the plan, and writes the effects in one transaction. It is kind
to itself in one way: after finishing a request it polls again at once, and sleeps the 3 s only
when it found nothing pending.

    python -m benchmarks.baseline_worker --database-url URL [--poll-seconds 3]

OPENAI_BASE_URL and OPENAI_API_KEY are read by the SDK. SIGTERM stops it after the current
request.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
from typing import Any

import psycopg
from openai import OpenAI
from psycopg.types.json import Jsonb

from planbus.llm.plan import Lead, LeadId, Plan, validate_plan
from planbus.llm.prompt import load_prompt, user_message
from planbus.llm.schema import plan_json_schema

READY_LINE = "baseline worker polling"
SCHEMA_FORMAT: Any = {"name": "engagement_plan", "strict": True, "schema": plan_json_schema()}

TAKE_OLDEST = """
SELECT r.id, r.lead_id, r.telegram_id, l.prospect_name, l.prospect_title, l.prospect_company,
       l.prospect_analysis, l.closing_strategy, l.original_context, l.web_research
  FROM plan_requests AS r JOIN lead_registry AS l ON l.id = r.lead_id
 WHERE r.status = 'pending'
 ORDER BY r.created_at, r.id
 LIMIT 1
   FOR UPDATE OF r
"""

MARK_PROCESSING = """
UPDATE plan_requests SET status = 'processing', attempts = attempts + 1, claimed_at = now(),
       updated_at = now()
 WHERE id = %s
"""


def process_one(conn: psycopg.Connection[Any], client: OpenAI, model: str, system: str) -> bool:
    """Take the oldest pending request and finish it; False when there was none."""
    with conn.transaction():
        row = conn.execute(TAKE_OLDEST).fetchone()
        if row is None:
            return False
        request_id, lead_id, telegram_id, *fields = row
        conn.execute(MARK_PROCESSING, (request_id,))
    lead = Lead(LeadId(lead_id), telegram_id, *fields)
    completion = client.chat.completions.create(
        model=model,
        messages=[
            {"role": "system", "content": system},
            {"role": "user", "content": user_message(lead)},
        ],
        response_format={
            "type": "json_schema",
            "json_schema": {
                "name": "engagement_plan",
                "strict": True,
                "schema": plan_json_schema(),
            },
        },
    )
    plan = validate_plan(json.loads(completion.choices[0].message.content or ""))
    write_effects(conn, request_id, lead_id, telegram_id, plan)
    return True


def write_effects(
    conn: psycopg.Connection[Any], request_id: int, lead_id: int, telegram_id: int, plan: Plan
) -> None:
    """The contract's four effects, statement by statement, in one transaction."""
    steps = plan.as_json()
    with conn.transaction():
        conn.execute(
            "UPDATE lead_registry SET engagement_plan = %s, next_followup = now() + "
            "make_interval(days => %s), updated_at = now() WHERE id = %s",
            (Jsonb(steps), min(s.delay_days for s in plan.steps), lead_id),
        )
        conn.execute(
            "UPDATE scheduled_reminders SET status = 'cancelled', updated_at = now() "
            "WHERE lead_id = %s AND status IN ('pending', 'sent')",
            (lead_id,),
        )
        with conn.cursor() as cursor:
            cursor.executemany(
                "INSERT INTO scheduled_reminders (lead_id, telegram_id, step_id, due_at, status, "
                "draft_text) VALUES (%s, %s, %s, now() + make_interval(days => %s), 'pending', %s)",
                [(lead_id, telegram_id, s.step_id, s.delay_days, s.draft_text) for s in plan.steps],
            )
        conn.execute(
            "UPDATE plan_requests SET status = 'completed', result = %s, finished_at = now(), "
            "updated_at = now() WHERE id = %s",
            (Jsonb({"plan": steps, "step_count": len(steps)}), request_id),
        )
        conn.execute(
            "SELECT pg_notify('plan_request_events', %s)",
            (
                json.dumps(
                    {
                        "id": request_id,
                        "lead_id": lead_id,
                        "telegram_id": telegram_id,
                        "status": "completed",
                    }
                ),
            ),
        )


def main() -> int:
    parser = argparse.ArgumentParser(description="The poll-every-3-s baseline worker.")
    parser.add_argument("--database-url", required=True)
    parser.add_argument("--poll-seconds", type=float, default=3.0)
    parser.add_argument("--model", default="gpt-4o-mini")
    args = parser.parse_args()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    client = OpenAI(max_retries=0)
    system = load_prompt()
    with psycopg.connect(args.database_url, autocommit=True, application_name="baseline") as conn:
        print(READY_LINE, file=sys.stderr, flush=True)
        while not stop.is_set():
            if not process_one(conn, client, args.model, system):
                stop.wait(args.poll_seconds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
