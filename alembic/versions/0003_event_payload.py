"""One definition of the plan_request_events payload (placeholder: filled in by its change).

Revision ID: 0003_event_payload
Revises: 0002_tma_rights
"""

from __future__ import annotations

revision = "0003_event_payload"
down_revision = "0002_tma_rights"
branch_labels = None
depends_on = None


def upgrade() -> None:
    pass


def downgrade() -> None:
    pass
