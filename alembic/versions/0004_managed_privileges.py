"""Managed databases: tables planbus creates stay closed to API roles; a per-user request limit.

On Supabase or InsForge every new table in `public` is granted to `anon`, `authenticated` and
`service_role`. The tables planbus created (recorded by 0001) are closed again: privileges
revoked, row-level security on, and a read policy for the caller's own leads and reminders that
opens nothing until the app grants `authenticated` SELECT. planbus's bookkeeping
(`alembic_version`, `planbus_*`) is closed to every role but its owner (a role that was granted
SELECT keeps reading it). An adopted `lead_registry` is left as it is, with a warning naming
each grant that lets the Mini App's roles write it.

The Mini App may insert at most `planbus_settings.tma_requests_per_minute` requests per user and
minute, and a refused status is echoed cut to a readable length.

Revision ID: 0004_managed_privileges
Revises: 0003_event_payload
"""

from __future__ import annotations

import logging

from sqlalchemy import text

from alembic import op
from planbus.schema.adoption import added, disable_added_row_security, forget, quote, table_exists
from planbus.schema.privileges import (
    API_ROLES,
    bookkeeping_tables,
    close_bookkeeping,
    close_to_api_roles,
    existing_roles,
    restore_privileges,
)

revision = "0004_managed_privileges"
down_revision = "0003_event_payload"
branch_labels = None
depends_on = None

log = logging.getLogger("planbus.migrations")

TMA_ROLE = "authenticated"
REQUESTS_PER_MINUTE = 10

# The refusal of a bad status quoted the whole value: a 1 MB status made a 1 MB error, in the
# client's answer and in the server log. It is cut to 40 characters and its length said.
STATUS_ECHO = "quote_nullable(NEW.status)"
STATUS_ECHO_CUT = (
    "CASE WHEN length(NEW.status) > 40 THEN quote_literal(left(NEW.status, 40)) || '... (' "
    "|| length(NEW.status) || ' characters)' ELSE quote_nullable(NEW.status) END"
)
CHECK_TMA_INSERT = "public.planbus_check_tma_insert()"

OWN_LEADS_POLICY = "planbus_tma_reads_own"

USER_LIMIT = f"""
CREATE TABLE planbus_settings (
    name    text PRIMARY KEY,
    value   integer NOT NULL,
    meaning text NOT NULL
);
INSERT INTO planbus_settings (name, value, meaning) VALUES
    ('tma_requests_per_minute', {REQUESTS_PER_MINUTE},
     'plan requests one Mini App user (telegram_id) may insert per minute; 0 means no limit');

CREATE INDEX planbus_plan_requests_by_user ON plan_requests (telegram_id, created_at);

-- The limit is not secret; the function lets the Mini App's role read it without a right on
-- planbus_settings.
CREATE FUNCTION public.planbus_tma_requests_per_minute() RETURNS integer
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = '' AS $$
    SELECT value FROM public.planbus_settings WHERE name = 'tma_requests_per_minute'
$$;
REVOKE EXECUTE ON FUNCTION public.planbus_tma_requests_per_minute() FROM PUBLIC;

-- Runs after planbus_plan_requests_tma_rights (triggers fire in name order), so NEW.telegram_id
-- is the caller's and row-level security shows the function exactly that user's requests.
CREATE FUNCTION public.planbus_limit_tma_requests() RETURNS trigger
LANGUAGE plpgsql SET search_path = '' AS $$
DECLARE
    per_minute integer;
    recent bigint;
BEGIN
    -- Only the Mini App is limited (the same test as planbus_check_tma_insert).
    IF current_user <> '{TMA_ROLE}'
       AND public.planbus_jwt_claim('role') IS DISTINCT FROM '{TMA_ROLE}' THEN
        RETURN NEW;
    END IF;
    per_minute := public.planbus_tma_requests_per_minute();
    IF coalesce(per_minute, 0) <= 0 THEN
        RETURN NEW;
    END IF;
    -- One user's concurrent inserts are counted one after the other, so none slips past.
    PERFORM pg_advisory_xact_lock(hashtextextended('planbus_tma_requests:' || NEW.telegram_id, 0));
    SELECT count(*) INTO recent FROM public.plan_requests
     WHERE telegram_id = NEW.telegram_id AND created_at > now() - interval '1 minute';
    IF recent >= per_minute THEN
        -- PostgREST answers SQLSTATE PTxyz with HTTP status xyz: 429 Too Many Requests.
        RAISE EXCEPTION 'plan_requests: user % made % plan requests in the last minute, the '
                        'limit is %; try again in a minute', NEW.telegram_id, recent, per_minute
            USING ERRCODE = 'PT429',
                  HINT = 'The limit is planbus_settings.tma_requests_per_minute.';
    END IF;
    RETURN NEW;
END
$$;

CREATE TRIGGER planbus_plan_requests_user_limit
    BEFORE INSERT ON plan_requests
    FOR EACH ROW EXECUTE FUNCTION public.planbus_limit_tma_requests();
"""

