"""The TMA's rights: row-level security, exact grants, one active request per lead.

The Mini App reaches `plan_requests` through PostgREST/InsForge as role `authenticated`, its
user's identity in `request.jwt.claims`. It may insert a `pending` request for its own lead and
read its own requests; nothing else. `anon` gets nothing. The worker (the table owner, or a role
with BYPASSRLS) is not restricted.

Revision ID: 0002_tma_rights
Revises: 0001_bus
"""

from __future__ import annotations

import logging

from sqlalchemy import text

from alembic import op
from planbus.schema.adoption import (
    add_constraint,
    any_nullable,
    disable_added_row_security,
    enable_row_security,
    forget,
    qualified_name,
    quote,
    remove_added_columns_and_constraints,
    remove_added_defaults,
    set_default,
)
from planbus.schema.privileges import privileges, record_privilege_changes, restore_privileges

revision = "0002_tma_rights"
down_revision = "0001_bus"
branch_labels = None
depends_on = None

log = logging.getLogger("planbus.migrations")

TMA_ROLE = "authenticated"
ANON_ROLE = "anon"
TMA_COLUMNS = "lead_id, telegram_id, status"
ACTIVE_INDEX = "planbus_plan_requests_one_active_per_lead"

# Columns only the worker writes. The column-level INSERT grant already refuses them; the
# trigger names them too, in case an operator widens the grant (e.g. GRANT ALL ... TO
# authenticated, a common step in managed-PostgreSQL guides).
WORKER_COLUMNS = (
    "result",
    "attempts",
    "created_at",
    "updated_at",
    "run_after",
    "claim_token",
    "worker_id",
    "lease_expires_at",
    "claimed_at",
    "finished_at",
    "last_error",
)

ORIGIN_KIND_CHECK = "planbus_schema_origin_kind_check"
ORIGIN_KINDS_0001 = "'table', 'column', 'constraint'"
ORIGIN_KINDS = ORIGIN_KINDS_0001 + ", 'default', 'row_security', 'granted', 'revoked'"

# An older deployment may hold several active requests for one lead. Before the unique index
# is built the oldest stays active and the newer ones fail, with a reason and the usual event.
FAIL_DUPLICATE_ACTIVE = """
WITH ranked AS (
    SELECT id, row_number() OVER same_lead AS position,
           format('Lead %s already had an active request (%s) when planbus was installed, '
                  'so this newer duplicate was not processed.',
                  lead_id, first_value(id) OVER same_lead) AS error
      FROM plan_requests
     WHERE status IN ('pending', 'processing') AND lead_id IS NOT NULL
    WINDOW same_lead AS (PARTITION BY lead_id ORDER BY created_at, id)
), failed AS (
    UPDATE plan_requests AS r
       SET status = 'failed',
           result = jsonb_build_object('error', ranked.error),
           last_error = ranked.error,
           claim_token = NULL,
           lease_expires_at = NULL,
           worker_id = NULL,
           finished_at = now(),
           updated_at = now()
      FROM ranked
     WHERE r.id = ranked.id AND ranked.position > 1
 RETURNING r.id, r.lead_id, r.telegram_id, r.status
)
SELECT id, pg_notify('plan_request_events', json_build_object(
           'id', id, 'lead_id', lead_id, 'telegram_id', telegram_id, 'status', status)::text)
  FROM failed
"""

