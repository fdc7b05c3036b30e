"""The operator commands' statements (`python -m planbus`): status, show, retry, cancel, purge.

The worker's own statements are in `planbus.bus.queries` (a request's path) and
`planbus.bus.checks` (start-up checks, its /metrics scrape); these are read by people, so none
of them is on the path a request takes.
"""

from typing import LiteralString

# `python -m planbus status`: the shared pause, the requests waiting out throttling, the pace of
# the last minute, and the last hour's plans and tokens by model.
STATUS_PROVIDER: LiteralString = """
SELECT (SELECT greatest(extract(epoch FROM paused_until - now()), 0)::float8
          FROM planbus_provider_limits) AS paused_seconds,
       (SELECT count(*) FROM plan_requests
         WHERE status = 'pending' AND throttled_since IS NOT NULL) AS throttled_waiting,
       (SELECT count(*) FROM plan_requests
         WHERE status IN ('completed', 'failed')
           AND finished_at > now() - interval '1 minute') AS finished_last_minute
"""

# The rounds of refusals that named no wait (the shared backoff), and why each live worker
# (a heartbeat in the last minute) claims nothing now, as it wrote it in `held_back`.
STATUS_HELD_BACK: LiteralString = """
SELECT (SELECT refusals FROM planbus_provider_limits) AS refusals,
       coalesce((SELECT jsonb_agg(jsonb_build_object('worker_id', worker_id,
                                                     'held_back', held_back)
                                  ORDER BY worker_id)
                   FROM planbus_workers
                  WHERE held_back IS NOT NULL
                    AND heartbeat_at > now() - interval '1 minute'), '[]'::jsonb) AS held_back
"""

STATUS_TOKENS_LAST_HOUR: LiteralString = """
SELECT coalesce(result ->> 'model', 'unknown') AS model, count(*) AS plans,
       sum((result -> 'usage' ->> 'prompt_tokens')::bigint)::bigint AS prompt_tokens,
       sum((result -> 'usage' ->> 'completion_tokens')::bigint)::bigint AS completion_tokens
  FROM plan_requests
 WHERE status = 'completed' AND finished_at > now() - interval '1 hour'
 GROUP BY 1
 ORDER BY 1
"""

# -- metrics and operator commands (`python -m planbus`) ---------------------------------------


STATUS_COUNTS: LiteralString = "SELECT status, count(*) FROM plan_requests GROUP BY status"

STATUS_OLDEST_PENDING: LiteralString = """
SELECT id, lead_id, attempts,
       extract(epoch FROM now() - created_at)::float8 AS age_seconds,
       greatest(extract(epoch FROM run_after - now()), 0)::float8 AS due_in_seconds
  FROM plan_requests
 WHERE status = 'pending'
 ORDER BY created_at, id
 LIMIT 1
"""

STATUS_PROCESSING: LiteralString = """
SELECT id, lead_id, attempts, worker_id, lease_expires_at,
       extract(epoch FROM lease_expires_at - now())::float8 AS lease_expires_in_seconds,
       extract(epoch FROM now() - claimed_at)::float8 AS running_seconds
  FROM plan_requests
 WHERE status = 'processing'
 ORDER BY id
 LIMIT %(limit)s
"""

STATUS_RECENT_FAILURES: LiteralString = """
SELECT id, lead_id, attempts, coalesce(finished_at, updated_at) AS failed_at,
       coalesce(result ->> 'error', last_error) AS error
  FROM plan_requests
 WHERE status = 'failed' AND coalesce(finished_at, updated_at) > now() - interval '1 hour'
 ORDER BY failed_at DESC, id DESC
 LIMIT %(limit)s
"""

# Failed requests back to `pending`, due now, attempts reset; the error is kept as a note.
# Only the newest failure of a lead, and only for a lead with no active request, since a lead
# may have one `pending`/`processing` request at a time. The requeue trigger sends NOTIFY.
RETRY_FAILED: LiteralString = """
WITH chosen AS (
    SELECT DISTINCT ON (f.lead_id) f.id
      FROM plan_requests AS f
     WHERE f.status = 'failed'
       AND (%(ids)s::bigint[] IS NULL OR f.id = ANY (%(ids)s::bigint[]))
       AND (%(since_seconds)s::float8 IS NULL
            OR coalesce(f.finished_at, f.updated_at)
               >= now() - make_interval(secs => %(since_seconds)s::float8))
       AND NOT EXISTS (SELECT 1 FROM plan_requests AS a
                        WHERE a.lead_id = f.lead_id AND a.status IN ('pending', 'processing'))
     ORDER BY f.lead_id, f.id DESC
)
UPDATE plan_requests AS r
   SET status = 'pending',
       -- A retried request starts afresh: its attempts, and its throttling patience.
       attempts = 0,
       throttled_claims = 0,
       throttled_since = NULL,
       progress = NULL,
       run_after = now(),
       last_error = coalesce(r.result ->> 'error', r.last_error),
       result = jsonb_build_object('previous_error', coalesce(r.result ->> 'error', r.last_error)),
       claim_token = NULL,
       lease_expires_at = NULL,
       worker_id = NULL,
       finished_at = NULL,
       updated_at = now()
  FROM chosen
 WHERE r.id = chosen.id AND r.status = 'failed'
RETURNING r.id, r.lead_id, r.last_error
"""

