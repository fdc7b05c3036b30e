"""One definition of the plan_request_events payload: the function every event goes through.

`planbus_request_event(id, lead_id, telegram_id, status)` sends the contract's four fields on
`plan_request_events`; the worker's statements call it instead of each spelling out
`pg_notify(... json_build_object(...))`. (Revision 0002's one-off statement keeps its own copy:
it is history.) Nobody but the worker may call it: a managed platform exposes functions in
`public` to its API roles, and a forged event must not be one HTTP call away.

Revision ID: 0003_event_payload
Revises: 0002_tma_rights
"""

from __future__ import annotations

import re

from sqlalchemy import text

from alembic import op
from planbus.schema.adoption import quote
from planbus.schema.privileges import API_ROLES, worker_roles

revision = "0003_event_payload"
down_revision = "0002_tma_rights"
branch_labels = None
depends_on = None

SIGNATURE = "public.planbus_request_event(bigint, bigint, bigint, text)"

# The contract's events channel, copied here: a revision is history and imports nothing that
# can change. A plain name: it is written into the function body as a string literal.
EVENTS_CHANNEL = "plan_request_events"
assert re.fullmatch(r"[a-z_]+", EVENTS_CHANNEL), EVENTS_CHANNEL

CREATE_FUNCTION = f"""
CREATE FUNCTION public.planbus_request_event(
    request_id bigint, lead_id bigint, telegram_id bigint, status text
) RETURNS void
LANGUAGE sql VOLATILE SET search_path = '' AS $$
    SELECT pg_notify('{EVENTS_CHANNEL}', json_build_object(
        'id', request_id, 'lead_id', lead_id, 'telegram_id', telegram_id, 'status', status)::text)
$$;
REVOKE ALL ON FUNCTION {SIGNATURE} FROM PUBLIC;
"""


def upgrade() -> None:
    op.execute(CREATE_FUNCTION)
    bind = op.get_bind()
    for role in API_ROLES:
        # Managed platforms grant every new function to their API roles by default.
        if bind.execute(text("SELECT to_regrole(:r) IS NOT NULL"), {"r": role}).scalar():
            op.execute(f"REVOKE ALL ON FUNCTION {SIGNATURE} FROM {quote(role)}")
    for role in worker_roles():
        op.execute(f"GRANT EXECUTE ON FUNCTION {SIGNATURE} TO {role}")


def downgrade() -> None:
    op.execute(f"DROP FUNCTION IF EXISTS {SIGNATURE}")
