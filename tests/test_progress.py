"""`plan_requests.progress`: the steps written so far, as the Mini App reads them."""

from __future__ import annotations

import json
import uuid
from typing import Any

import pytest
from psycopg import errors, sql

from planbus import queries
from planbus.plan import Lead, LeadId
from planbus.planner import template_steps
from tests.helpers import Database, acting_as

pytestmark = pytest.mark.anyio

ALICE, BOB = 1001, 2002
STEPS = template_steps(Lead(id=LeadId(1), telegram_id=ALICE, prospect_name="Ada Lovelace"))


async def tma_read(url: str, caller: int, request_id: int) -> list[dict[str, Any]]:
    """The request's row as the Mini App of user `caller` reads it through PostgREST."""
    async with acting_as(url, "authenticated", caller) as conn:
        cursor = await conn.execute(
            "SELECT status, progress FROM plan_requests WHERE id = %s", (request_id,)
        )
        return [{"status": status, "progress": progress} async for status, progress in cursor]


async def claimed_request(database: Database, telegram_id: int = ALICE) -> tuple[int, uuid.UUID]:
    """A request of `telegram_id` that a worker holds: its id and claim token."""
    lead = await database.insert_lead(telegram_id=telegram_id)
    request_id = await database.insert_request(lead, telegram_id=telegram_id)
    token = uuid.uuid4()
    await database.conn.execute(
        "UPDATE plan_requests SET status = 'processing', claim_token = %s, attempts = 1 "
        "WHERE id = %s",
        (token, request_id),
    )
    return request_id, token


async def show(database: Database, request_id: int, token: uuid.UUID, steps: int) -> int:
    progress = {"started_at": "2026-01-01T00:00:00+00:00", "steps": STEPS[:steps]}
    cursor = await database.conn.execute(
        queries.SHOW_PROGRESS,
        {"id": request_id, "claim_token": token, "progress": json.dumps(progress)},
    )
    return cursor.rowcount


async def test_progress_is_readable_by_its_own_user_and_no_one_else(database: Database) -> None:
    request_id, token = await claimed_request(database)
    assert await tma_read(database.url, ALICE, request_id) == [
        {"status": "processing", "progress": None}
    ]
    assert await show(database, request_id, token, 2) == 1

    [row] = await tma_read(database.url, ALICE, request_id)
    assert row["progress"]["steps"] == STEPS[:2]
    assert row["progress"]["started_at"] == "2026-01-01T00:00:00+00:00"
    assert await tma_read(database.url, BOB, request_id) == []


async def test_a_progress_write_without_the_claim_writes_nothing(database: Database) -> None:
    request_id, token = await claimed_request(database)
    assert await show(database, request_id, uuid.uuid4(), 2) == 0  # another worker's token
    await database.conn.execute(
        "UPDATE plan_requests SET status = 'pending', claim_token = NULL WHERE id = %s",
        (request_id,),
    )
    assert await show(database, request_id, token, 2) == 0  # the claim was recovered
    assert (await database.request(request_id))["progress"] is None


@pytest.mark.parametrize("widened", [False, True])
async def test_the_mini_app_may_not_set_progress(database: Database, widened: bool) -> None:
    if widened:  # an operator followed a guide that says GRANT ALL ... TO authenticated
        await database.conn.execute("GRANT ALL ON plan_requests TO authenticated")
    lead = await database.insert_lead(telegram_id=ALICE)
    values = {"lead_id": lead, "telegram_id": ALICE, "progress": json.dumps({"steps": STEPS})}
    statement = sql.SQL("INSERT INTO plan_requests ({}) VALUES ({})").format(
        sql.SQL(", ").join(map(sql.Identifier, values)),
        sql.SQL(", ").join(sql.Placeholder() * len(values)),
    )
    refusal = "progress may not be set" if widened else "permission denied for table"
    with pytest.raises(errors.InsufficientPrivilege, match=refusal):
        async with acting_as(database.url, "authenticated", ALICE) as conn:
            await conn.execute(statement, list(values.values()))
    assert await database.value("SELECT count(*) FROM plan_requests") == 0
    await database.insert_request(lead, telegram_id=ALICE)
    if not widened:
        with pytest.raises(errors.InsufficientPrivilege):
            async with acting_as(database.url, "authenticated", ALICE) as conn:
                await conn.execute("UPDATE plan_requests SET progress = '{}'")
        return
    async with acting_as(database.url, "authenticated", ALICE) as conn:
        cursor = await conn.execute("UPDATE plan_requests SET progress = '{}'")
    assert cursor.rowcount == 0  # no UPDATE policy: even its own row is out of reach


@pytest.mark.parametrize(
    ("statement", "params"),
    [
        (queries.GIVE_BACK, {"status": "pending", "error": "x", "delay_seconds": 0.0}),
        (queries.GIVE_BACK, {"status": "failed", "error": "x", "delay_seconds": 0.0}),
        (queries.HAND_BACK, {}),
        (queries.RECOVER_EXPIRED, {"max_attempts": 3, "lost_error": "x"}),
    ],
    ids=["retry", "failure", "hand-back", "sweep"],
)
async def test_every_end_of_a_claim_clears_the_progress(
    database: Database, statement: Any, params: dict[str, Any]
) -> None:
    request_id, token = await claimed_request(database)
    await show(database, request_id, token, 3)
    await database.conn.execute(
        "UPDATE plan_requests SET lease_expires_at = now() - interval '1 second' WHERE id = %s",
        (request_id,),
    )
    fence = {"id": request_id, "claim_token": token, "ids": [request_id], "tokens": [token]}
    await database.conn.execute(statement, {**fence, **params})
    row = await database.request(request_id)
    assert row["status"] != "processing"
    assert row["progress"] is None