OWNED_OBJECTS = f"""
-- One request per lead may be waiting or running; PostgREST answers a second insert with 409.
CREATE UNIQUE INDEX {ACTIVE_INDEX} ON plan_requests (lead_id)
    WHERE status IN ('pending', 'processing');

-- The caller's identity, as PostgREST/InsForge set it. Malformed claims identify nobody.
CREATE FUNCTION public.planbus_jwt_claim(claim text) RETURNS text
LANGUAGE plpgsql STABLE SET search_path = '' AS $$
BEGIN
    RETURN nullif(current_setting('request.jwt.claims', true), '')::jsonb ->> claim;
EXCEPTION WHEN data_exception THEN
    RETURN NULL;
END
$$;

CREATE FUNCTION public.planbus_caller_telegram_id() RETURNS bigint
LANGUAGE plpgsql STABLE SET search_path = '' AS $$
BEGIN
    RETURN public.planbus_jwt_claim('telegram_id')::bigint;
EXCEPTION WHEN data_exception THEN
    RETURN NULL;
END
$$;

-- SECURITY DEFINER, so the check needs no privilege on lead_registry. It answers only about
-- the caller's own leads: an unknown lead and another user's lead look the same.
CREATE FUNCTION public.planbus_caller_owns_lead(lead bigint) RETURNS boolean
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = '' AS $$
    SELECT EXISTS (SELECT 1 FROM public.lead_registry
                    WHERE id = lead AND telegram_id = public.planbus_caller_telegram_id())
$$;
REVOKE EXECUTE ON FUNCTION public.planbus_caller_owns_lead(bigint) FROM PUBLIC;

-- The readable half of the TMA's rights: BEFORE INSERT triggers run before the row-level
-- security check, so a refused insert says which rule it broke. The policies below hold
-- the same rules, and the column-level grant refuses worker columns even earlier.
CREATE FUNCTION public.planbus_check_tma_insert() RETURNS trigger
LANGUAGE plpgsql SET search_path = '' AS $$
DECLARE
    caller bigint;
    client_set text;
BEGIN
    -- Only the Mini App is held to these rules: the worker, operators and back-end services
    -- (e.g. PostgREST's service_role) insert as other roles.
    IF current_user <> '{TMA_ROLE}'
       AND public.planbus_jwt_claim('role') IS DISTINCT FROM '{TMA_ROLE}' THEN
        RETURN NEW;
    END IF;
    caller := public.planbus_caller_telegram_id();
    IF caller IS NULL THEN
        RAISE EXCEPTION 'plan_requests: the caller has no telegram_id claim, so it may not '
                        'request plans'
            USING ERRCODE = 'insufficient_privilege',
                  HINT = 'Call with the user''s token: request.jwt.claims must carry telegram_id.';
    END IF;
    IF NEW.telegram_id IS DISTINCT FROM caller THEN
        RAISE EXCEPTION 'plan_requests: telegram_id % is not the caller''s own (%); a user may '
                        'request plans only for themselves',
                        coalesce(NEW.telegram_id::text, 'NULL'), caller
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    IF NEW.status IS DISTINCT FROM 'pending' THEN
        RAISE EXCEPTION 'plan_requests: status must be omitted or ''pending'', not %; the worker '
                        'sets every other status', quote_nullable(NEW.status)
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    SELECT string_agg(col.key, ', ' ORDER BY col.key) INTO client_set
      FROM jsonb_each(to_jsonb(NEW)) AS col
     WHERE col.key = ANY (ARRAY[{", ".join(f"'{c}'" for c in WORKER_COLUMNS)}])
       AND col.value <> 'null'::jsonb
       AND NOT (col.key = 'attempts' AND col.value = '0'::jsonb)
       AND NOT (col.key IN ('created_at', 'updated_at', 'run_after')
                AND (col.value #>> '{{}}')::timestamptz = now());
    IF client_set IS NOT NULL THEN
        RAISE EXCEPTION 'plan_requests: % may not be set by the client; insert only lead_id, '
                        'telegram_id and status', client_set
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    IF NEW.lead_id IS NULL OR NOT public.planbus_caller_owns_lead(NEW.lead_id) THEN
        RAISE EXCEPTION 'plan_requests: lead % is not one of the caller''s leads',
                        coalesce(NEW.lead_id::text, 'NULL')
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    RETURN NEW;
END
$$;

CREATE TRIGGER planbus_plan_requests_tma_rights
    BEFORE INSERT ON plan_requests
    FOR EACH ROW EXECUTE FUNCTION public.planbus_check_tma_insert();
"""

OWN_ROWS = "telegram_id = (SELECT public.planbus_caller_telegram_id())"
INSERT_RULE = f"{OWN_ROWS} AND status = 'pending' AND public.planbus_caller_owns_lead(lead_id)"

