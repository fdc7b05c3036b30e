"""The worker's statements outside a request's path: its start-up checks and its /metrics scrape."""

from typing import LiteralString

# Start-up checks: the schema revision, and that this role may send the events it must send.
SCHEMA_REVISION: LiteralString = "SELECT version_num FROM alembic_version"

EVENT_RIGHTS: LiteralString = """
SELECT has_function_privilege(
    'public.planbus_request_event(bigint, bigint, bigint, text)', 'EXECUTE')
"""

# Start-up check, and after every LISTEN reconnect: a notification on the worker's private
# probe channel, sent from another connection than the LISTEN one, must reach the LISTEN
# connection. Behind a transaction pooler it never does (the session that listened went back
# to the pooler), which is how a LISTEN URL that hears nothing is found out.
LISTEN_PROBE: LiteralString = "SELECT pg_notify(%(channel)s, '')"

# Start-up check: the schema this worker needs is in place.
SCHEMA_READY: LiteralString = """
SELECT to_regclass('public.plan_requests') IS NOT NULL
   AND EXISTS (SELECT 1 FROM information_schema.columns
                WHERE table_schema = 'public' AND table_name = 'plan_requests'
                  AND column_name = 'claim_token')
"""

# One warning line when `anon` or `authenticated` (directly, through PUBLIC or a role they belong
# to) may write lead_registry: the ownership rule rests on lead_registry.telegram_id, so such a
# user could take over another user's lead. No row when it is closed. The migration logs the
# same line.
LEAD_REGISTRY_WRITABLE_BY_API: LiteralString = """
WITH acl AS (
    SELECT a.grantee, a.privilege_type, NULL::name AS column_name
      FROM pg_class AS c CROSS JOIN LATERAL aclexplode(c.relacl) AS a
     WHERE c.oid = to_regclass('public.lead_registry')
    UNION ALL
    SELECT a.grantee, a.privilege_type, att.attname
      FROM pg_attribute AS att CROSS JOIN LATERAL aclexplode(att.attacl) AS a
     WHERE att.attrelid = to_regclass('public.lead_registry') AND NOT att.attisdropped
), open AS (
    SELECT string_agg(DISTINCT acl.privilege_type, ', ')
               || coalesce(' (' || quote_ident(acl.column_name) || ')', '') AS privileges,
           CASE acl.grantee WHEN 0 THEN 'PUBLIC' ELSE quote_ident(pg_get_userbyid(acl.grantee))
           END AS grantee
      FROM acl
      JOIN pg_roles AS api ON api.rolname IN ('anon', 'authenticated')
     WHERE acl.privilege_type IN ('INSERT', 'UPDATE', 'DELETE', 'TRUNCATE')
       AND (acl.grantee = 0 OR pg_has_role(api.oid, acl.grantee, 'USAGE'))
     GROUP BY acl.grantee, acl.column_name
)
SELECT format('lead_registry is writable by the Mini App''s API roles (%s): a user could '
              'UPDATE lead_registry SET telegram_id = <their own> on another user''s lead and '
              'then request plans for it. Close it with: %s (see docs/security.md)',
              string_agg(format('GRANT %s ON lead_registry TO %s', privileges, grantee), '; '
                         ORDER BY grantee, privileges),
              string_agg(format('REVOKE %s ON lead_registry FROM %s;', privileges, grantee), ' '
                         ORDER BY grantee, privileges))
  FROM open
HAVING count(*) > 0
"""

# What the worker's role lacks on each table it works on: the missing privileges, and whether
# row-level security hides the rows from it (RLS on; neither owner, superuser nor BYPASSRLS; no
# permissive policy for it). A worker that cannot see the rows would claim nothing, forever.
WORKER_RIGHTS: LiteralString = """
SELECT t.name,
       current_user,
       array_to_string(ARRAY(SELECT p FROM unnest(t.privileges) AS p
                              WHERE NOT has_table_privilege(c.oid, p)), ', ') AS missing,
       c.relrowsecurity
       AND NOT (r.rolsuper OR r.rolbypassrls)
       AND NOT (pg_has_role(c.relowner, 'USAGE') AND NOT c.relforcerowsecurity)
       AND NOT EXISTS (
           SELECT 1 FROM pg_policy AS p
            WHERE p.polrelid = c.oid AND p.polpermissive AND p.polcmd IN ('r', '*')
              AND EXISTS (SELECT 1 FROM unnest(p.polroles) AS role
                           WHERE role = 0 OR pg_has_role(role, 'USAGE'))) AS hidden
  FROM (VALUES ('plan_requests', ARRAY['SELECT', 'UPDATE']),
               ('lead_registry', ARRAY['SELECT', 'UPDATE']),
               ('scheduled_reminders', ARRAY['SELECT', 'INSERT', 'UPDATE']),
               ('alembic_version', ARRAY['SELECT']),
               ('planbus_provider_limits', ARRAY['SELECT', 'UPDATE']),
               ('planbus_workers', ARRAY['SELECT', 'INSERT', 'UPDATE', 'DELETE']))
           AS t (name, privileges)
  JOIN pg_class AS c ON c.oid = to_regclass('public.' || t.name)
  JOIN pg_roles AS r ON r.rolname = current_user
 ORDER BY t.name = 'plan_requests' DESC, t.name
"""

# Queue depth and oldest pending age, read at scrape time; both use the partial pending index.
QUEUE_STATS: LiteralString = """
SELECT (SELECT count(*) FROM plan_requests WHERE status = 'pending'),
       (SELECT extract(epoch FROM now() - min(created_at))::float8
          FROM plan_requests WHERE status = 'pending')
"""

# /healthz: the database answers at all.
HEALTH_CHECK: LiteralString = "SELECT 1"
