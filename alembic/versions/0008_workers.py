"""The live workers: one row per worker process, renewed by its heartbeat.

`planbus_workers` is the fleet as the database sees it: who is alive (a heartbeat within a few
leases), what each holds, and since when. Workers use it to share claiming among themselves
(one claim per request however many listen) and operators read it (`status`, the dashboard).
It is bookkeeping: closed to the API roles, writable by the roles that work `plan_requests`.

Revision ID: 0008_workers
Revises: 0007_inline_event
"""

from __future__ import annotations

from alembic import op
from planbus.schema.adoption import forget, record
from planbus.schema.privileges import close_to_api_roles, worker_roles

revision = "0008_workers"
down_revision = "0007_inline_event"
branch_labels = None
depends_on = None

TABLE = "planbus_workers"

CREATE_TABLE = f"""
CREATE TABLE {TABLE} (
    worker_id    text PRIMARY KEY CHECK (length(worker_id) BETWEEN 1 AND 200),
    started_at   timestamptz NOT NULL DEFAULT now(),
    heartbeat_at timestamptz NOT NULL DEFAULT now(),
    inflight     integer NOT NULL DEFAULT 0 CHECK (inflight >= 0),
    concurrency  integer NOT NULL DEFAULT 0 CHECK (concurrency >= 0),
    llm_limit    integer,  -- the adaptive limit on this worker's LLM calls in flight
    held_back    text,     -- why it claims nothing now (a pause, the limit), null when it may
    claim_pid    integer,  -- the backend of its claim connection: its claim announcements' sender
    version      text
);
CREATE INDEX {TABLE}_heartbeat ON {TABLE} (heartbeat_at);
"""


def upgrade() -> None:
    op.execute(CREATE_TABLE)
    record("table", TABLE, TABLE, revision)
    close_to_api_roles(TABLE, revision)
    for role in worker_roles():
        op.execute(f"GRANT SELECT, INSERT, UPDATE, DELETE ON {TABLE} TO {role}")


def downgrade() -> None:
    op.execute(f"DROP TABLE IF EXISTS {TABLE}")
    forget(revision)
