"""Progress: the steps written so far, readable by the request's own user (placeholder: filled in by its change).

Revision ID: 0006_progress
Revises: 0005_provider_limits
"""

from __future__ import annotations

revision = "0006_progress"
down_revision = "0005_provider_limits"
branch_labels = None
depends_on = None


def upgrade() -> None:
    pass


def downgrade() -> None:
    pass
