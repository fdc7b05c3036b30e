"""`plan_requests.progress`: the steps written so far, as the Mini App reads them."""

from __future__ import annotations

import datetime as dt
import json
import logging
import re
import signal
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import pytest
from psycopg import errors, sql

from planbus.bus import db, queries
from planbus.bus.fleet import Fleet as WorkerFleet
from planbus.bus.progress import ProgressWriter
from planbus.llm.openai_stream import Progress
from planbus.llm.plan import Lead, LeadId, Step
from planbus.llm.planner import template_steps
from tests.helpers import Database, acting_as, eventually, running_worker, wait_until
from tests.llm_server import FakeLLM, Reply
from tests.processes import Fleet

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
        (
            queries.RECOVER_EXPIRED,
            {
                "max_attempts": 3,
                "lost_error": "x",
                **WorkerFleet("test:1", None, 5.0).beat_params(1, 32, 32),  # type: ignore[arg-type]
            },
        ),
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


# -- through a worker, against a model that writes at a set pace ---------------------------------

FIRST = [{**step, "description": f"First try: {step['description']}"} for step in STEPS]
SECOND = [{**step, "description": f"Second try: {step['description']}"} for step in STEPS]


def openai_worker(database: Database, **overrides: Any) -> Any:
    values: dict[str, Any] = {"llm_timeout_seconds": 15.0, **overrides}
    return running_worker(database.url, planner="openai", **values)


@dataclass
class Sighting:
    """The row as the Mini App read it: when, its status, and the step ids in `progress`."""

    at: float
    status: str
    steps: list[dict[str, Any]]
    attempts: int
    result: Any


async def watch_as_mini_app(
    url: str, caller: int, request_id: int, within: float = 20.0
) -> list[Sighting]:
    """Poll the request as its user's Mini App until it ends; every change seen, in order."""
    seen: list[Sighting] = []
    async with acting_as(url, "authenticated", caller) as conn:
        with anyio.fail_after(within):
            while not seen or seen[-1].status not in ("completed", "failed"):
                cursor = await conn.execute(
                    "SELECT status, progress, attempts, result FROM plan_requests WHERE id = %s",
                    (request_id,),
                )
                row = await cursor.fetchone()
                assert row is not None, "the Mini App cannot read its own request"
                status, progress, attempts, result = row
                steps = (progress or {}).get("steps", [])
                if not seen or (seen[-1].status, seen[-1].steps) != (status, steps):
                    seen.append(Sighting(time.time(), status, steps, attempts, result))
                await anyio.sleep(0.01)
    return seen


def progress_writes(caplog: pytest.LogCaptureFixture) -> int:
    return sum("progress written" in r.getMessage() for r in caplog.records)


async def test_steps_appear_in_progress_in_order_as_the_model_writes_them(
    database: Database, llm: FakeLLM, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="planbus.bus.progress")
    llm.default = Reply(steps=STEPS, tokens_per_second=200)
    lead = await database.insert_lead(telegram_id=ALICE)
    async with openai_worker(database, progress_interval_seconds=0.05):
        request_id = await database.insert_request(lead, telegram_id=ALICE)
        seen = await watch_as_mini_app(database.url, ALICE, request_id)
        others = await tma_read(database.url, BOB, request_id)

    shown = [s for s in seen if s.status == "processing" and s.steps]
    assert [len(s.steps) for s in shown] == [1, 2, 3, 4, 5]
    assert all(s.steps == STEPS[: len(s.steps)] for s in shown)
    [call] = llm.calls
    for sighting in shown:
        assert sighting.at >= call.step_times[len(sighting.steps) - 1]  # never before it exists
    assert seen[-1].status == "completed"
    assert seen[-1].steps == []  # the completion clears it: the plan is in `result`
    assert seen[-1].result["plan"] == STEPS
    assert others == []  # another user sees neither the row nor its progress
    assert progress_writes(caplog) <= len(STEPS)


async def test_an_answer_that_streams_in_one_burst_writes_no_progress(
    database: Database, llm: FakeLLM, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="planbus.bus.progress")
    llm.default = Reply(steps=STEPS, tokens_per_second=20_000)  # ~400 pieces in ~20 ms
    leads = [await database.insert_lead(telegram_id=ALICE) for _ in range(5)]
    # An interval well past the answer's 20 ms, so a loaded machine cannot stretch it past.
    async with openai_worker(database, progress_interval_seconds=1.0):
        ids = [await database.insert_request(lead, telegram_id=ALICE) for lead in leads]
        rows = await database.wait_all(ids)

    assert {row["status"] for row in rows} == {"completed"}
    assert all(call.body["stream"] for call in llm.calls)
    assert progress_writes(caplog) == 0


