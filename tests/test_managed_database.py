"""A Supabase/InsForge-style database: the API roles exist and get every new table by default.

The migrating role sets the platform's default privileges on an empty database before migrating,
exactly as those platforms do, and the tests then act as PostgREST does per request.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import psycopg
import pytest
from psycopg import errors, sql
from psycopg.conninfo import make_conninfo

from alembic import command
from planbus.bus import db
from planbus.ops import migrate
from tests.conftest import TestServer
from tests.helpers import Database, acting_as
from tests.processes import WorkerProcess
from tests.test_adoption import legacy_database, schema_of
from tests.test_security import WORKER_GRANTS

pytestmark = pytest.mark.anyio

ALICE, BOB = 1001, 2002
API_ROLES = ("anon", "authenticated", "service_role")
CREATED_TABLES = ("lead_registry", "scheduled_reminders", "plan_requests")
BOOKKEEPING = ("planbus_schema_origin", "planbus_settings", "alembic_version")

# What Supabase runs on every project, as the role that later runs the migrations.
SUPABASE_DEFAULTS = """
DO $$ BEGIN CREATE ROLE anon NOLOGIN; EXCEPTION WHEN duplicate_object OR unique_violation
    THEN NULL; END $$;
DO $$ BEGIN CREATE ROLE authenticated NOLOGIN; EXCEPTION WHEN duplicate_object
    OR unique_violation THEN NULL; END $$;
DO $$ BEGIN CREATE ROLE service_role NOLOGIN BYPASSRLS; EXCEPTION WHEN duplicate_object
    OR unique_violation THEN NULL; END $$;
GRANT USAGE ON SCHEMA public TO anon, authenticated, service_role;
ALTER DEFAULT PRIVILEGES IN SCHEMA public
    GRANT ALL ON TABLES TO anon, authenticated, service_role;
ALTER DEFAULT PRIVILEGES IN SCHEMA public
    GRANT ALL ON SEQUENCES TO anon, authenticated, service_role;
ALTER DEFAULT PRIVILEGES IN SCHEMA public
    GRANT ALL ON FUNCTIONS TO anon, authenticated, service_role;
"""

PLANTED = (
    "INSERT INTO planbus_schema_origin VALUES ('constraint', 'plan_requests', "
    "'x\"; CREATE TABLE public.pwned AS SELECT current_user AS who; --', '0002_tma_rights')"
)


@pytest.fixture
async def managed(empty_database_url: str, pg_server: TestServer) -> AsyncIterator[Database]:
    """An empty database with the platform's default privileges, not migrated yet."""
    async with await psycopg.AsyncConnection.connect(empty_database_url, autocommit=True) as conn:
        await conn.execute(SUPABASE_DEFAULTS)
        yield Database(conn, empty_database_url)


async def upgrade(url: str, target: str = "head") -> None:
    await anyio.to_thread.run_sync(command.upgrade, migrate.alembic_config(url), target)


async def downgrade(url: str, target: str) -> None:
    await anyio.to_thread.run_sync(command.downgrade, migrate.alembic_config(url), target)


async def refused(url: str, role: str, statement: str, telegram_id: int | None = None) -> None:
    with pytest.raises(errors.InsufficientPrivilege, match="permission denied"):
        async with acting_as(url, role, telegram_id) as conn:
            await conn.execute(statement)


async def test_anon_reads_and_writes_nothing_planbus_created(managed: Database) -> None:
    await upgrade(managed.url)
    lead = await managed.insert_lead(telegram_id=ALICE)
    await managed.insert_request(lead, telegram_id=ALICE)
    for table in CREATED_TABLES + BOOKKEEPING:
        for statement in ("SELECT * FROM {}", "DELETE FROM {}", "TRUNCATE {}"):
            await refused(managed.url, "anon", statement.format(table))
    await refused(managed.url, "anon", "INSERT INTO lead_registry (telegram_id) VALUES (1)")
    assert await managed.value("SELECT count(*) FROM lead_registry") == 1


