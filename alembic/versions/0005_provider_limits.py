"""The provider's limits, shared by every worker, and what each plan cost (placeholder: filled in by its change).

Revision ID: 0005_provider_limits
Revises: 0004_managed_privileges
"""

from __future__ import annotations

revision = "0005_provider_limits"
down_revision = "0004_managed_privileges"
branch_labels = None
depends_on = None


def upgrade() -> None:
    pass


def downgrade() -> None:
    pass
