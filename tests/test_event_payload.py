"""plan_request_events go through one database function that only the worker may call."""

from __future__ import annotations

import json
from collections.abc import Iterator

import anyio
import psycopg
import pytest
from psycopg import errors, sql
from psycopg.conninfo import make_conninfo

from planbus.bus import db
from planbus.errors import ConfigurationError
from planbus.ops import migrate
from tests.helpers import Database, acting_as, listening_events, running_worker

pytestmark = pytest.mark.anyio

SEND = "SELECT public.planbus_request_event(1, 2, 3, 'completed')"
ROLE = "planbus_test_events"
WORKER_GRANTS = [
    ("plan_requests", "SELECT, UPDATE"),
    ("lead_registry", "SELECT, UPDATE"),
    ("scheduled_reminders", "SELECT, INSERT, UPDATE"),
    ("alembic_version", "SELECT"),
    ("planbus_provider_limits", "SELECT, UPDATE"),
    ("planbus_workers", "SELECT, INSERT, UPDATE, DELETE"),
]


@pytest.fixture
def plain_role(database_url: str) -> Iterator[str]:
    """A LOGIN role with BYPASSRLS and table grants, but no grant on the event function."""
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(
            sql.SQL(
                "DO $$ BEGIN CREATE ROLE {} LOGIN BYPASSRLS; "
                "EXCEPTION WHEN duplicate_object OR unique_violation THEN NULL; END $$"
            ).format(sql.Identifier(ROLE))
        )
        # What a dedicated worker role is granted (docs/security.md), less the event function.
        for table, rights in WORKER_GRANTS:
            conn.execute(
                sql.SQL("GRANT {} ON {} TO {}").format(
                    sql.SQL(rights), sql.Identifier(table), sql.Identifier(ROLE)
                )
            )
    yield make_conninfo(database_url, user=ROLE)


async def test_a_completed_request_sends_the_contracts_four_fields(database: Database) -> None:
    lead = await database.insert_lead(telegram_id=77)
    async with listening_events(database.url) as events, running_worker(database.url):
        request_id = await database.insert_request(lead, telegram_id=77)
        await events.wait_for(request_id)
    (payload,) = events.for_request(request_id)
    assert payload == {
        "id": request_id,
        "lead_id": lead,
        "telegram_id": 77,
        "status": "completed",
    }


@pytest.mark.parametrize("role", ["anon", "authenticated"])
async def test_api_roles_may_not_send_request_events(database: Database, role: str) -> None:
    with pytest.raises(errors.InsufficientPrivilege):
        async with acting_as(database.url, role, telegram_id=77) as conn:
            await conn.execute(SEND)


async def test_any_other_role_may_not_send_them_either(plain_role: str) -> None:
    async with await psycopg.AsyncConnection.connect(plain_role) as conn:
        with pytest.raises(errors.InsufficientPrivilege):
            await conn.execute(SEND)


async def test_a_worker_role_without_the_grant_is_refused_at_start_up(plain_role: str) -> None:
    with pytest.raises(ConfigurationError, match=r"GRANT EXECUTE ON FUNCTION public\.planbus_"):
        await db.check_database(plain_role, migrate.head_revision())


async def test_a_role_that_could_update_requests_before_the_upgrade_keeps_working(
    database: Database, plain_role: str
) -> None:
    await anyio.to_thread.run_sync(migrate.downgrade, database.url, "0002_tma_rights")
    await anyio.to_thread.run_sync(migrate.upgrade, database.url)
    await db.check_database(plain_role, migrate.head_revision())
    async with await psycopg.AsyncConnection.connect(plain_role, autocommit=True) as conn:
        await conn.execute("LISTEN plan_request_events")
        await conn.execute(SEND)
        notify = await anext(conn.notifies(timeout=5))
    assert json.loads(notify.payload)["status"] == "completed"


async def test_the_event_function_is_inlined_into_the_statements_that_call_it(
    database: Database,
) -> None:
    # A SQL function with a SET clause runs an executor of its own per call (revision 0007).
    rows = await database.fetchall("EXPLAIN (VERBOSE, COSTS OFF) " + SEND)
    plan = "\n".join(row["QUERY PLAN"] for row in rows)
    assert "pg_notify" in plan, plan
    assert "planbus_request_event" not in plan, plan
