"""Fair turns: each user's latest claim, found by one index probe.

The claim (bus/queries.py CLAIM) serves the user who was served least recently first among
requests of the same turn; `max(claimed_at)` of one user is one probe of this index instead of
a walk over the user's whole history.

Revision ID: 0011_fleet
Revises: 0010_provider_backoff
"""

from __future__ import annotations

from alembic import op

revision = "0011_fleet"
down_revision = "0010_provider_backoff"
branch_labels = None
depends_on = None

INDEX = "planbus_plan_requests_served"


def upgrade() -> None:
    op.execute(f"CREATE INDEX {INDEX} ON plan_requests (telegram_id, claimed_at)")


def downgrade() -> None:
    op.execute(f"DROP INDEX IF EXISTS {INDEX}")
