"""Managed databases: tables planbus creates stay closed to API roles (placeholder: filled in by its change).

Revision ID: 0004_managed_privileges
Revises: 0003_event_payload
"""

from __future__ import annotations

revision = "0004_managed_privileges"
down_revision = "0003_event_payload"
branch_labels = None
depends_on = None


def upgrade() -> None:
    pass


def downgrade() -> None:
    pass
