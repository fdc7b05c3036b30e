"""The dashboard's one statement per refresh: every section of the page in one round trip.

Each part is a named statement; `SNAPSHOT` nests them as JSON columns of one row, so however
many pages are open the database runs one statement per refresh (feed.py shares it). The
counts, the provider's pause and the tokens by model are `status`'s own statements.
Times are epoch seconds: the page shows ages from the database's clock, not the browser's.
"""

from typing import LiteralString

from planbus.ops.admin_queries import STATUS_COUNTS, STATUS_PROVIDER, STATUS_TOKENS_LAST_HOUR

# The newest requests, whatever their status (the primary key's order: no scan), then the last
# hour's failures older than those, so a failure stays on the page, with its Retry, while newer
# requests pour in. Each request once: one row, one button. The last error is the failure's
# sentence, else the latest failed attempt's, kept across retries.
RECENT_REQUESTS: LiteralString = """
WITH newest AS (
    SELECT id FROM plan_requests ORDER BY id DESC LIMIT 30
), shown AS (
    SELECT id, false AS older FROM newest
    UNION ALL
    (SELECT f.id, true FROM plan_requests AS f
      WHERE f.status = 'failed' AND f.finished_at > now() - interval '1 hour'
        AND f.id < (SELECT min(id) FROM newest)
      ORDER BY f.finished_at DESC, f.id DESC
      LIMIT 20)
)
SELECT r.id, r.lead_id, l.prospect_name AS lead_name, r.telegram_id, r.status, r.attempts,
       extract(epoch FROM r.created_at)::float8 AS created_at,
       coalesce(r.result ->> 'error', r.last_error) AS error, s.older
  FROM shown AS s
  JOIN plan_requests AS r ON r.id = s.id
  LEFT JOIN lead_registry AS l ON l.id = r.lead_id
 ORDER BY s.older, r.id DESC
"""

# Requests being planned, with the steps the model has written so far (`progress`, written by
# bus/progress.py while the answer streams; null before the first step and without streaming).
PLANNING: LiteralString = """
SELECT r.id, r.lead_id, l.prospect_name AS lead_name, r.attempts, r.worker_id,
       extract(epoch FROM r.claimed_at)::float8 AS claimed_at,
       r.progress -> 'steps' AS steps
  FROM plan_requests AS r
  LEFT JOIN lead_registry AS l ON l.id = r.lead_id
 WHERE r.status = 'processing'
 ORDER BY r.claimed_at, r.id
 LIMIT 6
"""

# Live workers: a heartbeat within the last minute (a worker beats every lease/4, 2 s by
# default; one silent for a minute is gone, and the sweep takes its claims over).
LIVE_WORKERS: LiteralString = """
SELECT worker_id, inflight, concurrency, llm_limit, held_back, version,
       extract(epoch FROM started_at)::float8 AS started_at,
       extract(epoch FROM heartbeat_at)::float8 AS heartbeat_at
  FROM planbus_workers
 WHERE heartbeat_at > now() - interval '1 minute'
 ORDER BY worker_id
 LIMIT 50
"""

# Completed and failed requests per clock minute, this minute and the 59 before it.
FINISHED_PER_MINUTE: LiteralString = """
SELECT extract(epoch FROM date_trunc('minute', finished_at))::float8 AS minute,
       count(*) FILTER (WHERE status = 'completed') AS completed,
       count(*) FILTER (WHERE status = 'failed') AS failed
  FROM plan_requests
 WHERE status IN ('completed', 'failed')
   AND finished_at >= date_trunc('minute', now()) - interval '59 minutes'
 GROUP BY 1
 ORDER BY 1
"""

SNAPSHOT: LiteralString = (
    "SELECT extract(epoch FROM now())::float8 AS now,"
    "\n (SELECT coalesce(json_agg(c), '[]') FROM (" + STATUS_COUNTS + ") AS c) AS counts,"
    "\n (SELECT row_to_json(p) FROM (" + STATUS_PROVIDER + ") AS p) AS provider,"
    "\n (SELECT coalesce(json_agg(t), '[]') FROM (" + STATUS_TOKENS_LAST_HOUR + ") AS t) AS tokens,"
    "\n (SELECT coalesce(json_agg(w), '[]') FROM (" + LIVE_WORKERS + ") AS w) AS workers,"
    "\n (SELECT coalesce(json_agg(g), '[]') FROM (" + PLANNING + ") AS g) AS planning,"
    "\n (SELECT coalesce(json_agg(r), '[]') FROM (" + RECENT_REQUESTS + ") AS r) AS recent,"
    "\n (SELECT coalesce(json_agg(m), '[]') FROM (" + FINISHED_PER_MINUTE + ") AS m) AS minutes"
)
