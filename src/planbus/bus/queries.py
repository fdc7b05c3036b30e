"""Every statement the worker sends at run time, in the order a request meets them.

Table definitions live only in the alembic revisions, and so does the event payload: every
`plan_request_events` notification goes through `public.planbus_request_event()` (revision
0003), which sends the contract's four fields on EVENTS_CHANNEL. Each write to a claimed
request is fenced by its `claim_token`: a worker whose claim was recovered by the sweep and
handed to another worker matches no row, so it writes nothing.
"""

from typing import LiteralString

LISTEN_CHANNEL: LiteralString = "plan_requests"
EVENTS_CHANNEL: LiteralString = "plan_request_events"
# Between workers (bus/fleet.py): what a claim took, and a worker that joined or left. Both are
# hints that save claims; neither carries authority (the tables stay the truth).
CLAIMS_CHANNEL: LiteralString = "planbus_claims"
WORKERS_CHANNEL: LiteralString = "planbus_workers"

# Claim up to %(limit)s due requests in one statement, and load their leads with them.
# ARRAY(...) evaluates the locking subquery exactly once; IN (subquery) may not.
# The same statement says when the earliest request still waiting out a retry delay becomes
# due (requests becoming due announce nothing), so the claim loop can sleep exactly that long
# without a second round trip. It always returns at least one row: with nothing claimed, a row
# whose claim columns are NULL.
# Its commit does not wait for the WAL flush (synchronous_commit off, for this transaction only):
# a claim lost to a database crash reverts the request to `pending`, to be claimed again, and
# whatever the first claimant then writes is fenced out by its claim token. Every write that
# ends a claim commits durably, and its flush covers the claim before it.
# `traceparent` is the client's W3C trace context (null for most rows): the parent of this
# attempt's spans when tracing is on (bus/tracing.py).
# `waited_seconds` counts from when the request became due: its insert, or the end of a retry
# delay, a hand-back or `planbus retry` (each sets run_after), never from a first attempt.
# Fair turns: among the FAIR_WINDOW oldest due requests, a user's n-th is claimed after every
# other user's earlier ones (row_number() per telegram_id), the user served least recently
# (max(claimed_at): one probe of index planbus_plan_requests_served) first within a turn. The
# window bounds the cost on a backlog (about 4 us a row; 0.1 ms with one due row). FOR UPDATE
# cannot sit beside a window function: an ordered array of ids (WITH ORDINALITY keeps its
# order) is joined back to the rows it locks. With peers (%(announce)s), the claim says what
# it took on CLAIMS_CHANNEL: the others drop the fallback claims they planned (bus/fleet.py).
FAIR_WINDOW = 100
CLAIM: LiteralString = """
WITH claimed AS (
    UPDATE plan_requests AS r
       SET status           = 'processing',
           attempts         = r.attempts + 1,
           claim_token      = gen_random_uuid(),
           worker_id        = %(worker_id)s::text,
           claimed_at       = now(),
           lease_expires_at = now() + make_interval(secs => %(lease_seconds)s),
           updated_at       = now()
     WHERE r.id = ANY (ARRAY(
               SELECT p.id
                 FROM unnest(ARRAY(
                          WITH oldest AS MATERIALIZED (
                              SELECT id, telegram_id, run_after FROM plan_requests
                               WHERE status = 'pending' AND run_after <= now()
                               ORDER BY run_after, id
                               LIMIT %(fair_window)s)
                          SELECT o.id
                            FROM oldest AS o
                            LEFT JOIN LATERAL (
                                SELECT max(s.claimed_at) AS at FROM plan_requests AS s
                                 WHERE s.telegram_id = o.telegram_id) AS served ON true
                           ORDER BY row_number() OVER (PARTITION BY o.telegram_id
                                                       ORDER BY o.run_after, o.id),
                                    served.at NULLS FIRST, o.run_after, o.id
                      )) WITH ORDINALITY AS fair (id, place)
                 JOIN plan_requests AS p ON p.id = fair.id
                -- Checked again on the row's newest version once it is locked.
                WHERE p.status = 'pending' AND p.run_after <= now()
                ORDER BY fair.place
                LIMIT %(limit)s
                  FOR UPDATE OF p SKIP LOCKED))
 RETURNING r.id, r.lead_id, r.telegram_id, r.attempts, r.throttled_claims, r.claim_token,
           r.created_at, r.run_after, r.claimed_at, r.traceparent
), announced AS (
    -- With peers listening, say what this claim took: `p` when it took every due row it
    -- found (fewer than its limit), `f` when the limit stopped it; then who, and the ids.
    SELECT pg_notify('planbus_claims',
                     CASE WHEN count(*) >= %(limit)s THEN 'f ' ELSE 'p ' END
                     || %(worker_id)s::text || coalesce(' ' || string_agg(id::text, ','), ''))
      FROM claimed
    HAVING %(announce)s::boolean
), next_due AS (
    SELECT extract(epoch FROM min(run_after) - now())::float8 AS seconds
      FROM plan_requests
     WHERE status = 'pending' AND run_after > now()
)
SELECT n.seconds AS next_due_seconds,
       c.id, c.lead_id, c.telegram_id, c.attempts, c.throttled_claims, c.claim_token,
       c.traceparent,
       extract(epoch FROM c.claimed_at - greatest(c.created_at, c.run_after))::float8
           AS waited_seconds,
       l.id IS NOT NULL AS lead_found, l.telegram_id AS lead_telegram_id,
       l.prospect_name, l.prospect_title, l.prospect_company, l.prospect_analysis,
       l.closing_strategy, l.original_context, l.web_research
  FROM next_due AS n
 CROSS JOIN set_config('synchronous_commit', 'off', true) AS async_commit
  LEFT JOIN announced ON true
  LEFT JOIN (claimed AS c LEFT JOIN lead_registry AS l ON l.id = c.lead_id) ON true
 ORDER BY c.id
"""

