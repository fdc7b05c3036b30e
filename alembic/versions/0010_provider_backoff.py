"""The provider's refusals that named no wait, counted once for every worker of the database.

A provider that refuses without saying how long to wait (HTTP 429, 503 or 529 with no
`retry-after`: vLLM, Ollama, many gateways), or a model server that cannot be reached, gets
an exponential backoff shared by every worker: `planbus_provider_limits.refusals` counts the
rounds of such refusals since the last answered call; each round doubles the shared pause
(`paused_until`), and the first answered call sets it back to 0.

The table is already closed to the API roles (0005); the worker roles keep `SELECT, UPDATE`.

Revision ID: 0010_provider_backoff
Revises: 0009_neighbours
"""

from __future__ import annotations

from alembic import op

revision = "0010_provider_backoff"
down_revision = "0009_neighbours"
branch_labels = None
depends_on = None

TABLE = "planbus_provider_limits"


def upgrade() -> None:
    op.execute(
        f"ALTER TABLE {TABLE} ADD COLUMN refusals integer NOT NULL DEFAULT 0 CHECK (refusals >= 0)"
    )


def downgrade() -> None:
    op.execute(f"ALTER TABLE {TABLE} DROP COLUMN IF EXISTS refusals")
