"""The provider's limits, shared by every worker, and how long a request has been throttled.

- `plan_requests.throttled_claims`: the claims that ended because the provider throttled the
  call (HTTP 429 rate limit, 503 overloaded). `attempts` still counts every claim, as the
  contract says; `attempts - throttled_claims` is what `PLANBUS_MAX_ATTEMPTS` limits.
- `plan_requests.throttled_since`: when the current run of throttled claims began (NULL once
  a call was answered); the request fails only after `PLANBUS_THROTTLE_PATIENCE_SECONDS` of it.
- `planbus_provider_limits`, one row: `paused_until`, the provider's latest "retry after" as
  every worker of the database honours it, and the token bucket of the optional ceiling
  `PLANBUS_LLM_REQUESTS_PER_MINUTE` (`budget` calls left as of `budget_at`).

The table is the worker's bookkeeping: closed to PUBLIC and to the API roles.

Revision ID: 0005_provider_limits
Revises: 0004_managed_privileges
"""

from __future__ import annotations

from sqlalchemy import text

from alembic import op
from planbus.adoption import (
    ensure_columns,
    forget,
    quote,
    record,
    remove_added_columns_and_constraints,
)

revision = "0005_provider_limits"
down_revision = "0004_managed_privileges"
branch_labels = None
depends_on = None

TABLE = "planbus_provider_limits"
API_ROLES = ("anon", "authenticated", "service_role")

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
ALTER TABLE {TABLE} ENABLE ROW LEVEL SECURITY;
"""


def upgrade() -> None:
    ensure_columns("plan_requests", PLAN_REQUEST_COLUMNS, revision)
    op.execute(CREATE_TABLE)
    record("table", TABLE, TABLE, revision)
    _close_to_api_roles()


def downgrade() -> None:
    op.execute(f"DROP TABLE IF EXISTS {TABLE}")
    remove_added_columns_and_constraints(revision)
    forget(revision)


def _close_to_api_roles() -> None:
    """No API role may read or write the worker's bookkeeping, whatever the default privileges."""
    present = op.get_bind().execute(
        text("SELECT rolname FROM pg_roles WHERE rolname = ANY (:roles) ORDER BY rolname"),
        {"roles": list(API_ROLES)},
    )
    who = ", ".join(["PUBLIC", *(quote(str(row[0])) for row in present)])
    op.execute(f"REVOKE ALL ON TABLE {TABLE} FROM {who}")