async def test_a_stream_cut_in_the_middle_is_retried_and_leaves_no_stale_progress(
    database: Database, llm: FakeLLM
) -> None:
    llm.script(Reply(steps=FIRST, tokens_per_second=300, cut_after=200))
    llm.default = Reply(steps=SECOND, tokens_per_second=300)
    lead = await database.insert_lead(telegram_id=ALICE)
    async with openai_worker(database, retry_base_seconds=0.3, progress_interval_seconds=0.05):
        request_id = await database.insert_request(lead, telegram_id=ALICE)
        seen = await watch_as_mini_app(database.url, ALICE, request_id)

    assert any(s.steps and s.steps[0] == FIRST[0] for s in seen)  # the cut attempt showed steps
    retry = next(i for i, s in enumerate(seen) if s.status == "pending" and s.attempts == 1)
    assert all(s.steps == [] for s in seen if s.status != "processing")
    assert all(step not in FIRST for s in seen[retry:] for step in s.steps)
    assert seen[-1].status == "completed"
    assert seen[-1].attempts == 2
    assert seen[-1].result["plan"] == SECOND


async def test_a_plan_that_breaks_a_whole_plan_rule_is_not_stored_though_steps_were_shown(
    database: Database, llm: FakeLLM
) -> None:
    decreasing = [dict(step) for step in STEPS]
    decreasing[-1]["delay_days"] = 0  # the last step goes back in time: the plan is rejected
    llm.default = Reply(steps=decreasing, tokens_per_second=300)
    lead = await database.insert_lead(telegram_id=ALICE)
    async with openai_worker(database, max_attempts=1, progress_interval_seconds=0.05):
        request_id = await database.insert_request(lead, telegram_id=ALICE)
        seen = await watch_as_mini_app(database.url, ALICE, request_id)

    assert max(len(s.steps) for s in seen) >= 3  # the first steps were shown
    assert seen[-1].status == "failed"
    assert seen[-1].steps == []
    assert "delay_days must never decrease" in seen[-1].result["error"]
    assert (
        await database.value("SELECT engagement_plan FROM lead_registry WHERE id = %s", (lead,))
        is None
    )
    assert await database.reminders(lead) == []


async def test_a_frozen_worker_whose_claim_was_taken_over_writes_no_progress(
    database: Database, llm: FakeLLM, tmp_path: Path
) -> None:
    llm.script(Reply(steps=FIRST, tokens_per_second=100))
    llm.default = Reply(steps=SECOND, tokens_per_second=100)
    lead = await database.insert_lead(telegram_id=ALICE)
    quick = {"PLANBUS_PROGRESS_INTERVAL_SECONDS": "0.05"}
    async with Fleet(database.url, tmp_path, llm.base_url) as fleet:
        frozen = await fleet.start("--lease-seconds", "1", "--sweep-seconds", "600", env=quick)
        request_id = await database.insert_request(lead, telegram_id=ALICE)

        async def shown() -> dict[str, Any]:
            return await database.request(request_id)

        await wait_until(shown, lambda row: row["progress"], 20, "the first worker's progress")
        frozen.send(signal.SIGSTOP)
        try:
            rescuer = await fleet.start("--lease-seconds", "1", "--sweep-seconds", "0.2", env=quick)
            await wait_until(
                shown,
                lambda row: row["attempts"] == 2 and row["progress"],
                20,
                "the rescuer's progress",
            )
        finally:
            frozen.send(signal.SIGCONT)
        # The thawed worker reads what the model wrote meanwhile, and finds its claim gone.
        await frozen.wait_for_log(re.compile(rf"request {request_id}\b.*(taken over|claim lost)"))
        seen = await watch_as_mini_app(database.url, ALICE, request_id)

    taken_over = [step for s in seen for step in s.steps]
    assert taken_over
    assert all(step in SECOND for step in taken_over)
    assert seen[-1].status == "completed"
    assert seen[-1].result["plan"] == SECOND
    assert seen[-1].steps == []
    assert rescuer.pid != frozen.pid


@pytest.mark.parametrize("hostile", ["deep", "nul"])
async def test_a_progress_that_cannot_be_stored_costs_its_preview_not_the_worker(
    database: Database, caplog: pytest.LogCaptureFixture, hostile: str
) -> None:
    request_id, token = await claimed_request(database)
    extra: dict[str, Any] = {}
    nested = extra
    for _ in range(300):  # deeper than anything may be serialized
        nested["x"] = nested = {}
    fields = {"extra": extra} if hostile == "deep" else {"description": "a\u0000b"}
    step = Step.model_validate({**STEPS[0], **fields})
    pool = db.make_pool(database.url, 2)
    await pool.open(wait=True, timeout=10)
    try:
        async with anyio.create_task_group() as tasks:
            writer = ProgressWriter(pool, interval=0.0)
            await tasks.start(writer.run)
            with writer.follow(request_id, token) as report:
                report(Progress(dt.datetime.now(dt.UTC), (step,), time.monotonic() - 1))
                await eventually(
                    lambda: "could not write its progress" in caplog.text, 10, "the warning"
                )
            tasks.cancel_scope.cancel()
    finally:
        await pool.close()
    assert (await database.request(request_id))["progress"] is None
