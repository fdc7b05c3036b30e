"""The event function, inlinable: the completion statement calls it once per request.

Revision 0003 defined `planbus_request_event()` with `SET search_path = ''`. A SQL function
with a SET clause is never inlined: each call then starts an executor of its own and saves and
restores the setting, which cost the drain (W2) about 20 µs of database time per request. The
same function without the clause is inlined into the statement that calls it, as if the
statement spelled out `pg_notify(...)` itself. It stays as safe: every name in its body is
schema-qualified (`pg_catalog` is searched first anyway), and it is not SECURITY DEFINER, so
it runs with its caller's rights. Its privileges are kept (CREATE OR REPLACE keeps them).

Revision ID: 0007_inline_event
Revises: 0006_progress
"""

from __future__ import annotations

import re

from alembic import op

revision = "0007_inline_event"
down_revision = "0006_progress"
branch_labels = None
depends_on = None

# The contract's events channel, copied here: a revision is history and imports nothing that
# can change. A plain name: it is written into the function body as a string literal.
EVENTS_CHANNEL = "plan_request_events"
assert re.fullmatch(r"[a-z_]+", EVENTS_CHANNEL), EVENTS_CHANNEL

INLINABLE = f"""
CREATE OR REPLACE FUNCTION public.planbus_request_event(
    request_id bigint, lead_id bigint, telegram_id bigint, status text
) RETURNS void
LANGUAGE sql VOLATILE AS $$
    SELECT pg_catalog.pg_notify('{EVENTS_CHANNEL}', pg_catalog.json_build_object(
        'id', request_id, 'lead_id', lead_id, 'telegram_id', telegram_id, 'status', status
    )::pg_catalog.text)
$$
"""

# 0003's definition, as it was.
WITH_SEARCH_PATH = f"""
CREATE OR REPLACE FUNCTION public.planbus_request_event(
    request_id bigint, lead_id bigint, telegram_id bigint, status text
) RETURNS void
LANGUAGE sql VOLATILE SET search_path = '' AS $$
    SELECT pg_notify('{EVENTS_CHANNEL}', json_build_object(
        'id', request_id, 'lead_id', lead_id, 'telegram_id', telegram_id, 'status', status)::text)
$$
"""


def upgrade() -> None:
    op.execute(INLINABLE)


def downgrade() -> None:
    op.execute(WITH_SEARCH_PATH)
