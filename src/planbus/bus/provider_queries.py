"""The statements of the provider's limits (bus/throttling.py): the throttled give-back, the shared
pause and backoff, and the optional ceiling's token bucket. The rest of a request's path is in
`queries`.
"""

from typing import LiteralString

# Where a throttling provider's "retry after" reaches the other workers: NOTIFY on this channel
# wakes them to read the row in planbus_provider_limits (PAUSE_LEFT), the only truth. The
# payload (the seconds the pause has left, for people watching) is never read: any role that
# may connect can NOTIFY, and a notification carries no authority.
PROVIDER_CHANNEL: LiteralString = "planbus_provider_limits"

# A throttled call (HTTP 429 rate limit, 503 overloaded): flow control, not failure. The request
# goes back to `pending` after %(delay_seconds)s; the claim counts in `throttled_claims`, so it
# spends none of PLANBUS_MAX_ATTEMPTS. Only a request throttled without a break for
# %(patience_seconds)s fails, with %(gave_up_error)s. The provider's wait, when it gave one, or
# else the backoff's, becomes the database's pause (never shortened), with the rounds of
# refusals that named no wait (%(refusals)s, never lowered here: RESET_REFUSALS does that), and
# is announced to every worker. Fenced like GIVE_BACK.
THROTTLE_BACK: LiteralString = """
WITH claim AS (
    SELECT id, coalesce(throttled_since, now()) AS since,
           coalesce(throttled_since, now())
               <= now() - make_interval(secs => %(patience_seconds)s) AS gives_up
      FROM plan_requests
     WHERE id = %(id)s AND claim_token = %(claim_token)s AND status = 'processing'
), given AS (
    UPDATE plan_requests AS r
       SET status = CASE WHEN c.gives_up THEN 'failed' ELSE 'pending' END,
           result = CASE WHEN c.gives_up THEN jsonb_build_object('error', %(gave_up_error)s::text)
                         ELSE r.result END,
           last_error = CASE WHEN c.gives_up THEN %(gave_up_error)s::text ELSE %(error)s::text END,
           throttled_claims = r.throttled_claims + 1,
           throttled_since = c.since,
           run_after = now() + make_interval(secs => %(delay_seconds)s),
           claim_token = NULL,
           lease_expires_at = NULL,
           worker_id = NULL,
           finished_at = CASE WHEN c.gives_up THEN now() END,
           progress = NULL,
           updated_at = now()
      FROM claim AS c
     WHERE r.id = c.id AND r.claim_token = %(claim_token)s AND r.status = 'processing'
 RETURNING r.id, r.lead_id, r.telegram_id, r.status
), pause AS (
    UPDATE planbus_provider_limits
       SET paused_until = CASE WHEN %(pause_seconds)s::float8 > 0
                               THEN greatest(paused_until, now() + make_interval(
                                                 secs => %(pause_seconds)s::float8))
                               ELSE paused_until END,
           refusals = greatest(refusals, %(refusals)s::int)
     WHERE (%(pause_seconds)s::float8 > 0 OR refusals < %(refusals)s::int)
       -- Only a claim still ours may pause every worker: a stale one matched no row.
       AND EXISTS (SELECT 1 FROM given)
 RETURNING paused_until
)
SELECT status, CASE WHEN status = 'failed'
                   THEN public.planbus_request_event(id, lead_id, telegram_id, status) END,
       (SELECT pg_notify('planbus_provider_limits',
                         extract(epoch FROM p.paused_until - now())::float8::text)
          FROM pause AS p
         -- A new count alone wakes nobody: peers read it with the next pause.
         WHERE %(pause_seconds)s::float8 > 0)
  FROM given
"""

# How long the database's pause has left, and the rounds of refusals that named no wait: read
# before the next claim after a notification on PROVIDER_CHANNEL, and after LISTEN
# (re)connects (notifications sent meanwhile were missed).
PAUSE_LEFT: LiteralString = """
SELECT greatest(extract(epoch FROM paused_until - now()), 0)::float8, refusals
  FROM planbus_provider_limits
"""

# An answered call ends the backoff for every worker. Sent only by a worker that knew of
# refusals (once per storm, never on the happy path); the WHERE makes a second one a no-op.
RESET_REFUSALS: LiteralString = """
UPDATE planbus_provider_limits SET refusals = 0 WHERE refusals > 0
"""

# The optional ceiling PLANBUS_LLM_REQUESTS_PER_MINUTE, shared by every worker: a token bucket
# of %(burst)s calls refilled at %(per_second)s. Sent before a claim only when the ceiling is
# set: it grants up to %(wanted)s calls and says how long until the next one would be granted.
RESERVE_CALLS: LiteralString = """
WITH refilled AS (
    SELECT least(%(burst)s::float8,
                 coalesce(budget + extract(epoch FROM now() - budget_at)::float8
                                   * %(per_second)s::float8,
                          %(burst)s::float8)) AS tokens
      FROM planbus_provider_limits
       FOR UPDATE
), granted AS (
    SELECT tokens, greatest(0, least(%(wanted)s::int, floor(tokens)::int)) AS calls
      FROM refilled
)
UPDATE planbus_provider_limits
   SET budget = g.tokens - g.calls, budget_at = now()
  FROM granted AS g
RETURNING g.calls, greatest(1 - (g.tokens - g.calls), 0) / %(per_second)s::float8 AS wait_seconds
"""

# Calls granted by RESERVE_CALLS that found no request to claim go back to the bucket.
REFUND_CALLS: LiteralString = """
UPDATE planbus_provider_limits SET budget = least(%(burst)s::float8, budget + %(calls)s::int)
"""
