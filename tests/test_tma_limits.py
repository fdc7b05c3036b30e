"""What one Mini App user can cost: a per-user request limit, and refusals of bounded size."""

from __future__ import annotations

from typing import Any

import anyio
import psycopg
import pytest
from psycopg import errors

from tests.helpers import Database, acting_as, wait_until
from tests.test_security import tma_insert

pytestmark = pytest.mark.anyio

ALICE, BOB = 1001, 2002


async def set_limit(database: Database, per_minute: int) -> None:
    await database.conn.execute(
        "UPDATE planbus_settings SET value = %s WHERE name = 'tma_requests_per_minute'",
        (per_minute,),
    )


async def test_the_default_limit_is_ten_requests_per_user_and_minute(database: Database) -> None:
    assert (
        await database.value(
            "SELECT value FROM planbus_settings WHERE name = 'tma_requests_per_minute'"
        )
        == 10
    )


async def test_a_user_over_the_limit_is_refused_with_http_429_and_others_are_not(
    database: Database,
) -> None:
    await set_limit(database, 3)
    leads = [await database.insert_lead(telegram_id=ALICE) for _ in range(5)]
    for lead in leads[:3]:
        await tma_insert(database.url, ALICE, lead)
    with pytest.raises(psycopg.DatabaseError) as refused:
        await tma_insert(database.url, ALICE, leads[3])
    # PostgREST answers SQLSTATE PTxyz with HTTP status xyz.
    assert refused.value.sqlstate == "PT429"
    assert refused.value.diag.message_primary == (
        f"plan_requests: user {ALICE} made 3 plan requests in the last minute, the limit is 3; "
        "try again in a minute"
    )
    # Another user, and the worker's or an operator's inserts, are not limited.
    await tma_insert(database.url, BOB, await database.insert_lead(telegram_id=BOB))
    await database.insert_request(leads[4], telegram_id=ALICE)
    # Requests older than a minute no longer count; 0 turns the limit off.
    await database.conn.execute("UPDATE plan_requests SET created_at = now() - interval '61 s'")
    await tma_insert(database.url, ALICE, leads[3])
    await set_limit(database, 0)
    await database.conn.execute("UPDATE plan_requests SET status = 'failed'")
    for lead in leads:
        await tma_insert(database.url, ALICE, lead)


async def test_concurrent_inserts_of_one_user_do_not_slip_past_the_limit(
    database: Database,
) -> None:
    await set_limit(database, 1)
    first_lead = await database.insert_lead(telegram_id=ALICE)
    second_lead = await database.insert_lead(telegram_id=ALICE)
    outcome: list[Any] = []

    async def second_insert() -> None:
        try:
            outcome.append(await tma_insert(database.url, ALICE, second_lead))
        except psycopg.DatabaseError as exc:
            outcome.append(exc)

    async with anyio.create_task_group() as tg:
        async with acting_as(database.url, "authenticated", ALICE) as first:
            await first.execute(
                "INSERT INTO plan_requests (lead_id, telegram_id) VALUES (%s, %s)",
                (first_lead, ALICE),
            )
            tg.start_soon(second_insert)
            # The second insert waits for the first user's transaction to end.
            await wait_until(
                lambda: database.value(
                    "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
                ),
                lambda waiting: waiting == 1,
                10.0,
                "the second insert to wait for the first",
            )
    assert len(outcome) == 1 and isinstance(outcome[0], psycopg.DatabaseError)
    assert outcome[0].sqlstate == "PT429"
    assert await database.value("SELECT count(*) FROM plan_requests") == 1


async def test_a_huge_status_is_refused_with_a_short_message(database: Database) -> None:
    lead = await database.insert_lead(telegram_id=ALICE)
    with pytest.raises(errors.InsufficientPrivilege) as refused:
        await tma_insert(database.url, ALICE, lead, status="x" * 1_000_000)
    message = refused.value.diag.message_primary or ""
    assert len(message) < 300, message[:300]
    assert "not 'xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx'... (1000000 characters)" in message
    with pytest.raises(errors.InsufficientPrivilege, match="not 'done'; the worker"):
        await tma_insert(database.url, ALICE, lead, status="done")