DROP_USER_LIMIT = """
DROP TRIGGER IF EXISTS planbus_plan_requests_user_limit ON plan_requests;
DROP FUNCTION IF EXISTS public.planbus_limit_tma_requests();
DROP FUNCTION IF EXISTS public.planbus_tma_requests_per_minute();
DROP INDEX IF EXISTS planbus_plan_requests_by_user;
DROP TABLE IF EXISTS planbus_settings;
"""


def upgrade() -> None:
    created = {table for table, _ in added("table", "0001_bus")}
    for table in ("lead_registry", "scheduled_reminders"):
        if table in created:
            close_to_api_roles(table, revision)
            _add_read_own_policy(table)
    if "plan_requests" in created:
        # 0002 gave `authenticated` exactly the Mini App's rights; the other API roles go.
        close_to_api_roles("plan_requests", revision, keep=(TMA_ROLE,))
    if "lead_registry" not in created:
        _warn_when_lead_registry_is_writable()
    op.execute(USER_LIMIT)
    _grant_limit_function()
    _replace_in_function(CHECK_TMA_INSERT, STATUS_ECHO, STATUS_ECHO_CUT)
    for relation in bookkeeping_tables():
        close_bookkeeping(relation, revision)


def downgrade() -> None:
    _replace_in_function(CHECK_TMA_INSERT, STATUS_ECHO_CUT, STATUS_ECHO)
    op.execute(DROP_USER_LIMIT)
    created = {table for table, _ in added("table", "0001_bus")}
    for table in ("lead_registry", "scheduled_reminders"):
        if table in created and table_exists(table):
            op.execute(f"DROP POLICY IF EXISTS {OWN_LEADS_POLICY} ON {quote(table)}")
    restore_privileges(revision)
    disable_added_row_security(revision)
    forget(revision)


def _add_read_own_policy(table: str) -> None:
    """The caller's own rows, should the app grant `authenticated` SELECT on the table."""
    if TMA_ROLE in existing_roles((TMA_ROLE,)):
        op.execute(
            f"CREATE POLICY {OWN_LEADS_POLICY} ON {quote(table)} AS PERMISSIVE FOR SELECT "
            f"TO {TMA_ROLE} USING (telegram_id = (SELECT public.planbus_caller_telegram_id()))"
        )


def _grant_limit_function() -> None:
    # Managed platforms grant every new function to the API roles; only the Mini App needs it.
    roles = existing_roles(API_ROLES)
    if roles:
        who = ", ".join(quote(role) for role in roles)
        op.execute(
            f"REVOKE EXECUTE ON FUNCTION public.planbus_tma_requests_per_minute() FROM {who}"
        )
    if TMA_ROLE in roles:
        op.execute(
            f"GRANT EXECUTE ON FUNCTION public.planbus_tma_requests_per_minute() TO {TMA_ROLE}"
        )


# One warning line when `anon` or `authenticated` may write lead_registry (the worker's start-up
# check says the same). Copied as it was when this revision was written: a revision is history.
LEAD_REGISTRY_WRITABLE_BY_API = """
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


def _warn_when_lead_registry_is_writable() -> None:
    warning = op.get_bind().execute(text(LEAD_REGISTRY_WRITABLE_BY_API)).scalar()
    if warning:
        log.warning("%s", warning)


def _replace_in_function(signature: str, old: str, new: str) -> None:
    """Recreate a function with one expression of its body replaced (the reverse undoes it)."""
    definition = str(
        op.get_bind()
        .execute(text("SELECT pg_get_functiondef(CAST(:f AS regprocedure))"), {"f": signature})
        .scalar_one()
    )
    if old not in definition:
        raise RuntimeError(f"{signature} does not contain {old!r}; was it changed by hand?")
    op.execute(definition.replace(old, new))