# A permissive policy grants each right; its restrictive twin keeps a pre-existing permissive
# policy of an adopted table from widening it. No UPDATE or DELETE policy: the TMA has neither.
POLICIES = f"""
CREATE POLICY planbus_tma_inserts_own ON plan_requests
    AS PERMISSIVE FOR INSERT TO {TMA_ROLE} WITH CHECK ({INSERT_RULE});
CREATE POLICY planbus_tma_inserts_only_own ON plan_requests
    AS RESTRICTIVE FOR INSERT TO {TMA_ROLE} WITH CHECK ({INSERT_RULE});
CREATE POLICY planbus_tma_reads_own ON plan_requests
    AS PERMISSIVE FOR SELECT TO {TMA_ROLE} USING ({OWN_ROWS});
CREATE POLICY planbus_tma_reads_only_own ON plan_requests
    AS RESTRICTIVE FOR SELECT TO {TMA_ROLE} USING ({OWN_ROWS});
"""

DROP_OWNED_OBJECTS = f"""
DROP POLICY IF EXISTS planbus_tma_reads_only_own ON plan_requests;
DROP POLICY IF EXISTS planbus_tma_reads_own ON plan_requests;
DROP POLICY IF EXISTS planbus_tma_inserts_only_own ON plan_requests;
DROP POLICY IF EXISTS planbus_tma_inserts_own ON plan_requests;
DROP TRIGGER IF EXISTS planbus_plan_requests_tma_rights ON plan_requests;
DROP FUNCTION IF EXISTS public.planbus_check_tma_insert();
DROP FUNCTION IF EXISTS public.planbus_caller_owns_lead(bigint);
DROP FUNCTION IF EXISTS public.planbus_caller_telegram_id();
DROP FUNCTION IF EXISTS public.planbus_jwt_claim(text);
DROP INDEX IF EXISTS {ACTIVE_INDEX};
"""


def upgrade() -> None:
    _set_origin_kinds(ORIGIN_KINDS)
    # No insert may slip between removing duplicates and building the unique index.
    op.execute("LOCK TABLE plan_requests IN ACCESS EXCLUSIVE MODE")
    _fail_duplicate_active_requests()
    _adopt_bad_input_rules()
    op.execute(OWNED_OBJECTS)
    enable_row_security("plan_requests", revision)
    present = _ensure_roles()
    _grant_exactly(present)
    if TMA_ROLE in present:
        op.execute(POLICIES)


def downgrade() -> None:
    op.execute(DROP_OWNED_OBJECTS)
    restore_privileges(revision)
    disable_added_row_security(revision)
    remove_added_defaults(revision)
    remove_added_columns_and_constraints(revision)
    forget(revision)
    _set_origin_kinds(ORIGIN_KINDS_0001)


def _set_origin_kinds(kinds: str) -> None:
    op.execute(
        f"ALTER TABLE planbus_schema_origin DROP CONSTRAINT IF EXISTS {ORIGIN_KIND_CHECK}, "
        f"ADD CONSTRAINT {ORIGIN_KIND_CHECK} CHECK (kind IN ({kinds}))"
    )


def _fail_duplicate_active_requests() -> None:
    """An older deployment may hold several active requests for one lead: keep the oldest."""
    failed = op.get_bind().execute(text(FAIL_DUPLICATE_ACTIVE)).all()
    if failed:
        log.warning(
            "plan_requests: %d newer duplicate active requests failed (one active request per "
            "lead); ids %s",
            len(failed),
            [row[0] for row in failed],
        )


def _adopt_bad_input_rules() -> None:
    """What the contract forbids, refused by the database also on an adopted table."""
    set_default("plan_requests", "status", "'pending'", revision)
    set_default("plan_requests", "created_at", "now()", revision)
    set_default("plan_requests", "updated_at", "now()", revision)
    if any_nullable("plan_requests", ("lead_id", "telegram_id", "status")):
        add_constraint(
            "plan_requests",
            "planbus_plan_requests_required_check",
            "CHECK (lead_id IS NOT NULL AND telegram_id IS NOT NULL AND status IS NOT NULL)",
            revision,
        )
    add_constraint(
        "plan_requests", "planbus_plan_requests_attempts_check", "CHECK (attempts >= 0)", revision
    )