# One statement extends every claim this process holds; it returns the ids still held. The
# same statement renews this worker's row in planbus_workers (what it holds now), so a busy
# worker's row costs no statement of its own; an UPDATE, not an upsert: a worker that has left
# (stopping) stays gone.
HEARTBEAT: LiteralString = """
WITH worker AS (
    UPDATE planbus_workers
       SET heartbeat_at = now(), inflight = %(inflight)s, llm_limit = %(llm_limit)s,
           held_back = %(held_back)s::text
     WHERE worker_id = %(worker_id)s::text
)
UPDATE plan_requests AS r
   SET lease_expires_at = now() + make_interval(secs => %(lease_seconds)s)
  FROM unnest(%(ids)s::bigint[], %(tokens)s::uuid[]) AS held (id, claim_token)
 WHERE r.id = held.id AND r.claim_token = held.claim_token AND r.status = 'processing'
RETURNING r.id
"""

# The effects of completed requests: one statement, so one snapshot, one now(), one commit.
# %(requests)s is a JSON array of {id, claim_token, result, reminders}, `result` complete as
# stored (the worker builds it: the database then copies the plan once): requests that finish
# together share the statement (one round trip and one commit instead of one each), and each
# stays fenced on its own: every CTE joins `done`, so a request whose claim is no longer ours
# writes nothing at all. The caller never puts two requests of one lead in the same array.
COMPLETE: LiteralString = """
WITH input AS (
    SELECT i.id, i.claim_token, i.result, i.reminders
      FROM jsonb_to_recordset(%(requests)s::jsonb)
        AS i (id bigint, claim_token uuid, result jsonb, reminders jsonb)
), done AS (
    UPDATE plan_requests AS r
       SET status = 'completed',
           -- A request an operator retried keeps the error it was retried from. (A pending
           -- request has no `result` but after such a retry, so only then is the plan copied
           -- once more.)
           result = CASE WHEN r.result IS NULL THEN i.result
                         ELSE i.result || jsonb_strip_nulls(jsonb_build_object(
                                  'previous_error', r.result -> 'previous_error')) END,
           progress = NULL,
           last_error = r.result ->> 'previous_error',
           claim_token = NULL,
           lease_expires_at = NULL,
           finished_at = now(),
           updated_at = now()
      FROM input AS i
     WHERE r.id = i.id AND r.claim_token = i.claim_token AND r.status = 'processing'
 RETURNING r.id, r.lead_id, r.telegram_id, i.result -> 'plan' AS plan, i.reminders
), steps AS (
    SELECT done.id, done.lead_id, done.telegram_id, s.step_id, s.delay_days, s.draft_text
      FROM done, jsonb_to_recordset(done.reminders)
        AS s (step_id integer, delay_days integer, draft_text text)
), lead AS (
    UPDATE lead_registry AS l
       SET engagement_plan = done.plan,
           next_followup = now() + make_interval(
               days => (SELECT min(steps.delay_days) FROM steps WHERE steps.id = done.id)),
           updated_at = now()
      FROM done
     WHERE l.id = done.lead_id
), cancelled AS (
    UPDATE scheduled_reminders AS sr
       SET status = 'cancelled', updated_at = now()
      FROM done
     WHERE sr.lead_id = done.lead_id AND sr.status IN ('pending', 'sent')
), scheduled AS (
    INSERT INTO scheduled_reminders (lead_id, telegram_id, step_id, due_at, status, draft_text)
    SELECT lead_id, telegram_id, step_id, now() + make_interval(days => delay_days), 'pending',
           draft_text
      FROM steps
)
SELECT id, public.planbus_request_event(id, lead_id, telegram_id, 'completed')
  FROM done
"""

