"""Progress: the steps written so far, readable by the request's own user.

`plan_requests.progress jsonb` holds `{"started_at": ..., "steps": [step, ...]}` while the
worker streams a plan; it is NULL otherwise. The Mini App reads it under the row-level security
of 0002_tma_rights (own rows only) and may never set it: the column-level INSERT grant leaves
it out, and a trigger refuses it with a readable error even where an operator widened the grant.

Revision ID: 0006_progress
Revises: 0005_provider_limits
"""

from __future__ import annotations

from sqlalchemy import text

from alembic import op
from planbus.schema.adoption import ensure_columns, forget, remove_added_columns_and_constraints

revision = "0006_progress"
down_revision = "0005_provider_limits"
branch_labels = None
depends_on = None

TMA_ROLE = "authenticated"

# Fires before 0002's planbus_plan_requests_tma_rights (triggers run in name order), for the
# same callers: the Mini App's role, or a request whose JWT says it is the Mini App.
REFUSE_CLIENT_PROGRESS = f"""
CREATE FUNCTION public.planbus_refuse_tma_progress() RETURNS trigger
LANGUAGE plpgsql SET search_path = '' AS $$
BEGIN
    IF NEW.progress IS NOT NULL
       AND (current_user = '{TMA_ROLE}'
            OR public.planbus_jwt_claim('role') IS NOT DISTINCT FROM '{TMA_ROLE}') THEN
        RAISE EXCEPTION 'plan_requests: progress may not be set by the client; insert only '
                        'lead_id, telegram_id and status'
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    RETURN NEW;
END
$$;

CREATE TRIGGER planbus_plan_requests_tma_progress
    BEFORE INSERT ON plan_requests
    FOR EACH ROW EXECUTE FUNCTION public.planbus_refuse_tma_progress();
"""

DROP_REFUSE_CLIENT_PROGRESS = """
DROP TRIGGER IF EXISTS planbus_plan_requests_tma_progress ON plan_requests;
DROP FUNCTION IF EXISTS public.planbus_refuse_tma_progress();
"""

# Where the Mini App reads plan_requests column by column (a grant narrowed after 0002), it
# needs this column too; a table-wide SELECT covers it already.
READS_BY_COLUMN = f"""
SELECT NOT has_table_privilege('{TMA_ROLE}', 'public.plan_requests', 'SELECT')
   AND has_column_privilege('{TMA_ROLE}', 'public.plan_requests', 'status', 'SELECT')
  FROM pg_roles WHERE rolname = '{TMA_ROLE}'
"""


def upgrade() -> None:
    ensure_columns("plan_requests", {"progress": "jsonb"}, revision)
    op.execute(REFUSE_CLIENT_PROGRESS)
    if op.get_bind().execute(text(READS_BY_COLUMN)).scalar():
        op.execute(f"GRANT SELECT (progress) ON plan_requests TO {TMA_ROLE}")


def downgrade() -> None:
    # Dropping the column drops its column-level grant with it.
    op.execute(DROP_REFUSE_CLIENT_PROGRESS)
    remove_added_columns_and_constraints(revision)
    forget(revision)