def _ensure_roles() -> set[str]:
    """Create `authenticated` and `anon` (NOLOGIN) when missing and allowed; the ones present."""
    bind = op.get_bind()
    may_create = bind.execute(
        text("SELECT rolsuper OR rolcreaterole FROM pg_roles WHERE rolname = current_user")
    ).scalar()
    present = set()
    missing = []
    for role in (TMA_ROLE, ANON_ROLE):
        exists = bind.execute(
            text("SELECT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = :role)"), {"role": role}
        ).scalar()
        if not exists and may_create:
            # Roles belong to the whole server: another database's migration may race us.
            op.execute(
                f"DO $$ BEGIN CREATE ROLE {quote(role)} NOLOGIN; "
                "EXCEPTION WHEN duplicate_object OR unique_violation THEN NULL; END $$"
            )
            log.info("created role %s (NOLOGIN)", role)
            exists = True
        if exists:
            present.add(role)
        else:
            missing.append(role)
    if missing:
        log.warning(
            "role %s does not exist and %s may not create roles, so plan_requests stays closed "
            "to the Mini App (no grants, no policies). Ask a superuser to run %s then re-apply "
            "with: alembic downgrade 0001_bus && alembic upgrade head",
            " and ".join(missing),
            bind.execute(text("SELECT current_user")).scalar(),
            " ".join(f"CREATE ROLE {role} NOLOGIN;" for role in missing),
        )
    return present


def _grant_exactly(present: set[str]) -> None:
    """`authenticated`: INSERT of its three columns and SELECT; `anon` and PUBLIC: nothing.

    planbus's own bookkeeping tables are closed too: a managed platform's default privileges
    would otherwise let anyone rewrite what `alembic downgrade` drops.
    """
    grantees = ("PUBLIC", *sorted(present))
    who = ", ".join(quote(role) if role != "PUBLIC" else role for role in grantees)
    relations = {
        "public.plan_requests": "TABLE",
        **dict.fromkeys(_id_sequences(), "SEQUENCE"),
        "public.planbus_schema_origin": "TABLE",
        qualified_name("alembic_version"): "TABLE",
    }
    before = {relation: privileges(relation, grantees) for relation in relations}
    for relation, kind in relations.items():
        op.execute(f"REVOKE ALL ON {kind} {relation} FROM {who}")
    if ANON_ROLE in present:
        # Managed platforms grant every new function to anon by default.
        op.execute(
            f"REVOKE EXECUTE ON FUNCTION public.planbus_caller_owns_lead(bigint) FROM {ANON_ROLE}"
        )
    if TMA_ROLE in present:
        op.execute(f"GRANT SELECT, INSERT ({TMA_COLUMNS}) ON plan_requests TO {TMA_ROLE}")
        op.execute(
            f"GRANT EXECUTE ON FUNCTION public.planbus_caller_owns_lead(bigint) TO {TMA_ROLE}"
        )
        # A legacy serial id calls nextval() with the caller's rights; an identity column
        # does not, so only such sequences are granted.
        for sequence in _id_sequences(identity=False):
            op.execute(f"GRANT USAGE ON SEQUENCE {sequence} TO {TMA_ROLE}")
    for relation in relations:
        record_privilege_changes(
            relation, before[relation], privileges(relation, grantees), revision
        )
    if ANON_ROLE in present and _anon_still_has_access():
        log.warning(
            "role anon still reaches plan_requests through a role it belongs to; revoke that "
            "membership or the grant"
        )


def _id_sequences(*, identity: bool = True) -> list[str]:
    """Sequences behind plan_requests' column defaults (and identity columns, if asked)."""
    query = """
    SELECT format('%I.%I', n.nspname, s.relname)
      FROM pg_attrdef AS ad
      JOIN pg_depend AS d ON d.classid = 'pg_attrdef'::regclass AND d.objid = ad.oid
      JOIN pg_class AS s ON s.oid = d.refobjid AND s.relkind = 'S'
      JOIN pg_namespace AS n ON n.oid = s.relnamespace
     WHERE ad.adrelid = 'public.plan_requests'::regclass
    """
    if identity:
        query += """
    UNION
    SELECT pg_get_serial_sequence('public.plan_requests', attname)
      FROM pg_attribute
     WHERE attrelid = 'public.plan_requests'::regclass AND attidentity <> ''
    """
    return sorted({str(row[0]) for row in op.get_bind().execute(text(query))})


def _anon_still_has_access() -> bool:
    found = op.get_bind().execute(
        text(
            "SELECT has_table_privilege(:role, 'public.plan_requests', "
            "'SELECT, INSERT, UPDATE, DELETE, TRUNCATE')"
        ),
        {"role": ANON_ROLE},
    )
    return bool(found.scalar())
