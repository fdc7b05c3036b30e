"""The TMA's rights, tried as PostgREST runs a request: SET LOCAL ROLE and the JWT's claims."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterator
from typing import Any

import anyio
import psycopg
import pytest
from psycopg import errors, sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from planbus.bus import db
from planbus.ops import migrate
from tests.conftest import TestServer
from tests.helpers import Database, acting_as, running_worker

pytestmark = pytest.mark.anyio

ALICE, BOB = 1001, 2002

# What a dedicated worker role needs besides BYPASSRLS (or owning the tables); docs/security.md's
# "The worker's role" section shows the same statements.
WORKER_GRANTS = """
GRANT SELECT, UPDATE ON plan_requests, lead_registry TO {role};
GRANT SELECT, INSERT, UPDATE ON scheduled_reminders TO {role};
GRANT SELECT ON alembic_version TO {role};
GRANT SELECT, UPDATE ON planbus_provider_limits TO {role};
GRANT SELECT, INSERT, UPDATE, DELETE ON planbus_workers TO {role};
GRANT EXECUTE ON FUNCTION public.planbus_request_event(bigint, bigint, bigint, text) TO {role};
"""


async def tma_insert(url: str, caller: int, lead_id: int, **columns: Any) -> int:
    """INSERT ... RETURNING id as the Mini App of user `caller`; committed."""
    values = {"lead_id": lead_id, "telegram_id": caller, **columns}
    statement = sql.SQL("INSERT INTO plan_requests ({}) VALUES ({}) RETURNING id").format(
        sql.SQL(", ").join(map(sql.Identifier, values)),
        sql.SQL(", ").join(sql.Placeholder() * len(values)),
    )
    async with acting_as(url, "authenticated", caller) as conn:
        row = await (await conn.execute(statement, list(values.values()))).fetchone()
    assert row is not None
    return int(row[0])


async def tma_select(url: str, telegram_id: int, where: str = "true") -> list[tuple[Any, ...]]:
    async with acting_as(url, "authenticated", telegram_id) as conn:
        cursor = await conn.execute(f"SELECT id, lead_id, status FROM plan_requests WHERE {where}")
        return await cursor.fetchall()


async def request_count(database: Database) -> int:
    return int(await database.value("SELECT count(*) FROM plan_requests"))


# -- what the TMA may do ------------------------------------------------------------------------


async def test_tma_inserts_its_own_request_and_reads_it_until_completed(database: Database) -> None:
    lead = await database.insert_lead(telegram_id=ALICE)
    async with running_worker(database.url):
        request_id = await tma_insert(database.url, ALICE, lead)
        await database.wait_for(request_id)
    rows = await tma_select(database.url, ALICE)
    assert rows == [(request_id, lead, "completed")]
    async with acting_as(database.url, "authenticated", ALICE) as conn:
        result = await (
            await conn.execute("SELECT result FROM plan_requests WHERE id = %s", (request_id,))
        ).fetchone()
    assert result is not None and result[0]["step_count"] >= 5


async def test_tma_may_send_status_pending_explicitly(database: Database) -> None:
    lead = await database.insert_lead(telegram_id=ALICE)
    request_id = await tma_insert(database.url, ALICE, lead, status="pending")
    assert (await database.request(request_id))["status"] == "pending"


async def test_tma_sees_only_its_own_requests(database: Database) -> None:
    alice_lead = await database.insert_lead(telegram_id=ALICE)
    bob_lead = await database.insert_lead(telegram_id=BOB)
    alice_request = await database.insert_request(alice_lead, telegram_id=ALICE)
    bob_request = await database.insert_request(bob_lead, telegram_id=BOB)
    assert await tma_select(database.url, ALICE) == [(alice_request, alice_lead, "pending")]
    assert await tma_select(database.url, BOB) == [(bob_request, bob_lead, "pending")]
    # Asking for someone else's row by id finds nothing rather than an error.
    assert await tma_select(database.url, ALICE, f"id = {bob_request}") == []


async def test_tma_without_identity_sees_nothing_and_may_not_insert(database: Database) -> None:
    lead = await database.insert_lead(telegram_id=ALICE)
    await database.insert_request(lead, telegram_id=ALICE)
    for claims in (None, {"role": "authenticated"}, {"telegram_id": "not a number"}):
        async with acting_as(database.url, "authenticated", claims=claims) as conn:
            rows = await (await conn.execute("SELECT id FROM plan_requests")).fetchall()
        assert rows == []
        with pytest.raises(errors.InsufficientPrivilege, match="no telegram_id claim"):
            async with acting_as(database.url, "authenticated", claims=claims) as conn:
                await conn.execute(
                    "INSERT INTO plan_requests (lead_id, telegram_id) VALUES (%s, %s)",
                    (lead, ALICE),
                )


async def test_the_ownership_check_needs_no_rights_on_lead_registry(database: Database) -> None:
    lead = await database.insert_lead(telegram_id=ALICE)
    for role in ("authenticated", "anon"):
        held = await database.value(
            "SELECT has_table_privilege(%s, 'lead_registry', 'SELECT, INSERT, UPDATE, DELETE')",
            (role,),
        )
        assert held is False
    request_id = await tma_insert(database.url, ALICE, lead)
    assert (await database.request(request_id))["lead_id"] == lead


async def test_grants_are_exactly_what_the_tma_needs(database: Database) -> None:
    table = await database.fetchall(
        "SELECT grantee, privilege_type FROM information_schema.role_table_grants "
        "WHERE table_name = 'plan_requests' AND grantee IN ('authenticated', 'anon', 'PUBLIC') "
        "ORDER BY 1, 2"
    )
    assert [(r["grantee"], r["privilege_type"]) for r in table] == [("authenticated", "SELECT")]
    columns = await database.fetchall(
        "SELECT column_name FROM information_schema.column_privileges "
        "WHERE table_name = 'plan_requests' AND grantee = 'authenticated' "
        "AND privilege_type = 'INSERT' ORDER BY 1"
    )
    assert [r["column_name"] for r in columns] == [
        "lead_id",
        "status",
        "telegram_id",
        "traceparent",
    ]
    for privilege in ("UPDATE", "DELETE", "TRUNCATE"):
        assert not await database.value(
            "SELECT has_table_privilege('authenticated', 'plan_requests', %s)", (privilege,)
        )


async def test_grants_are_exact_even_where_the_platform_grants_everything_by_default(
    empty_database_url: str, template_database: str
) -> None:
    # Supabase and InsForge grant every new table, sequence and function to anon and
    # authenticated; the migration takes back all but the TMA's rights.
    async with await psycopg.AsyncConnection.connect(empty_database_url, autocommit=True) as conn:
        for kind in ("TABLES", "SEQUENCES", "FUNCTIONS"):
            privilege = "EXECUTE" if kind == "FUNCTIONS" else "ALL"
            await conn.execute(
                f"ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT {privilege} ON {kind} "
                "TO anon, authenticated"
            )
    await anyio.to_thread.run_sync(migrate.upgrade, empty_database_url)
    async with await psycopg.AsyncConnection.connect(empty_database_url, autocommit=True) as conn:
        database = Database(conn, empty_database_url)
        granted = await database.fetchall(
            "SELECT table_name, grantee, privilege_type FROM information_schema.role_table_grants "
            "WHERE grantee IN ('anon', 'authenticated', 'PUBLIC') AND table_name IN "
            "('plan_requests', 'planbus_schema_origin', 'alembic_version') ORDER BY 1, 2, 3"
        )
        assert [tuple(row.values()) for row in granted] == [
            ("plan_requests", "authenticated", "SELECT")
        ]
        assert not await database.value(
            "SELECT has_function_privilege('anon', 'planbus_caller_owns_lead(bigint)', 'EXECUTE')"
        )
        lead = await database.insert_lead(telegram_id=ALICE)
    request_id = await tma_insert(empty_database_url, ALICE, lead)
    assert await tma_select(empty_database_url, ALICE) == [(request_id, lead, "pending")]
    with pytest.raises(errors.InsufficientPrivilege):
        await tma_insert(empty_database_url, ALICE, lead, attempts=0)
    with pytest.raises(errors.InsufficientPrivilege, match="permission denied"):
        async with acting_as(empty_database_url, "anon") as anon:
            await anon.execute("SELECT 1 FROM plan_requests")


# -- what the TMA may not do, and what it is told -----------------------------------------------


async def test_tma_may_not_request_for_another_telegram_id(database: Database) -> None:
    bob_lead = await database.insert_lead(telegram_id=BOB)
    with pytest.raises(errors.InsufficientPrivilege, match=r"telegram_id 2002 is not the caller"):
        await tma_insert(database.url, ALICE, bob_lead, telegram_id=BOB)
    assert await request_count(database) == 0


@pytest.mark.parametrize("whose", ["another user's", "a missing"])
async def test_tma_may_not_request_for_a_lead_that_is_not_its_own(
    database: Database, whose: str
) -> None:
    lead = await database.insert_lead(telegram_id=BOB) if whose == "another user's" else 987654
    # The same answer either way, so the check reveals nothing about other users' leads.
    with pytest.raises(errors.InsufficientPrivilege, match=f"lead {lead} is not one of the caller"):
        await tma_insert(database.url, ALICE, lead)
    assert await request_count(database) == 0


@pytest.mark.parametrize("status", ["processing", "completed", "failed", "done", None])
async def test_tma_may_not_set_a_status_other_than_pending(
    database: Database, status: str | None
) -> None:
    lead = await database.insert_lead(telegram_id=ALICE)
    with pytest.raises(errors.InsufficientPrivilege, match="status must be omitted or 'pending'"):
        await tma_insert(database.url, ALICE, lead, status=status)
    assert await request_count(database) == 0


WORKER_SET_VALUES: dict[str, Any] = {
    "id": 5,
    "attempts": 0,  # even the default value: the client may not name the column at all
    "result": '{"plan": [], "step_count": 0}',
    "created_at": "2020-01-01T00:00:00Z",
    "updated_at": "2020-01-01T00:00:00Z",
    "run_after": "2999-01-01T00:00:00Z",
    "claim_token": str(uuid.uuid4()),
    "worker_id": "me:1",
    "lease_expires_at": "2999-01-01T00:00:00Z",
    "claimed_at": "2020-01-01T00:00:00Z",
    "finished_at": "2020-01-01T00:00:00Z",
    "last_error": "nothing",
}


@pytest.mark.parametrize("column", sorted(WORKER_SET_VALUES))
async def test_tma_may_not_set_any_other_column(database: Database, column: str) -> None:
    # The column-level grant refuses it before any trigger runs: PostgreSQL checks privileges
    # when the statement starts, so this is what PostgREST relays (403, code 42501).
    lead = await database.insert_lead(telegram_id=ALICE)
    with pytest.raises(errors.InsufficientPrivilege, match="permission denied for table"):
        await tma_insert(database.url, ALICE, lead, **{column: WORKER_SET_VALUES[column]})
    assert await request_count(database) == 0


async def test_a_widened_grant_still_refuses_worker_columns_and_names_them(
    database: Database,
) -> None:
    # Managed-PostgreSQL guides often say GRANT ALL ... TO authenticated; the trigger still
    # holds the rule, and says which columns broke it.
    await database.conn.execute("GRANT ALL ON plan_requests TO authenticated")
    lead = await database.insert_lead(telegram_id=ALICE)
    with pytest.raises(errors.InsufficientPrivilege, match="attempts, result may not be set"):
        await tma_insert(database.url, ALICE, lead, result='{"error": "x"}', attempts=7)
    with pytest.raises(errors.InsufficientPrivilege, match="run_after may not be set"):
        await tma_insert(database.url, ALICE, lead, run_after="2999-01-01T00:00:00Z")
    assert await request_count(database) == 0
    # With the wide grant, UPDATE and DELETE still touch nothing: there is no policy for them.
    request_id = await tma_insert(database.url, ALICE, lead)
    async with acting_as(database.url, "authenticated", ALICE) as conn:
        updated = await conn.execute("UPDATE plan_requests SET status = 'completed'")
        deleted = await conn.execute("DELETE FROM plan_requests")
    assert (updated.rowcount, deleted.rowcount) == (0, 0)
    assert (await database.request(request_id))["status"] == "pending"


@pytest.mark.parametrize(
    "statement",
    [
        "UPDATE plan_requests SET status = 'completed' WHERE id = %s",
        "UPDATE plan_requests SET lead_id = lead_id WHERE id = %s",
        "DELETE FROM plan_requests WHERE id = %s",
    ],
)
async def test_tma_may_not_update_or_delete_even_its_own_request(
    database: Database, statement: str
) -> None:
    lead = await database.insert_lead(telegram_id=ALICE)
    request_id = await tma_insert(database.url, ALICE, lead)
    with pytest.raises(errors.InsufficientPrivilege, match="permission denied for table"):
        async with acting_as(database.url, "authenticated", ALICE) as conn:
            await conn.execute(statement, (request_id,))
    row = await database.request(request_id)
    assert row["status"] == "pending"


@pytest.mark.parametrize(
    "statement",
    [
        "SELECT * FROM plan_requests",
        "INSERT INTO plan_requests (lead_id, telegram_id) VALUES (%(lead)s, 1001)",
        "UPDATE plan_requests SET status = 'failed'",
        "DELETE FROM plan_requests",
    ],
)
async def test_anon_gets_permission_denied(database: Database, statement: str) -> None:
    lead = await database.insert_lead(telegram_id=ALICE)
    await database.insert_request(lead, telegram_id=ALICE)
    with pytest.raises(errors.InsufficientPrivilege, match="permission denied for table"):
        async with acting_as(database.url, "anon", claims={"role": "anon"}) as conn:
            await conn.execute(statement, {"lead": lead} if "%(" in statement else None)
    assert (await database.fetchall("SELECT status FROM plan_requests")) == [{"status": "pending"}]


# -- one active request per lead ----------------------------------------------------------------


async def test_second_active_request_for_a_lead_is_a_unique_violation(database: Database) -> None:
    lead = await database.insert_lead(telegram_id=ALICE)
    first = await tma_insert(database.url, ALICE, lead)
    with pytest.raises(errors.UniqueViolation) as refused:
        await tma_insert(database.url, ALICE, lead)
    assert refused.value.sqlstate == "23505"
    assert refused.value.diag.constraint_name == "planbus_plan_requests_one_active_per_lead"
    # The client reads the request that is already active instead.
    active = await tma_select(
        database.url, ALICE, f"lead_id = {lead} AND status IN ('pending', 'processing')"
    )
    assert active == [(first, lead, "pending")]
    # The worker and operators are held to the same rule.
    with pytest.raises(errors.UniqueViolation):
        await database.insert_request(lead, telegram_id=ALICE)
    await database.conn.execute(
        "UPDATE plan_requests SET status = 'processing', lease_expires_at = now() WHERE id = %s",
        (first,),
    )
    with pytest.raises(errors.UniqueViolation):
        await tma_insert(database.url, ALICE, lead)


async def test_a_lead_may_be_planned_again_once_its_request_ended(database: Database) -> None:
    lead = await database.insert_lead(telegram_id=ALICE)
    async with running_worker(database.url):
        first = await tma_insert(database.url, ALICE, lead)
        await database.wait_for(first)
        second = await tma_insert(database.url, ALICE, lead)
        row = await database.wait_for(second)
    assert row["status"] == "completed"
    statuses = await tma_select(database.url, ALICE, "true ORDER BY id")
    assert statuses == [(first, lead, "completed"), (second, lead, "completed")]


# -- the worker, operators and back-end services are not the TMA --------------------------------


async def test_operator_and_service_role_inserts_are_not_held_to_the_tma_rules(
    database: Database,
) -> None:
    lead = await database.insert_lead(telegram_id=ALICE)
    other = await database.insert_lead(telegram_id=ALICE)
    # The owner with a back-end service's claims (PostgREST's service_role key).
    await database.conn.execute(
        "SELECT set_config('request.jwt.claims', '{\"role\": \"service_role\"}', false)"
    )
    request_id = await database.value(
        "INSERT INTO plan_requests (lead_id, telegram_id, status) VALUES (%s, %s, 'failed') "
        "RETURNING id",
        (lead, BOB),
    )
    assert (await database.request(request_id))["telegram_id"] == BOB
    await database.conn.execute("RESET request.jwt.claims")
    assert await database.insert_request(other, telegram_id=ALICE)


@pytest.fixture
def worker_role_url(pg_server: TestServer, database_url: str) -> Iterator[str]:
    """A non-owner LOGIN role with BYPASSRLS and the worker grants of docs/security.md."""
    role = "planbus_test_worker"
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(
            "DO $$ BEGIN CREATE ROLE planbus_test_worker LOGIN BYPASSRLS; "
            "EXCEPTION WHEN duplicate_object OR unique_violation THEN NULL; END $$"
        )
        conn.execute("ALTER ROLE planbus_test_worker LOGIN BYPASSRLS NOSUPERUSER")
        conn.execute(WORKER_GRANTS.format(role=role))
    yield make_conninfo(database_url, user=role)


async def test_worker_runs_as_a_dedicated_role_with_the_documented_grants(
    database: Database, worker_role_url: str
) -> None:
    owner = await database.value(
        "SELECT tableowner FROM pg_tables WHERE tablename = 'plan_requests'"
    )
    assert conninfo_to_dict(worker_role_url)["user"] != owner
    await db.check_database(worker_role_url, migrate.head_revision())
    lead = await database.insert_lead(telegram_id=ALICE)
    stale = await database.insert_lead(telegram_id=ALICE)
    stale_request = await database.value(
        "INSERT INTO plan_requests (lead_id, telegram_id, status) VALUES (%s, %s, 'processing') "
        "RETURNING id",
        (stale, ALICE),
    )
    async with running_worker(worker_role_url, sweep_seconds=0.2):
        request_id = await tma_insert(database.url, ALICE, lead)
        rows = {r["id"]: r for r in await database.wait_all([request_id, stale_request])}
    assert [r["status"] for r in rows.values()] == ["completed", "completed"]
    steps = rows[request_id]["result"]["step_count"]
    assert len(await database.reminders(lead, "pending")) == steps


# -- running the migration where roles exist, or cannot be made ---------------------------------


@pytest.fixture
def unprivileged_owner(pg_server: TestServer) -> Iterator[tuple[str, str]]:
    """An empty database owned by a role that is neither superuser nor CREATEROLE:
    (that owner's URL, the superuser's URL)."""
    role = "planbus_test_migrator"
    with psycopg.connect(pg_server.admin_dsn, autocommit=True) as conn:
        conn.execute(
            "DO $$ BEGIN CREATE ROLE planbus_test_migrator LOGIN; "
            "EXCEPTION WHEN duplicate_object OR unique_violation THEN NULL; END $$"
        )
        conn.execute("ALTER ROLE planbus_test_migrator NOSUPERUSER NOCREATEROLE")
    name = pg_server.create_database()
    pg_server.execute(
        sql.SQL("ALTER DATABASE {} OWNER TO {}").format(sql.Identifier(name), sql.Identifier(role))
    )
    yield make_conninfo(pg_server.dsn(name), user=role), pg_server.dsn(name)
    pg_server.drop_database(name)


async def test_migration_by_a_plain_owner_where_the_roles_exist(
    unprivileged_owner: tuple[str, str], template_database: str
) -> None:
    # As on InsForge or Supabase: the roles exist, the migrating user is no superuser.
    owner_url, admin_url = unprivileged_owner
    await anyio.to_thread.run_sync(migrate.upgrade, owner_url)
    async with await psycopg.AsyncConnection.connect(admin_url, autocommit=True) as conn:
        database = Database(conn, admin_url)
        lead = await database.insert_lead(telegram_id=ALICE)
        request_id = await tma_insert(admin_url, ALICE, lead)
        assert await tma_select(admin_url, ALICE) == [(request_id, lead, "pending")]
        assert await tma_select(admin_url, BOB) == []
        with pytest.raises(errors.InsufficientPrivilege):
            async with acting_as(admin_url, "anon") as anon:
                await anon.execute("SELECT 1 FROM plan_requests")


async def test_missing_roles_that_cannot_be_created_are_reported_with_what_to_run(
    pg_server: TestServer,
    unprivileged_owner: tuple[str, str],
    template_database: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    owner_url, admin_url = unprivileged_owner
    if pg_server.embedded is None:
        pytest.skip("renames cluster-wide roles: only on the session's own embedded server")
    hidden = {role: f"{role}_hidden_{uuid.uuid4().hex[:8]}" for role in ("authenticated", "anon")}
    rename = "ALTER ROLE {} RENAME TO {}"
    for role, away in hidden.items():
        pg_server.execute(sql.SQL(rename).format(sql.Identifier(role), sql.Identifier(away)))
    try:
        with caplog.at_level(logging.WARNING, logger="planbus.migrations"):
            await anyio.to_thread.run_sync(migrate.upgrade, owner_url)
    finally:
        for role, away in hidden.items():
            pg_server.execute(sql.SQL(rename).format(sql.Identifier(away), sql.Identifier(role)))
    assert "CREATE ROLE authenticated NOLOGIN; CREATE ROLE anon NOLOGIN;" in caplog.text
    assert "alembic downgrade 0001_bus && alembic upgrade head" in caplog.text
    # Closed meanwhile: the roles that now exist again got nothing on plan_requests.
    with pytest.raises(errors.InsufficientPrivilege):
        async with acting_as(admin_url, "authenticated", ALICE) as conn:
            await conn.execute("SELECT 1 FROM plan_requests")
    # Re-applying as the message says opens it to the Mini App.
    await anyio.to_thread.run_sync(migrate.downgrade, owner_url, "0001_bus")
    await anyio.to_thread.run_sync(migrate.upgrade, owner_url)
    async with await psycopg.AsyncConnection.connect(admin_url, autocommit=True) as conn:
        lead = await Database(conn, admin_url).insert_lead(telegram_id=ALICE)
    request_id = await tma_insert(admin_url, ALICE, lead)
    assert await tma_select(admin_url, ALICE) == [(request_id, lead, "pending")]
