"""Requests that finish together share one effects statement, and each stays fenced on its own."""

from __future__ import annotations

import time

import anyio
import pytest
from psycopg.rows import dict_row

from planbus.bus import db, queries
from planbus.bus.claim import Claim
from planbus.bus.effects import Completions, Outcome
from planbus.errors import TransientError
from planbus.llm.plan import Plan, Step
from planbus.llm.planner import TemplatePlanner
from tests.helpers import Database, listening_events

pytestmark = pytest.mark.anyio


async def claim_all(url: str, limit: int) -> list[Claim]:
    async with db.make_pool(url, 1) as pool, pool.connection() as conn:
        cursor = conn.cursor(row_factory=dict_row)
        await cursor.execute(
            queries.CLAIM,
            {
                "worker_id": "test:1",
                "lease_seconds": 30,
                "limit": limit,
                "fair_window": queries.FAIR_WINDOW,
                "announce": False,
            },
        )
        return [Claim.from_row(row) for row in await cursor.fetchall()]


async def test_requests_finishing_together_share_a_transaction_and_stay_fenced(
    database: Database,
) -> None:
    leads = [await database.insert_lead(telegram_id=100 + i) for i in range(5)]
    ids = [await database.insert_request(lead, telegram_id=100 + i) for i, lead in enumerate(leads)]
    claims = await claim_all(database.url, len(ids))
    assert sorted(c.id for c in claims) == sorted(ids)
    taken = claims[2]
    # Another worker took this one over: its token no longer matches.
    await database.conn.execute(
        "UPDATE plan_requests SET claim_token = gen_random_uuid() WHERE id = %s", (taken.id,)
    )
    planner = TemplatePlanner()
    outcomes: dict[int, Outcome] = {}

    async with db.make_pool(database.url, 2) as pool, listening_events(database.url) as events:
        completions = Completions(pool, writers=1)
        async with anyio.create_task_group() as tg:
            await tg.start(completions.run)

            async def finish(claim: Claim) -> None:
                assert claim.lead is not None
                plan = await planner.plan(claim.lead)
                outcomes[claim.id] = await completions.complete(claim, plan, time.monotonic() + 10)

            async with anyio.create_task_group() as finishing:
                for claim in claims:
                    finishing.start_soon(finish, claim)
            for claim in claims:
                if claim is not taken:
                    await events.wait_for(claim.id)
            tg.cancel_scope.cancel()

    assert outcomes == {c.id: "lost" if c is taken else "completed" for c in claims}
    rows = {r["id"]: r for r in await database.fetchall("SELECT * FROM plan_requests")}
    assert rows[taken.id]["status"] == "processing"
    assert await database.reminders(taken.lead_id, "pending") == []
    assert events.for_request(taken.id) == []
    done = [rows[c.id] for c in claims if c is not taken]
    assert all(r["status"] == "completed" for r in done)
    # One statement: one transaction, one now() for all of them.
    assert len({r["finished_at"] for r in done}) == 1
    for claim in claims:
        if claim is not taken:
            assert len(await database.reminders(claim.lead_id, "pending")) == 6


async def test_a_plan_the_database_refuses_fails_alone_in_its_batch(database: Database) -> None:
    leads = [await database.insert_lead(telegram_id=200 + i) for i in range(4)]
    ids = [await database.insert_request(lead, telegram_id=200 + i) for i, lead in enumerate(leads)]
    claims = await claim_all(database.url, len(ids))
    bad = claims[1]
    planner = TemplatePlanner()
    outcomes: dict[int, Outcome | str] = {}

    async with db.make_pool(database.url, 2) as pool:
        completions = Completions(pool, writers=1)  # one writer: all four share a statement
        async with anyio.create_task_group() as tg:
            await tg.start(completions.run)

            async def finish(claim: Claim) -> None:
                assert claim.lead is not None
                plan = await planner.plan(claim.lead)
                if claim is bad:  # passed no validation: jsonb refuses \u0000
                    steps = [s.model_dump() for s in plan.steps]
                    steps[0]["description"] = "Like\u0000 posts"
                    plan = Plan.model_construct(steps=[Step.model_construct(**s) for s in steps])
                try:
                    outcomes[claim.id] = await completions.complete(
                        claim, plan, time.monotonic() + 10
                    )
                except TransientError as exc:
                    outcomes[claim.id] = exc.message

            async with anyio.create_task_group() as finishing:
                for claim in claims:
                    finishing.start_soon(finish, claim)
            tg.cancel_scope.cancel()

    assert {c.id: outcomes[c.id] for c in claims if c is not bad} == {
        c.id: "completed" for c in claims if c is not bad
    }
    assert str(outcomes[bad.id]).startswith(
        "The model's output was invalid: the plan could not be stored"
    )
    rows = {r["id"]: r["status"] for r in await database.fetchall("SELECT * FROM plan_requests")}
    assert rows[bad.id] == "processing"  # the worker gives it back; nothing of it was written
    assert await database.reminders(bad.lead_id) == []
