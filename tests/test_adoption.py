"""Adopting an existing deployment: its tables and rows are kept, and the worker finishes them."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

import anyio
import psycopg
import pytest
from psycopg import errors

from planbus.ops import migrate
from tests.helpers import Database, acting_as, running_worker

pytestmark = pytest.mark.anyio

LEGACY_TABLES = ("lead_registry", "scheduled_reminders", "plan_requests")

# The older deployment, as the contract describes it: an integer lead id, the reminders'
# columns, and a plan_requests table with only the first seven columns.
LEGACY_SCHEMA = """
CREATE TABLE lead_registry (
    id                serial PRIMARY KEY,
    telegram_id       bigint NOT NULL,
    prospect_name     text,
    prospect_title    text,
    prospect_company  text,
    prospect_analysis text,
    closing_strategy  text,
    original_context  text,
    web_research      text,
    engagement_plan   jsonb,
    next_followup     timestamptz,
    created_at        timestamptz DEFAULT now(),
    updated_at        timestamptz DEFAULT now()
);
CREATE TABLE scheduled_reminders (
    id               serial PRIMARY KEY,
    lead_id          integer REFERENCES lead_registry (id) ON DELETE CASCADE,
    telegram_id      bigint,
    step_id          integer,
    due_at           timestamptz,
    status           text DEFAULT 'pending',
    snooze_count     integer DEFAULT 0,
    reminder_count   integer DEFAULT 0,
    last_reminded_at timestamptz,
    draft_text       text,
    completed_at     timestamptz,
    created_at       timestamptz DEFAULT now(),
    updated_at       timestamptz DEFAULT now()
);
"""

LEGACY_PLAN_REQUESTS = {
    # What such a table most likely looks like.
    "plain": """
CREATE TABLE plan_requests (
    id          serial PRIMARY KEY,
    lead_id     integer NOT NULL REFERENCES lead_registry (id) ON DELETE CASCADE,
    telegram_id bigint NOT NULL,
    status      text NOT NULL DEFAULT 'pending',
    result      jsonb,
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now()
);
""",
    # No foreign key, no NOT NULL, no status default.
    "bare": """
CREATE TABLE plan_requests (
    id          serial PRIMARY KEY,
    lead_id     integer,
    telegram_id bigint,
    status      text,
    result      jsonb,
    created_at  timestamptz DEFAULT now(),
    updated_at  timestamptz DEFAULT now()
);
""",
}

# A managed platform's defaults (every table, sequence and function, old or new, granted to anon
# and authenticated) and an older Mini App's own wide-open policy.
MANAGED_PLATFORM = """
DO $$ BEGIN CREATE ROLE anon NOLOGIN; EXCEPTION WHEN duplicate_object OR unique_violation
    THEN NULL; END $$;
DO $$ BEGIN CREATE ROLE authenticated NOLOGIN; EXCEPTION WHEN duplicate_object
    OR unique_violation THEN NULL; END $$;
GRANT ALL ON ALL TABLES IN SCHEMA public TO anon, authenticated;
GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA public TO anon, authenticated;
ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT ALL ON TABLES TO anon, authenticated;
ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT ALL ON SEQUENCES TO anon, authenticated;
ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT EXECUTE ON FUNCTIONS TO anon, authenticated;
GRANT UPDATE (status) ON plan_requests TO authenticated;
ALTER TABLE plan_requests ENABLE ROW LEVEL SECURITY;
CREATE POLICY legacy_anyone ON plan_requests FOR ALL TO anon, authenticated
    USING (true) WITH CHECK (true);
"""

LEGACY_ROWS = """
INSERT INTO lead_registry (telegram_id, prospect_name, prospect_company)
SELECT 700 + n, 'Lead ' || n, 'Company ' || n FROM generate_series(1, 6) AS n;
INSERT INTO scheduled_reminders (lead_id, telegram_id, step_id, due_at, status, draft_text)
VALUES (1, 701, 1, now(), 'pending', 'old step'), (2, 702, 1, now(), 'sent', 'old step');
INSERT INTO plan_requests (lead_id, telegram_id, status, result, created_at) VALUES
    (1, 701, 'pending',    NULL, now() - interval '3 hours'),
    (2, 702, 'processing', NULL, now() - interval '2 hours'),
    (3, 703, 'completed',  '{"plan": [], "step_count": 0}', now() - interval '1 day'),
    (4, 704, 'failed',     '{"error": "The model was down."}', now() - interval '1 day'),
    (5, 705, 'pending',    NULL, now() - interval '1 minute');