async def test_authenticated_cannot_take_over_or_read_another_users_lead(
    managed: Database,
) -> None:
    await upgrade(managed.url)
    bob_lead = await managed.insert_lead(telegram_id=BOB)
    alice_lead = await managed.insert_lead(telegram_id=ALICE)
    await managed.conn.execute(
        "INSERT INTO scheduled_reminders (lead_id, telegram_id, step_id, due_at) "
        "VALUES (%s, %s, 1, now()), (%s, %s, 1, now())",
        (bob_lead, BOB, alice_lead, ALICE),
    )
    # The takeover the ownership rule must survive: make Bob's lead Alice's, then plan it.
    await refused(
        managed.url,
        "authenticated",
        f"UPDATE lead_registry SET telegram_id = {ALICE} WHERE id = {bob_lead}",
        ALICE,
    )
    for table in ("lead_registry", "scheduled_reminders"):
        await refused(managed.url, "authenticated", f"SELECT * FROM {table}", ALICE)
        await refused(managed.url, "authenticated", f"DELETE FROM {table}", ALICE)
    assert await managed.value("SELECT telegram_id FROM lead_registry WHERE id = %s", (bob_lead,))
    # The documented opening for a Mini App that reads its user's leads shows only their own.
    await managed.conn.execute(
        "GRANT SELECT ON lead_registry, scheduled_reminders TO authenticated"
    )
    for table in ("lead_registry", "scheduled_reminders"):
        async with acting_as(managed.url, "authenticated", ALICE) as conn:
            seen = await (await conn.execute(f"SELECT telegram_id FROM {table}")).fetchall()
        assert seen == [(ALICE,)]


async def test_no_api_role_holds_anything_but_the_mini_apps_rights(managed: Database) -> None:
    await upgrade(managed.url)
    held = await managed.fetchall(
        "SELECT c.relname, r.rolname, a.privilege_type "
        "FROM pg_class AS c CROSS JOIN LATERAL aclexplode(c.relacl) AS a "
        "JOIN pg_roles AS r ON r.oid = a.grantee "
        "WHERE c.relnamespace = 'public'::regnamespace AND r.rolname = ANY (%s) ORDER BY 1, 2, 3",
        (list(API_ROLES),),
    )
    assert [tuple(row.values()) for row in held] == [("plan_requests", "authenticated", "SELECT")]
    security = await managed.fetchall(
        "SELECT relname FROM pg_class WHERE relname = ANY (%s) AND relrowsecurity ORDER BY 1",
        (list(CREATED_TABLES),),
    )
    assert [row["relname"] for row in security] == sorted(CREATED_TABLES)
    # service_role (BYPASSRLS on Supabase) may not plant what a downgrade would run.
    await refused(
        managed.url,
        "service_role",
        "INSERT INTO planbus_schema_origin VALUES ('table', 'lead_registry', 'x', 'y')",
    )


async def test_downgrade_gives_back_exactly_the_privileges_it_took(managed: Database) -> None:
    await upgrade(managed.url, "0003_event_payload")
    before = await schema_of(managed)
    await upgrade(managed.url)
    assert await schema_of(managed) != before
    await downgrade(managed.url, "0003_event_payload")
    assert await schema_of(managed) == before


async def test_a_role_that_reads_the_bookkeeping_keeps_reading_but_may_not_write_it(
    managed: Database,
) -> None:
    # E.g. a dedicated worker role, set up before this revision: it reads alembic_version.
    await upgrade(managed.url, "0003_event_payload")
    await managed.conn.execute(
        "DO $$ BEGIN CREATE ROLE planbus_test_reader NOLOGIN; "
        "EXCEPTION WHEN duplicate_object OR unique_violation THEN NULL; END $$"
    )
    await managed.conn.execute(
        "GRANT SELECT, INSERT, UPDATE ON alembic_version, planbus_schema_origin "
        "TO planbus_test_reader"
    )
    before = await schema_of(managed)
    await upgrade(managed.url)
    for table in ("alembic_version", "planbus_schema_origin"):
        for privilege, held in (("SELECT", True), ("INSERT", False), ("UPDATE", False)):
            assert (
                await managed.value(
                    "SELECT has_table_privilege('planbus_test_reader', %s, %s)",
                    (table, privilege),
                )
                is held
            )
    await downgrade(managed.url, "0003_event_payload")
    assert await schema_of(managed) == before
    assert await managed.value(
        "SELECT has_table_privilege('planbus_test_reader', 'alembic_version', 'INSERT')"
    )