# A failed attempt: back to `pending` after a delay, or `failed` for good. Fenced like COMPLETE.
# The event is sent only for `failed`, the terminal transition.
GIVE_BACK: LiteralString = """
WITH given AS (
    UPDATE plan_requests
       SET status = %(status)s::text,
           result = CASE WHEN %(status)s::text = 'failed'
                         THEN jsonb_build_object('error', %(error)s::text)
                              || jsonb_strip_nulls(jsonb_build_object(
                                     'previous_error', result -> 'previous_error'))
                         ELSE result END,
           progress = NULL,
           last_error = %(error)s::text,
           throttled_since = NULL,
           run_after = now() + make_interval(secs => %(delay_seconds)s),
           claim_token = NULL,
           lease_expires_at = NULL,
           worker_id = NULL,
           finished_at = CASE WHEN %(status)s::text = 'failed' THEN now() END,
           updated_at = now()
     WHERE id = %(id)s AND claim_token = %(claim_token)s AND status = 'processing'
 RETURNING id, lead_id, telegram_id, status
)
SELECT status, CASE WHEN status = 'failed'
                   THEN public.planbus_request_event(id, lead_id, telegram_id, status) END
  FROM given
"""

# Graceful shutdown: unfinished claims go back to `pending`, due at once, without an error.
HAND_BACK: LiteralString = """
UPDATE plan_requests AS r
   SET status = 'pending', claim_token = NULL, lease_expires_at = NULL, worker_id = NULL,
       progress = NULL, run_after = now(), updated_at = now()
  FROM unnest(%(ids)s::bigint[], %(tokens)s::uuid[]) AS held (id, claim_token)
 WHERE r.id = held.id AND r.claim_token = held.claim_token AND r.status = 'processing'
RETURNING r.id
"""

# The worker's row in planbus_workers, written by the sweep (RECOVER_EXPIRED) and WORKER_BEAT as
# the CTE `beat`: registered or renewed unless it is leaving (%(registered)s), with what it
# holds, its adaptive limit, why it is held back, and its claim connection's backend.
WORKER_ROW: LiteralString = """
    INSERT INTO planbus_workers AS w (worker_id, inflight, concurrency, llm_limit, held_back,
                                      claim_pid, version)
    SELECT %(worker_id)s::text, %(inflight)s, %(concurrency)s, %(llm_limit)s,
           %(held_back)s::text, %(claim_pid)s::integer, %(version)s::text
     WHERE %(registered)s::boolean
        ON CONFLICT (worker_id) DO UPDATE
       SET heartbeat_at = now(), inflight = excluded.inflight,
           concurrency = excluded.concurrency, llm_limit = excluded.llm_limit,
           held_back = excluded.held_back, claim_pid = excluded.claim_pid
    RETURNING worker_id, claim_pid"""

# The live workers (heartbeat within %(live_seconds)s, this one included through `beat`): their
# ids in order, and the backends of their claim connections, the only senders whose claim
# announcements count (bus/fleet.py).
LIVE_PEERS: LiteralString = """
       ARRAY(SELECT worker_id FROM planbus_workers
              WHERE heartbeat_at >= now() - make_interval(secs => %(live_seconds)s)
             UNION SELECT worker_id FROM beat ORDER BY 1) AS peers,
       ARRAY(SELECT claim_pid FROM planbus_workers
              WHERE heartbeat_at >= now() - make_interval(secs => %(live_seconds)s)
                AND claim_pid IS NOT NULL
             UNION SELECT claim_pid FROM beat WHERE claim_pid IS NOT NULL) AS claim_pids"""