"""


async def execute(url: str, script: str) -> None:
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        await conn.execute(script)


@pytest.fixture
async def connect(empty_database_url: str) -> AsyncIterator[Database]:
    async with await psycopg.AsyncConnection.connect(empty_database_url, autocommit=True) as conn:
        yield Database(conn, empty_database_url)


async def legacy_database(
    database: Database, flavour: str = "plain", managed: bool = False
) -> None:
    await execute(database.url, LEGACY_SCHEMA + LEGACY_PLAN_REQUESTS[flavour])
    if managed:
        await execute(database.url, MANAGED_PLATFORM)
    await execute(database.url, LEGACY_ROWS)


async def rows(database: Database, table: str) -> list[dict[str, Any]]:
    return await database.fetchall(f"SELECT * FROM {table} ORDER BY id")


async def upgrade(url: str) -> None:
    await anyio.to_thread.run_sync(migrate.upgrade, url)


async def downgrade(url: str, target: str = "base") -> None:
    await anyio.to_thread.run_sync(migrate.downgrade, url, target)


async def schema_of(database: Database) -> dict[str, Any]:
    """Everything a downgrade must put back as it was: columns, constraints, indexes,
    triggers, privileges, policies, row-level security and functions."""
    tables = list(LEGACY_TABLES)
    queries = {
        "columns": """
            SELECT table_name, column_name, data_type, is_nullable, column_default
              FROM information_schema.columns
             WHERE table_schema = 'public' AND table_name = ANY (%(t)s)
             ORDER BY table_name, ordinal_position""",
        "constraints": """
            SELECT conrelid::regclass::text, conname, pg_get_constraintdef(oid), convalidated
              FROM pg_constraint WHERE conrelid::regclass::text = ANY (%(t)s) ORDER BY 1, 2""",
        "indexes": """
            SELECT indexdef FROM pg_indexes
             WHERE schemaname = 'public' AND tablename = ANY (%(t)s) ORDER BY 1""",
        "triggers": """
            SELECT tgrelid::regclass::text, tgname FROM pg_trigger
             WHERE NOT tgisinternal AND tgrelid::regclass::text = ANY (%(t)s) ORDER BY 1, 2""",
        "privileges": """
            SELECT c.relname, '' AS col, a.grantee::regrole::text, a.privilege_type
              FROM pg_class AS c,
                   aclexplode(coalesce(c.relacl, acldefault(
                       CASE c.relkind WHEN 'S' THEN 's' ELSE 'r' END::"char", c.relowner)))
                   AS a
             WHERE c.relnamespace = 'public'::regnamespace AND c.relkind IN ('r', 'S')
               AND c.relname NOT LIKE 'alembic_version%%'
            UNION
            SELECT c.relname, att.attname, a.grantee::regrole::text, a.privilege_type
              FROM pg_class AS c JOIN pg_attribute AS att ON att.attrelid = c.oid,
                   aclexplode(att.attacl) AS a
             WHERE c.relnamespace = 'public'::regnamespace AND c.relkind = 'r'
             ORDER BY 1, 2, 3, 4""",
        "policies": "SELECT tablename, policyname, permissive, roles, cmd, qual, with_check "
        "FROM pg_policies WHERE schemaname = 'public' ORDER BY 1, 2",
        "row_security": "SELECT relname, relrowsecurity, relforcerowsecurity FROM pg_class "
        "WHERE relname = ANY (%(t)s) ORDER BY 1",
        "functions": "SELECT proname FROM pg_proc "
        "WHERE pronamespace = 'public'::regnamespace ORDER BY 1",
        "relations": "SELECT relname, relkind FROM pg_class "
        "WHERE relnamespace = 'public'::regnamespace AND relname NOT LIKE 'alembic_version%%' "
        "ORDER BY 1",
    }
    return {name: await database.fetchall(query, {"t": tables}) for name, query in queries.items()}


# -- adoption ----------------------------------------------------------------------------------


async def test_adopted_rows_are_kept_and_the_old_pending_and_processing_ones_are_finished(
    connect: Database,
) -> None:
    database = connect
    await legacy_database(database)
    before = {table: await rows(database, table) for table in LEGACY_TABLES}

    await upgrade(database.url)

    after = await rows(database, "plan_requests")
    assert len(after) == len(before["plan_requests"])
    for old, new in zip(before["plan_requests"], after, strict=True):
        assert {key: new[key] for key in old} == old  # every old column kept as it was
        assert new["attempts"] == 0
    assert await rows(database, "lead_registry") == before["lead_registry"]
    assert await rows(database, "scheduled_reminders") == before["scheduled_reminders"]

    assert [row["status"] for row in after] == [
        "pending",
        "processing",
        "completed",
        "failed",
        "pending",
    ]
    async with running_worker(database.url, sweep_seconds=0.2):
        # The sweep at start-up finds the processing row without a lease and hands it on.
        done = await database.wait_all([1, 2, 5])
    assert [row["status"] for row in done] == ["completed", "completed", "completed"]
    assert done[1]["attempts"] == 1
    untouched = await database.fetchall(
        "SELECT id, status, result, attempts FROM plan_requests WHERE id IN (3, 4) ORDER BY id"
    )
    assert untouched == [
        {"id": 3, "status": "completed", "result": {"plan": [], "step_count": 0}, "attempts": 0},
        {"id": 4, "status": "failed", "result": {"error": "The model was down."}, "attempts": 0},
    ]
    # The old open reminders of a re-planned lead were cancelled, the new ones scheduled.
    assert (await database.reminders(1))[0]["status"] == "cancelled"
    assert len(await database.reminders(1, "pending")) == done[0]["result"]["step_count"]

    await downgrade(database.url)
    kept = await rows(database, "plan_requests")
    assert [row["id"] for row in kept] == [row["id"] for row in before["plan_requests"]]
    assert set(kept[0]) == set(before["plan_requests"][0])  # the original columns only
    assert [row["status"] for row in kept][:2] == ["completed", "completed"]


async def test_the_tma_can_use_an_adopted_table_with_a_serial_id(connect: Database) -> None:
    await legacy_database(connect, managed=True)
    await upgrade(connect.url)
    # Lead 6 (user 706) has no request yet; a serial id needs USAGE on its sequence.
    async with acting_as(connect.url, "authenticated", 706) as conn:
        cursor = await conn.execute(
            "INSERT INTO plan_requests (lead_id, telegram_id) VALUES (6, 706) RETURNING id"
        )
        new_id = (await cursor.fetchone() or [None])[0]
    async with acting_as(connect.url, "authenticated", 706) as conn:
        seen = await (await conn.execute("SELECT id FROM plan_requests")).fetchall()
    # The older Mini App's wide-open policy no longer shows other users' rows.
    assert seen == [(new_id,)]
    with pytest.raises(errors.InsufficientPrivilege):
        async with acting_as(connect.url, "authenticated", 706) as conn:
            await conn.execute(
                "UPDATE plan_requests SET status = 'pending' WHERE id = %s", (new_id,)
            )
    with pytest.raises(errors.InsufficientPrivilege, match="permission denied"):
        async with acting_as(connect.url, "anon") as conn:
            await conn.execute("SELECT * FROM plan_requests")
    # planbus's bookkeeping is closed to both, whatever the platform grants by default.
    for role in ("anon", "authenticated"):
        for table in ("planbus_schema_origin", "alembic_version"):
            with pytest.raises(errors.InsufficientPrivilege, match="permission denied"):
                async with acting_as(connect.url, role, 706) as conn:
                    await conn.execute(f"DELETE FROM {table}")
    assert not await connect.value(
        "SELECT has_function_privilege('anon', 'planbus_caller_owns_lead(bigint)', 'EXECUTE')"
    )


@pytest.mark.parametrize(
    ("flavour", "managed"), [("plain", False), ("bare", False), ("plain", True)]
)
async def test_downgrade_puts_an_adopted_database_back_as_it_was(
    connect: Database, flavour: str, managed: bool
) -> None:
    await legacy_database(connect, flavour, managed)
    schema = await schema_of(connect)
    data = {table: await rows(connect, table) for table in LEGACY_TABLES}

    await upgrade(connect.url)
    assert await schema_of(connect) != schema
    await downgrade(connect.url)

    assert await schema_of(connect) == schema
    assert {table: await rows(connect, table) for table in LEGACY_TABLES} == data


async def test_duplicate_active_requests_keep_the_oldest_and_fail_the_rest_with_a_reason(
    connect: Database, caplog: pytest.LogCaptureFixture
) -> None:
    await legacy_database(connect)
    await execute(
        connect.url,
        """
        INSERT INTO plan_requests (id, lead_id, telegram_id, status, created_at) VALUES
            (11, 1, 701, 'pending',    now()),
            (12, 2, 702, 'pending',    now()),
            (13, 2, 702, 'processing', now());
        SELECT setval('plan_requests_id_seq', 20);
        """,
    )
    with caplog.at_level(logging.WARNING, logger="planbus.migrations"):
        await upgrade(connect.url)
    assert "3 newer duplicate active requests failed" in caplog.text
    all_rows = {row["id"]: row for row in await rows(connect, "plan_requests")}
    assert len(all_rows) == 8
    assert all_rows[1]["status"] == "pending" and all_rows[2]["status"] == "processing"
    for duplicate, kept, lead in ((11, 1, 1), (12, 2, 2), (13, 2, 2)):
        assert all_rows[duplicate]["status"] == "failed"
        error = all_rows[duplicate]["result"]["error"]
        assert f"Lead {lead} already had an active request ({kept})" in error
        assert "\n" not in error


async def test_legacy_rows_that_break_the_new_rules_are_kept_and_new_ones_refused(
    connect: Database, caplog: pytest.LogCaptureFixture
) -> None:
    await legacy_database(connect, "bare")
    await execute(
        connect.url,
        """
        INSERT INTO plan_requests (id, lead_id, telegram_id, status) VALUES
            (30, 999, 799, 'pending'),     -- its lead was deleted long ago
            (31, 6, 706, 'archived'),      -- a status the contract does not know
            (32, NULL, NULL, 'completed'); -- nothing to plan
        """,
    )
    with caplog.at_level(logging.WARNING, logger="planbus.migrations"):
        await upgrade(connect.url)
    for constraint in (
        "planbus_plan_requests_lead_id_fkey",
        "planbus_plan_requests_status_check",
        "planbus_plan_requests_required_check",
    ):
        assert f"VALIDATE CONSTRAINT {constraint}" in caplog.text
    assert len(await rows(connect, "plan_requests")) == 8
    async with running_worker(connect.url):
        orphan = await connect.wait_for(30)
    assert orphan["status"] == "failed" and "999" in orphan["result"]["error"]
    with pytest.raises(errors.CheckViolation):
        await connect.conn.execute(
            "INSERT INTO plan_requests (lead_id, telegram_id, status) VALUES (6, 706, 'archived')"
        )
    with pytest.raises(errors.CheckViolation):
        await connect.conn.execute(
            "INSERT INTO plan_requests (lead_id, telegram_id) VALUES (6, NULL)"
        )
    with pytest.raises(errors.ForeignKeyViolation):
        await connect.conn.execute(
            "INSERT INTO plan_requests (lead_id, telegram_id) VALUES (998, 706)"
        )


# -- an empty database, and the command operators run ----------------------------------------


async def test_on_an_empty_database_downgrade_removes_everything_and_upgrade_works_again(
    connect: Database,
) -> None:
    empty = await schema_of(connect)
    await upgrade(connect.url)
    assert {r["relname"] for r in (await schema_of(connect))["relations"]} >= set(LEGACY_TABLES)
    await downgrade(connect.url)
    assert await schema_of(connect) == empty
    await upgrade(connect.url)
    lead = await connect.insert_lead(telegram_id=9)
    async with running_worker(connect.url):
        row = await connect.wait_for(await connect.insert_request(lead, telegram_id=9))
    assert row["status"] == "completed"
