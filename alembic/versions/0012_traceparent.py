"""Traces: the Mini App may send a W3C `traceparent` with its request.

`plan_requests.traceparent text` (null unless the client sent one) carries the W3C Trace
Context of the tap that asked for the plan. The worker's spans for each attempt (claim, model
call, stored effects) become its children, so one trace runs from the Mini App to the model's
answer (docs/operations.md, "Traces").

The Mini App (role `authenticated`) may set it on INSERT: a column-level grant beside 0002's
three columns. Only a well-formed value is kept: version `00`, a 32-hex-digit trace id and a
16-hex-digit parent id that are not all zeros, two hex digits of flags, all lowercase. A CHECK
constraint holds that for every writer; a trigger that fires only on a bad value refuses it
first with a sentence that says what a traceparent looks like. The row-level security of 0002
already shows a row, this column with it, to its own user only.

Revision ID: 0012_traceparent
Revises: 0011_fleet
"""

from __future__ import annotations

from sqlalchemy import text

from alembic import op
from planbus.schema.adoption import (
    add_constraint,
    ensure_columns,
    forget,
    remove_added_columns_and_constraints,
)
from planbus.schema.privileges import privileges, record_privilege_changes, restore_privileges

revision = "0012_traceparent"
down_revision = "0011_fleet"
branch_labels = None
depends_on = None

TMA_ROLE = "authenticated"
CONSTRAINT = "planbus_plan_requests_traceparent_w3c"

# https://www.w3.org/TR/trace-context/#traceparent-header: version 00 has exactly four fields,
# and an all-zero trace id or parent id is invalid. Characters 4-35 are the trace id, 37-52 the
# parent id.
VALID = (
    "traceparent ~ '^00-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$' "
    "AND substr(traceparent, 4, 32) <> repeat('0', 32) "
    "AND substr(traceparent, 37, 16) <> repeat('0', 16)"
)

# The trigger's WHEN clause calls the function only for a value the constraint would refuse:
# a request without a traceparent (or with a good one) costs one NULL test, no function call.
# It echoes at most 60 characters of the value, so a megabyte sent makes no megabyte error.
REFUSE_BAD_TRACEPARENT = f"""
CREATE FUNCTION public.planbus_refuse_bad_traceparent() RETURNS trigger
LANGUAGE plpgsql SET search_path = '' AS $$
BEGIN
    RAISE EXCEPTION 'plan_requests: traceparent must be a W3C traceparent: '
                    '00-<trace id, 32 hex digits>-<parent id, 16 hex digits>-<flags, 2 hex '
                    'digits>, lowercase, ids not all zeros; not %',
                    CASE WHEN length(NEW.traceparent) > 60
                         THEN quote_literal(left(NEW.traceparent, 60)) || '... ('
                              || length(NEW.traceparent) || ' characters)'
                         ELSE quote_literal(NEW.traceparent) END
        USING ERRCODE = 'check_violation',
              HINT = 'Send it as a browser tracer does, e.g. '
                     '00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01, or leave it out.';
END
$$;

CREATE TRIGGER planbus_plan_requests_traceparent
    BEFORE INSERT OR UPDATE OF traceparent ON plan_requests
    FOR EACH ROW
    WHEN (NEW.traceparent IS NOT NULL AND NOT ({VALID.replace("traceparent", "NEW.traceparent")}))
    EXECUTE FUNCTION public.planbus_refuse_bad_traceparent();
"""

DROP_REFUSE_BAD_TRACEPARENT = """
DROP TRIGGER IF EXISTS planbus_plan_requests_traceparent ON plan_requests;
DROP FUNCTION IF EXISTS public.planbus_refuse_bad_traceparent();
"""

# Where the Mini App reads plan_requests column by column (a grant narrowed after 0002), it
# needs this column too; a table-wide SELECT covers it already. (As in 0006.)
READS_BY_COLUMN = f"""
SELECT NOT has_table_privilege('{TMA_ROLE}', 'public.plan_requests', 'SELECT')
   AND has_column_privilege('{TMA_ROLE}', 'public.plan_requests', 'status', 'SELECT')
  FROM pg_roles WHERE rolname = '{TMA_ROLE}'
"""

TMA_ROLE_EXISTS = f"SELECT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = '{TMA_ROLE}')"


def upgrade() -> None:
    ensure_columns("plan_requests", {"traceparent": "text"}, revision)
    # An adopted table may already hold such a column with other values: they are kept, and
    # the constraint binds new and changed rows (add_constraint says how to validate later).
    add_constraint(
        "plan_requests", CONSTRAINT, f"CHECK (traceparent IS NULL OR ({VALID}))", revision
    )
    op.execute(REFUSE_BAD_TRACEPARENT)
    _grant_to_the_mini_app()


def downgrade() -> None:
    op.execute(DROP_REFUSE_BAD_TRACEPARENT)
    # Before the column goes: an adopted table keeps its own column, without planbus's grants.
    restore_privileges(revision)
    remove_added_columns_and_constraints(revision)
    forget(revision)


def _grant_to_the_mini_app() -> None:
    """INSERT (traceparent) to `authenticated`, and SELECT where it reads column by column."""
    bind = op.get_bind()
    if not bind.execute(text(TMA_ROLE_EXISTS)).scalar():
        return  # 0002 warned already: plan_requests stays closed to the Mini App
    relation, grantees = "public.plan_requests", (TMA_ROLE,)
    before = privileges(relation, grantees)
    op.execute(f"GRANT INSERT (traceparent) ON plan_requests TO {TMA_ROLE}")
    if bind.execute(text(READS_BY_COLUMN)).scalar():
        op.execute(f"GRANT SELECT (traceparent) ON plan_requests TO {TMA_ROLE}")
    record_privilege_changes(relation, before, privileges(relation, grantees), revision)