async def test_a_planted_bookkeeping_row_runs_no_sql_on_downgrade(managed: Database) -> None:
    await upgrade(managed.url)
    # Planted by someone who could once write the table (it is closed now, see above).
    await managed.conn.execute(PLANTED)
    await downgrade(managed.url, "0001_bus")
    assert await managed.value("SELECT to_regclass('public.pwned')") is None
    assert await managed.value("SELECT to_regclass('public.plan_requests')") is not None


async def test_an_adopted_lead_registry_open_to_the_api_is_named_with_the_fix(
    managed: Database, caplog: pytest.LogCaptureFixture
) -> None:
    await legacy_database(managed, managed=True)
    with caplog.at_level(logging.WARNING, logger="planbus.migrations"):
        await upgrade(managed.url)
    expected = (
        "GRANT DELETE, INSERT, TRUNCATE, UPDATE ON lead_registry TO authenticated",
        "REVOKE DELETE, INSERT, TRUNCATE, UPDATE ON lead_registry FROM anon;",
    )
    migration_log = caplog.text
    for line in expected:
        assert line in migration_log
    # The worker says it again at every start, and starts anyway.
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="planbus.bus.db"):
        await db.check_database(managed.url, migrate.head_revision())
    for line in expected:
        assert line in caplog.text
    await managed.conn.execute(
        "REVOKE INSERT, UPDATE, DELETE, TRUNCATE ON lead_registry FROM anon, authenticated"
    )
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="planbus.bus.db"):
        await db.check_database(managed.url, migrate.head_revision())
    assert "lead_registry" not in caplog.text


# -- the worker's role ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("role", "attributes", "revoke", "missing_right"),
    [
        (
            "planbus_test_rls_worker",
            "NOBYPASSRLS",
            "",
            "cannot see the rows of plan_requests: row-level security is on and the role is "
            "neither the table's owner nor BYPASSRLS",
        ),
        (
            "planbus_test_readonly_worker",
            "BYPASSRLS",
            "REVOKE UPDATE ON plan_requests FROM planbus_test_readonly_worker",
            "lacks UPDATE on plan_requests",
        ),
        (
            "planbus_test_blind_worker",
            "BYPASSRLS",
            "REVOKE SELECT ON alembic_version FROM planbus_test_blind_worker",
            "lacks SELECT on alembic_version",
        ),
    ],
)
async def test_a_worker_that_cannot_work_the_rows_refuses_to_start(
    database: Database,
    tmp_path: Path,
    role: str,
    attributes: str,
    revoke: str,
    missing_right: str,
) -> None:
    await database.conn.execute(
        sql.SQL(
            "DO $$ BEGIN CREATE ROLE {role} LOGIN; "
            "EXCEPTION WHEN duplicate_object OR unique_violation THEN NULL; END $$"
        ).format(role=sql.Identifier(role))
    )
    await database.conn.execute(
        sql.SQL("ALTER ROLE {} LOGIN NOSUPERUSER " + attributes).format(sql.Identifier(role))
    )
    await database.conn.execute(WORKER_GRANTS.format(role=role))
    if revoke:
        await database.conn.execute(revoke)
    lead = await database.insert_lead(telegram_id=ALICE)
    request_id = await database.insert_request(lead, telegram_id=ALICE)
    worker = WorkerProcess(make_conninfo(database.url, user=role), tmp_path / "worker.log")
    try:
        with pytest.raises(AssertionError, match=r"exited \(2\) before logging"):
            await worker.start()
    finally:
        await worker.aclose()
    errors_logged = [line for line in worker.log().splitlines() if "ERROR" in line]
    assert len(errors_logged) == 1, worker.log()
    assert missing_right in errors_logged[0]
    assert (await database.request(request_id))["status"] == "pending"
