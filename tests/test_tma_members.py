"""Whoever acts for a Mini App user is held to its rules: a role granted `authenticated` is
limited per user like `authenticated` itself, and no client chooses its request's `id`."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import psycopg
import pytest
from psycopg import errors, sql

from tests.helpers import Database, acting_as
from tests.test_security import tma_insert
from tests.test_tma_limits import set_limit

pytestmark = pytest.mark.anyio

ALICE, BOB = 1001, 2002


async def member_insert(url: str, role: str, caller: int, lead: int, **columns: object) -> int:
    """INSERT ... RETURNING id as PostgREST does for a JWT whose role is `role`."""
    values = {"lead_id": lead, "telegram_id": caller, **columns}
    statement = sql.SQL("INSERT INTO plan_requests ({}) VALUES ({}) RETURNING id").format(
        sql.SQL(", ").join(map(sql.Identifier, values)),
        sql.SQL(", ").join(sql.Placeholder() * len(values)),
    )
    async with acting_as(url, role, caller) as conn:
        row = await (await conn.execute(statement, list(values.values()))).fetchone()
    assert row is not None
    return int(row[0])


@pytest.fixture
async def premium(database: Database) -> AsyncIterator[str]:
    """A custom role granted `authenticated`, as a Mini App's paying users might get."""
    role = f"planbus_premium_{uuid.uuid4().hex[:8]}"
    await database.conn.execute(sql.SQL("CREATE ROLE {} NOLOGIN").format(sql.Identifier(role)))
    await database.conn.execute(sql.SQL("GRANT authenticated TO {}").format(sql.Identifier(role)))
    yield role
    await database.conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))


async def test_a_role_granted_authenticated_is_held_to_the_per_user_limit(
    database: Database, premium: str
) -> None:
    await set_limit(database, 3)
    leads = [await database.insert_lead(telegram_id=ALICE) for _ in range(4)]
    for lead in leads[:3]:
        await member_insert(database.url, premium, ALICE, lead)
    with pytest.raises(psycopg.DatabaseError) as refused:
        await member_insert(database.url, premium, ALICE, leads[3])
    assert refused.value.sqlstate == "PT429"
    assert f"user {ALICE} made 3 plan requests in the last minute" in str(refused.value)
    # Another user is not limited by Alice's requests; the worker (superuser here) never is.
    await member_insert(database.url, premium, BOB, await database.insert_lead(telegram_id=BOB))
    await database.insert_request(leads[3], telegram_id=ALICE)


async def test_a_member_that_bypasses_row_security_is_not_limited(database: Database) -> None:
    # A back-end service role granted authenticated (to switch to it) but acting as itself.
    role = f"planbus_service_{uuid.uuid4().hex[:8]}"
    await database.conn.execute(
        sql.SQL("CREATE ROLE {0} NOLOGIN BYPASSRLS; GRANT authenticated TO {0}").format(
            sql.Identifier(role)
        )
    )
    try:
        await set_limit(database, 1)
        for _ in range(3):
            lead = await database.insert_lead(telegram_id=ALICE)
            await member_insert(database.url, role, ALICE, lead)
    finally:
        await database.conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))


async def test_a_client_that_sets_id_is_refused_like_the_worker_columns(
    database: Database, premium: str
) -> None:
    # A widened grant, as managed-PostgreSQL guides suggest: the trigger still holds the rule.
    await database.conn.execute("GRANT ALL ON plan_requests TO authenticated")
    first = await tma_insert(database.url, ALICE, await database.insert_lead(telegram_id=ALICE))
    bob_lead = await database.insert_lead(telegram_id=BOB)
    for role in ("authenticated", premium):
        for taken in (first + 1, first + 1000, first):  # the next user's id, any id, a used one
            with pytest.raises(errors.InsufficientPrivilege, match="id may not be set"):
                await member_insert(
                    database.url, role, ALICE, await database.insert_lead(ALICE), id=taken
                )
    # Bob gets his id as usual, and the worker or an operator may still choose one.
    assert await tma_insert(database.url, BOB, bob_lead) > first
    await database.conn.execute(
        "INSERT INTO plan_requests (id, lead_id, telegram_id) VALUES (%s, %s, %s)",
        (first + 10_000, await database.insert_lead(telegram_id=BOB), BOB),
    )
