"""The bus: a row inserted with plain SQL becomes a plan with reminders, exactly once."""

from __future__ import annotations

import datetime as dt

import anyio
import pytest

from planbus.llm.plan import Lead, Plan
from planbus.llm.planner import TemplatePlanner
from tests.helpers import Database, listening_events, running_worker

pytestmark = pytest.mark.anyio


async def test_inserted_request_completes_with_every_effect(database: Database) -> None:
    lead = await database.insert_lead(telegram_id=7, prospect_name="Grace Hopper")
    old_pending = await database.value(
        "INSERT INTO scheduled_reminders (lead_id, telegram_id, step_id, due_at, status) "
        "VALUES (%s, 7, 1, now(), 'pending') RETURNING id",
        (lead,),
    )
    old_sent = await database.value(
        "INSERT INTO scheduled_reminders (lead_id, telegram_id, step_id, due_at, status) "
        "VALUES (%s, 7, 2, now(), 'sent') RETURNING id",
        (lead,),
    )
    old_done = await database.value(
        "INSERT INTO scheduled_reminders (lead_id, telegram_id, step_id, due_at, status) "
        "VALUES (%s, 7, 3, now(), 'completed') RETURNING id",
        (lead,),
    )

    async with listening_events(database.url) as events, running_worker(database.url):
        request_id = await database.insert_request(lead, telegram_id=7)
        event = await events.wait_for(request_id)

    assert event == {"id": request_id, "lead_id": lead, "telegram_id": 7, "status": "completed"}
    request = await database.request(request_id)
    assert request["status"] == "completed"
    assert request["attempts"] == 1
    steps = request["result"]["plan"]
    assert request["result"]["step_count"] == len(steps) >= 5

    lead_row = await database.fetchone("SELECT * FROM lead_registry WHERE id = %s", (lead,))
    assert lead_row is not None
    assert lead_row["engagement_plan"] == steps
    reminders = {r["id"]: r for r in await database.reminders(lead)}
    assert reminders[old_pending]["status"] == "cancelled"
    assert reminders[old_sent]["status"] == "cancelled"
    assert reminders[old_done]["status"] == "completed"

    new = [r for r in reminders.values() if r["id"] not in (old_pending, old_sent, old_done)]
    assert [r["step_id"] for r in new] == [s["step_id"] for s in steps]
    completed_at = lead_row["updated_at"]
    for reminder, step in zip(new, steps, strict=True):
        assert reminder["status"] == "pending"
        assert reminder["telegram_id"] == 7
        assert reminder["due_at"] == completed_at + dt.timedelta(days=step["delay_days"])
        assert reminder["draft_text"] == (step["suggested_text"] or step["description"])[:500]
    assert lead_row["next_followup"] == min(r["due_at"] for r in new)


class LongTextPlanner(TemplatePlanner):
    """The template plan with a 700-character DM, to see the draft cut to 500."""

    async def plan(self, lead: Lead, on_progress: object = None) -> Plan:
        plan = await super().plan(lead)
        steps = plan.as_json()
        steps[3]["suggested_text"] = "x" * 700
        return Plan.model_validate({"steps": steps})


async def test_draft_text_is_cut_to_500_characters(database: Database) -> None:
    lead = await database.insert_lead()
    async with running_worker(database.url, planner=LongTextPlanner()):
        request_id = await database.insert_request(lead)
        await database.wait_for(request_id)
    drafts = [r["draft_text"] for r in await database.reminders(lead)]
    assert drafts[3] == "x" * 500
    request = await database.request(request_id)
    assert request["result"]["plan"][3]["suggested_text"] == "x" * 700


async def test_request_is_claimed_through_the_notification_not_the_sweep(
    database: Database,
) -> None:
    lead = await database.insert_lead()
    async with running_worker(database.url, sweep_seconds=3600):
        request_id = await database.insert_request(lead)
        row = await database.wait_for(request_id, within=5)
    assert row["status"] == "completed"


async def test_row_inserted_while_nobody_listened_is_picked_up_on_start(
    database: Database,
) -> None:
    lead = await database.insert_lead()
    request_id = await database.insert_request(lead)
    async with running_worker(database.url, sweep_seconds=3600):
        row = await database.wait_for(request_id, within=5)
    assert row["status"] == "completed"


async def test_many_requests_run_at_the_same_time(database: Database) -> None:
    started = 0
    peak = 0
    release = anyio.Event()

    class GatedPlanner(TemplatePlanner):
        async def plan(self, lead: Lead, on_progress: object = None) -> Plan:
            nonlocal started, peak
            started += 1
            peak = max(peak, started)
            await release.wait()
            return await super().plan(lead)

    leads = [await database.insert_lead(telegram_id=i) for i in range(10)]
    async with running_worker(database.url, planner=GatedPlanner(), concurrency=10):
        ids = [await database.insert_request(lead, telegram_id=i) for i, lead in enumerate(leads)]
        await database.wait_all(ids, statuses=("processing",))
        release.set()
        rows = await database.wait_all(ids)
    assert peak == 10
    assert all(r["status"] == "completed" for r in rows)
    for lead in leads:
        assert len(await database.reminders(lead, "pending")) == 6


async def test_missing_lead_fails_the_request_and_names_the_lead(database: Database) -> None:
    # An older deployment's table may have no foreign key; the request must still end.
    await database.conn.execute(
        "ALTER TABLE plan_requests DROP CONSTRAINT plan_requests_lead_id_fkey"
    )
    async with listening_events(database.url) as events, running_worker(database.url):
        request_id = await database.insert_request(lead_id=999_999)
        event = await events.wait_for(request_id)
    assert event["status"] == "failed"
    row = await database.request(request_id)
    assert row["status"] == "failed"
    assert "999999" in row["result"]["error"]
    assert row["attempts"] == 1
