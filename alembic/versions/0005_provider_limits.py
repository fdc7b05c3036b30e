"""The provider's limits, shared by every worker, and how long a request has been throttled.

- `plan_requests.throttled_claims`: the claims that ended because the provider throttled the
  call (HTTP 429 rate limit, 503 overloaded). `attempts` still counts every claim, as the
  contract says; `attempts - throttled_claims` is what `PLANBUS_MAX_ATTEMPTS` limits.
- `plan_requests.throttled_since`: when the current run of throttled claims began (NULL once
  a call was answered); the request fails only after `PLANBUS_THROTTLE_PATIENCE_SECONDS` of it.
- `planbus_provider_limits`, one row: `paused_until`, the provider's latest "retry after" as
  every worker of the database honours it, and the token bucket of the optional ceiling
  `PLANBUS_LLM_REQUESTS_PER_MINUTE` (`budget` calls left as of `budget_at`).

The table is the worker's: PUBLIC and the API roles hold nothing on it and row-level security is
on; a dedicated worker role needs `SELECT, UPDATE` on it (docs/security.md).

Revision ID: 0005_provider_limits
Revises: 0004_managed_privileges
"""

from __future__ import annotations

from alembic import op
from planbus.schema.adoption import (
    ensure_columns,
    forget,
    record,
    remove_added_columns_and_constraints,
)
from planbus.schema.privileges import close_to_api_roles, worker_roles

revision = "0005_provider_limits"
down_revision = "0004_managed_privileges"
branch_labels = None
depends_on = None

TABLE = "planbus_provider_limits"

PLAN_REQUEST_COLUMNS = {
    "throttled_claims": "integer NOT NULL DEFAULT 0",
    "throttled_since": "timestamptz",
}

CREATE_TABLE = f"""
CREATE TABLE {TABLE} (
    singleton    boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    paused_until timestamptz,
    budget       float8,
    budget_at    timestamptz
);
INSERT INTO {TABLE} DEFAULT VALUES;
"""


TMA_ROLE = "authenticated"

# The column-level grant of 0002 already refuses the new columns to the Mini App; this holds the
# rule where an operator widened the grant (GRANT ALL ... TO authenticated), as 0002's trigger
# does for its columns. It fires before 0002's planbus_plan_requests_tma_rights (name order).
REFUSE_CLIENT_THROTTLING = f"""
CREATE FUNCTION public.planbus_refuse_tma_throttling() RETURNS trigger
LANGUAGE plpgsql SET search_path = '' AS $$
BEGIN
    IF (NEW.throttled_claims IS DISTINCT FROM 0 OR NEW.throttled_since IS NOT NULL)
       AND (current_user = '{TMA_ROLE}'
            OR public.planbus_jwt_claim('role') IS NOT DISTINCT FROM '{TMA_ROLE}') THEN
        RAISE EXCEPTION 'plan_requests: throttled_claims, throttled_since may not be set by the '
                        'client; insert only lead_id, telegram_id and status'
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    RETURN NEW;
END
$$;
REVOKE ALL ON FUNCTION public.planbus_refuse_tma_throttling() FROM PUBLIC;

CREATE TRIGGER planbus_plan_requests_tma_provider
    BEFORE INSERT ON plan_requests
    FOR EACH ROW EXECUTE FUNCTION public.planbus_refuse_tma_throttling();
"""

DROP_REFUSE_CLIENT_THROTTLING = """
DROP TRIGGER IF EXISTS planbus_plan_requests_tma_provider ON plan_requests;
DROP FUNCTION IF EXISTS public.planbus_refuse_tma_throttling();
"""


def upgrade() -> None:
    ensure_columns("plan_requests", PLAN_REQUEST_COLUMNS, revision)
    op.execute(REFUSE_CLIENT_THROTTLING)
    op.execute(CREATE_TABLE)
    record("table", TABLE, TABLE, revision)
    close_to_api_roles(TABLE, revision)
    for role in worker_roles():
        op.execute(f"GRANT SELECT, UPDATE ON {TABLE} TO {role}")


def downgrade() -> None:
    op.execute(f"DROP TABLE IF EXISTS {TABLE}")
    op.execute(DROP_REFUSE_CLIENT_THROTTLING)
    remove_added_columns_and_constraints(revision)
    forget(revision)