REQUEST_STATUSES: LiteralString = (
    "SELECT id, status FROM plan_requests WHERE id = ANY (%(ids)s::bigint[]) ORDER BY id"
)

# A request the way the TMA inserts one; telegram_id defaults to the lead's owner.
INSERT_REQUEST: LiteralString = """
INSERT INTO plan_requests (lead_id, telegram_id)
SELECT id, coalesce(%(telegram_id)s::bigint, telegram_id)
  FROM lead_registry
 WHERE id = %(lead_id)s
RETURNING id, status
"""

ACTIVE_REQUEST: LiteralString = """
SELECT id, status FROM plan_requests
 WHERE lead_id = %(lead_id)s AND status IN ('pending', 'processing')
 ORDER BY id DESC
 LIMIT 1
"""


# -- operator commands (cli) --

# The embedded server's data folder, named by the operator commands (superuser only).
DATA_DIRECTORY: LiteralString = "SELECT current_setting('data_directory')"

# One request's whole story for `show` and `request --wait`: the row, its timings, its lead.
REQUEST_STORY: LiteralString = """
SELECT r.id, r.lead_id, r.telegram_id, r.status, r.attempts, r.result, r.last_error,
       r.worker_id, r.created_at, r.updated_at, r.run_after, r.claimed_at, r.finished_at,
       r.lease_expires_at, r.progress,
       extract(epoch FROM r.run_after - now())::float8 AS due_in_seconds,
       extract(epoch FROM r.finished_at - r.claimed_at)::float8 AS ran_seconds,
       l.prospect_name, l.prospect_company
  FROM plan_requests AS r
  LEFT JOIN lead_registry AS l ON l.id = r.lead_id
 WHERE r.id = %(id)s
"""

# The reminders a completed request scheduled: same lead, and due exactly its step's delay after
# the completion (one transaction, one now()), whatever the reminder's status is now.
REQUEST_REMINDERS: LiteralString = """
SELECT s.id, s.step_id, s.due_at, s.status, s.draft_text
  FROM plan_requests AS r
 CROSS JOIN jsonb_to_recordset(r.result -> 'plan') AS p (step_id integer, delay_days integer)
  JOIN scheduled_reminders AS s
    ON s.lead_id = r.lead_id AND s.step_id = p.step_id
   AND s.due_at = r.finished_at + make_interval(days => p.delay_days)
 WHERE r.id = %(id)s AND r.status = 'completed' AND jsonb_typeof(r.result -> 'plan') = 'array'
 ORDER BY s.step_id, s.id
"""

# Retention: finished requests that ended before the cut-off go, a batch at a time so no
# statement holds many row locks for long. Reminders belong to the lead and stay.
PURGE_FINISHED: LiteralString = """
WITH old AS (
    SELECT id FROM plan_requests
     WHERE status IN ('completed', 'failed')
       AND coalesce(finished_at, updated_at) < now() - make_interval(secs => %(older_than)s)
     ORDER BY id
     LIMIT %(batch)s
       FOR UPDATE SKIP LOCKED
)
DELETE FROM plan_requests AS r USING old WHERE r.id = old.id
"""

COUNT_FINISHED_BEFORE: LiteralString = """
SELECT count(*) AS count FROM plan_requests
 WHERE status IN ('completed', 'failed')
   AND coalesce(finished_at, updated_at) < now() - make_interval(secs => %(older_than)s)
"""

# The demo's sample lead: the one a previous demo run made, else a new one.
DEMO_LEAD: LiteralString = """
WITH found AS (
    SELECT id FROM lead_registry
     WHERE telegram_id = %(telegram_id)s AND prospect_name = %(name)s
       AND prospect_company = %(company)s
     ORDER BY id
     LIMIT 1
), made AS (
    INSERT INTO lead_registry (telegram_id, prospect_name, prospect_title, prospect_company,
                               prospect_analysis, closing_strategy)
    SELECT %(telegram_id)s, %(name)s, %(title)s, %(company)s, %(analysis)s, %(strategy)s
     WHERE NOT EXISTS (SELECT 1 FROM found)
    RETURNING id
)
SELECT id FROM found UNION ALL SELECT id FROM made
"""

# `cancel`: pending requests become `failed` with the operator's sentence, and the event every
# transition to `failed` sends. A claimed request is not touched (its worker owns it).
CANCEL_PENDING: LiteralString = """
WITH cancelled AS (
    UPDATE plan_requests
       SET status = 'failed',
           result = jsonb_build_object('error', %(error)s::text)
                    || jsonb_strip_nulls(jsonb_build_object(
                           'previous_error', result -> 'previous_error')),
           last_error = %(error)s::text,
           finished_at = now(),
           updated_at = now()
     WHERE id = ANY (%(ids)s::bigint[]) AND status = 'pending'
 RETURNING id, lead_id, telegram_id, status
)
SELECT id, lead_id, public.planbus_request_event(id, lead_id, telegram_id, status)
  FROM cancelled
 ORDER BY id
"""