# The fallback sweep: claims whose lease ran out (their worker died or froze) go back to
# `pending`, or to `failed` once their attempts are spent (claims the provider throttled
# spend none). Rows from an older deployment that are `processing` without any lease count
# as expired.
# It is also the idle worker's heartbeat in planbus_workers (WORKER_BEAT's upsert, so a worker
# frozen past the forget time registers again), and it returns the live workers and whether
# any request is due: a due request nobody claimed (its notification lost, its designated
# claimer dead) is then claimed; with none due the sweep claims nothing. It always returns at
# least one row: with nothing recovered, a row whose request columns are NULL.
RECOVER_EXPIRED: LiteralString = (
    """
WITH beat AS ("""
    + WORKER_ROW
    + """
), expired AS (
    SELECT id, attempts - throttled_claims >= %(max_attempts)s AS spent FROM plan_requests
     WHERE status = 'processing' AND (lease_expires_at IS NULL OR lease_expires_at < now())
       FOR UPDATE SKIP LOCKED
), recovered AS (
    UPDATE plan_requests AS r
       SET status = CASE WHEN expired.spent THEN 'failed' ELSE 'pending' END,
           result = CASE WHEN expired.spent
                         THEN jsonb_build_object('error', %(lost_error)s::text)
                              || jsonb_strip_nulls(jsonb_build_object(
                                     'previous_error', r.result -> 'previous_error'))
                         ELSE r.result END,
           progress = NULL,
           last_error = %(lost_error)s::text,
           claim_token = NULL,
           lease_expires_at = NULL,
           worker_id = NULL,
           run_after = now(),
           finished_at = CASE WHEN expired.spent THEN now() END,
           updated_at = now()
      FROM expired
     WHERE r.id = expired.id
 RETURNING r.id, r.lead_id, r.telegram_id, r.status, r.attempts
)
SELECT rec.id, rec.lead_id, rec.status, rec.attempts,
       CASE WHEN rec.status = 'failed'
            THEN public.planbus_request_event(rec.id, rec.lead_id, rec.telegram_id, rec.status)
       END,"""
    + LIVE_PEERS
    + """,
       EXISTS (SELECT 1 FROM plan_requests WHERE status = 'pending' AND run_after <= now())
           AS due
  FROM (SELECT) AS one
  LEFT JOIN recovered AS rec ON true
"""
)

# -- the fleet (bus/fleet.py) -----------------------------------------------------------------

# A worker registers (and, when told a peer joined or left, renews) its row and reads the live
# workers: those whose heartbeat is within %(live_seconds)s, and the backends of their claim
# connections (the only senders whose claim announcements count, see bus/fleet.py). Rows of
# workers dead for longer than %(forget_seconds)s are deleted by whoever beats. %(announce)s:
# tell the peers (at start, and when its claim connection is new).
WORKER_BEAT: LiteralString = (
    """
WITH beat AS ("""
    + WORKER_ROW
    + """
), forgotten AS (
    DELETE FROM planbus_workers
     WHERE heartbeat_at < now() - make_interval(secs => %(forget_seconds)s)
)
SELECT"""
    + LIVE_PEERS
    + """,
       CASE WHEN %(announce)s::boolean
            THEN pg_notify('planbus_workers', %(worker_id)s::text) END
"""
)

# A graceful stop: the worker leaves the fleet at once and says so, so that no request is meant
# for it while it drains.
WORKER_LEAVE: LiteralString = """
WITH gone AS (
    DELETE FROM planbus_workers WHERE worker_id = %(worker_id)s::text
)
SELECT pg_notify('planbus_workers', %(worker_id)s::text)
"""

# -- progress --------------------------------------------------------------------------------

# The steps a streamed plan has so far, for the Mini App to show while it waits. Fenced like
# every write: a worker whose claim was taken over matches no row. Progress is a preview that
# the next write replaces, so its commit does not wait for the WAL flush (this transaction
# only): the row lock it takes is released at once and never holds up the completion.
SHOW_PROGRESS: LiteralString = """
UPDATE plan_requests
   SET progress = %(progress)s::jsonb
  FROM set_config('synchronous_commit', 'off', true) AS async_commit
 WHERE id = %(id)s AND claim_token = %(claim_token)s AND status = 'processing'
"""
