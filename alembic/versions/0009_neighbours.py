"""Whoever acts for a Mini App user is held to its rules; a client may not choose its `id`.

- The per-user request limit (0004) was kept only for the role named `authenticated`. A role
  granted `authenticated` (e.g. a custom `premium` role PostgREST switches to) acts for a Mini
  App user too, and row-level security already treats it so; now the limit does as well.
  `planbus_acts_for_mini_app()` says who: the JWT's role is `authenticated`, or the current role
  holds `authenticated`'s privileges without bypassing row-level security (no superuser, no
  BYPASSRLS, not the table's owner), the same roles the policies of 0002 apply to.
- With a widened grant (`GRANT ALL ... TO authenticated`) a client could set `id` and take the
  id the next user would be given (that user then got a unique violation). `id` is refused like
  the worker columns of 0002: a row whose `id` is not the one its default just drew.

Revision ID: 0009_neighbours
Revises: 0008_workers
"""

from __future__ import annotations

from alembic import op
from planbus.schema.adoption import quote
from planbus.schema.privileges import API_ROLES, existing_roles

revision = "0009_neighbours"
down_revision = "0008_workers"
branch_labels = None
depends_on = None

TMA_ROLE = "authenticated"

ACTS_FOR_MINI_APP = f"""
CREATE FUNCTION public.planbus_acts_for_mini_app() RETURNS boolean
LANGUAGE plpgsql STABLE SET search_path = '' AS $$
DECLARE
    role pg_catalog.pg_roles%ROWTYPE;
BEGIN
    IF current_user = '{TMA_ROLE}'
       OR public.planbus_jwt_claim('role') IS NOT DISTINCT FROM '{TMA_ROLE}' THEN
        RETURN true;
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = '{TMA_ROLE}') THEN
        RETURN false;
    END IF;
    SELECT * INTO role FROM pg_catalog.pg_roles WHERE rolname = current_user;
    -- As row-level security decides whom the policies TO {TMA_ROLE} bind: the role's members
    -- that inherit its privileges, except those that bypass row-level security.
    RETURN pg_catalog.pg_has_role(current_user, '{TMA_ROLE}', 'USAGE')
       AND NOT (role.rolsuper OR role.rolbypassrls)
       AND NOT pg_catalog.pg_has_role(
               current_user,
               (SELECT relowner FROM pg_catalog.pg_class
                 WHERE oid = 'public.plan_requests'::pg_catalog.regclass),
               'USAGE');
END
$$;
"""

# 0004's limit, the same but for who is limited.
LIMIT_BODY = """
DECLARE
    per_minute integer;
    recent bigint;
BEGIN
    {who}
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
"""
WHO_0004 = f"""-- Only the Mini App is limited (the same test as planbus_check_tma_insert).
    IF current_user <> '{TMA_ROLE}'
       AND public.planbus_jwt_claim('role') IS DISTINCT FROM '{TMA_ROLE}' THEN
        RETURN NEW;
    END IF;"""
WHO_NOW = """-- Every role that acts for a Mini App user is limited, not only the one role name.
    IF NOT public.planbus_acts_for_mini_app() THEN
        RETURN NEW;
    END IF;"""
LIMIT = """
CREATE OR REPLACE FUNCTION public.planbus_limit_tma_requests() RETURNS trigger
LANGUAGE plpgsql SET search_path = '' AS $${body}$$;
"""

# A default draws the id from the column's sequence just before the BEFORE triggers run, so
# `currval` in this session equals it; an id the client wrote does not (or nothing was drawn
# yet). SECURITY DEFINER: the Mini App's role has no right on the sequence, nor needs one.
# Without a sequence (an adopted table whose ids come from elsewhere) nothing is refused.
REFUSE_CLIENT_ID = """
CREATE FUNCTION public.planbus_id_was_drawn(id bigint) RETURNS boolean
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = '' AS $$
DECLARE
    sequence text := pg_catalog.pg_get_serial_sequence('public.plan_requests', 'id');
BEGIN
    IF sequence IS NULL THEN
        RETURN true;
    END IF;
    RETURN id = pg_catalog.currval(sequence::pg_catalog.regclass);
EXCEPTION WHEN object_not_in_prerequisite_state THEN
    RETURN false;  -- currval: nothing drawn in this session, so not by this row's default
END
$$;
REVOKE EXECUTE ON FUNCTION public.planbus_id_was_drawn(bigint) FROM PUBLIC;

CREATE FUNCTION public.planbus_refuse_client_id() RETURNS trigger
LANGUAGE plpgsql SET search_path = '' AS $$
BEGIN
    -- Nested, so that only the Mini App's roles call the function granted to them.
    IF public.planbus_acts_for_mini_app() THEN
        IF NOT public.planbus_id_was_drawn(NEW.id) THEN
            RAISE EXCEPTION 'plan_requests: id may not be set by the client; insert only '
                            'lead_id, telegram_id and status'
                USING ERRCODE = 'insufficient_privilege';
        END IF;
    END IF;
    RETURN NEW;
END
$$;

-- Named to fire first among the BEFORE INSERT triggers (they fire in name order).
CREATE TRIGGER planbus_plan_requests_tma_a_id
    BEFORE INSERT ON plan_requests
    FOR EACH ROW EXECUTE FUNCTION public.planbus_refuse_client_id();
"""

DROP = """
DROP TRIGGER IF EXISTS planbus_plan_requests_tma_a_id ON plan_requests;
DROP FUNCTION IF EXISTS public.planbus_refuse_client_id();
DROP FUNCTION IF EXISTS public.planbus_id_was_drawn(bigint);
"""


def upgrade() -> None:
    op.execute(ACTS_FOR_MINI_APP)
    op.execute(LIMIT.format(body=LIMIT_BODY.format(who=WHO_NOW)))
    op.execute(REFUSE_CLIENT_ID)
    # Managed platforms grant every new function to the API roles; only the Mini App needs it.
    roles = existing_roles(API_ROLES)
    if roles:
        who = ", ".join(quote(role) for role in roles)
        op.execute(f"REVOKE EXECUTE ON FUNCTION public.planbus_id_was_drawn(bigint) FROM {who}")
    if TMA_ROLE in roles:
        op.execute(f"GRANT EXECUTE ON FUNCTION public.planbus_id_was_drawn(bigint) TO {TMA_ROLE}")


def downgrade() -> None:
    op.execute(DROP)
    op.execute(LIMIT.format(body=LIMIT_BODY.format(who=WHO_0004)))
    op.execute("DROP FUNCTION IF EXISTS public.planbus_acts_for_mini_app()")
