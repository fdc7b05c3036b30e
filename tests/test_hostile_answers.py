"""Hostile model answers: each is its own request's readable failure, never the worker's end.

A deep extra field once broke the plan's serialization outside the handled errors and the
process exited, failing other users' requests with it; a NUL or a lone surrogate made the
database refuse the write, which was then misreported as a lost claim.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from planbus.errors import INVALID_OUTPUT
from planbus.llm.openai_stream import ProgressCallback
from planbus.llm.plan import Lead, Plan, Step, unstorable
from planbus.llm.planner import TemplatePlanner, template_steps
from tests.helpers import Database, running_worker
from tests.llm_server import FakeLLM, Reply
from tests.processes import Fleet

pytestmark = pytest.mark.anyio

OTHERS = 10  # ordinary requests processed alongside the hostile ones


def nested(levels: int) -> Any:
    value: Any = "bottom"
    for _ in range(levels):
        value = {"deeper": value}
    return value


def answer(change: Any) -> Reply:
    """A valid plan with one change, sent as the model's raw JSON text (escapes kept)."""
    steps = template_steps(Lead(id=1, telegram_id=1, prospect_name="Ada"))  # type: ignore[arg-type]
    change(steps)
    return Reply(content=json.dumps({"steps": steps}))


HOSTILE = {
    "a 256-deep extra field": lambda s: s[1].update(extra=nested(256)),
    "a NUL in a step's text": lambda s: s[0].update(description="Like\u0000 posts"),
    "a lone surrogate in a step's text": lambda s: s[0].update(description="Like \ud800 posts"),
    "a NUL in a field name": lambda s: s[2].update({"odd\u0000name": 1}),
    "a lone surrogate in an extra field": lambda s: s[2].update(note=["x", {"y": "\udfff"}]),
}


def steps_with(change: Any) -> dict[str, Any]:
    steps = template_steps(Lead(id=1, telegram_id=1, prospect_name="Ada"))  # type: ignore[arg-type]
    change(steps)
    return {"steps": steps}


@pytest.mark.parametrize("change", HOSTILE.values(), ids=HOSTILE.keys())
def test_every_hostile_field_is_found_by_the_check_before_the_write(change: Any) -> None:
    # Ordinary plans take a one-pass look; it must miss nothing the field-by-field walk finds.
    problem = unstorable(steps_with(change))
    assert problem is not None and problem.startswith("step "), problem


@pytest.mark.parametrize(
    "text", ["Café, naïve, 東京, emoji 🚀", "a\\u0000 written out", "x" * 10_000]
)
def test_ordinary_text_passes_the_check(text: str) -> None:
    assert unstorable(steps_with(lambda s: s[3].update(description=text, note=text))) is None


@pytest.fixture
def llm() -> Iterator[FakeLLM]:
    with FakeLLM() as server:
        yield server


async def test_hostile_answers_fail_only_their_own_requests_in_a_running_worker(
    database: Database, llm: FakeLLM, tmp_path: Path
) -> None:
    async with Fleet(database.url, tmp_path, llm.base_url) as fleet:
        worker = await fleet.start(env={"PLANBUS_MAX_ATTEMPTS": "1"})
        # The first calls get the hostile answers, the rest a valid plan: all in flight at once.
        llm.script(*(answer(change) for change in HOSTILE.values()))
        leads = [await database.insert_lead() for _ in range(len(HOSTILE) + OTHERS)]
        ids = [await database.insert_request(lead) for lead in leads]
        rows = await database.wait_all(ids, within=30)
        assert worker.alive
        statuses = Counter(row["status"] for row in rows)
        assert statuses == {"failed": len(HOSTILE), "completed": OTHERS}
        errors = sorted(row["result"]["error"] for row in rows if row["status"] == "failed")
        assert all(error.startswith(f"{INVALID_OUTPUT}: step ") for error in errors), errors
        assert any("nested more than" in error for error in errors), errors
        assert sum("NUL character" in error for error in errors) == 2, errors
        assert sum("unpaired surrogate" in error for error in errors) == 2, errors
        # Still serving: one more request completes.
        late = await database.insert_request(await database.insert_lead())
        assert (await database.wait_for(late))["status"] == "completed"
        assert "Traceback" not in worker.log()


async def test_a_field_of_the_models_own_within_bounds_is_kept(
    database: Database, llm: FakeLLM, tmp_path: Path
) -> None:
    llm.script(answer(lambda s: s[2].update(confidence={"level": "high", "why": ["a", "b"]})))
    async with Fleet(database.url, tmp_path, llm.base_url) as fleet:
        await fleet.start()
        request_id = await database.insert_request(await database.insert_lead())
        row = await database.wait_for(request_id)
    assert row["status"] == "completed"
    assert row["result"]["plan"][2]["confidence"] == {"level": "high", "why": ["a", "b"]}


class UnstorablePlanner(TemplatePlanner):
    """Plans that passed no validation (as a planner bug could make): one per hostile lead."""

    def __init__(self, hostile: dict[int, Any]) -> None:
        self.hostile = hostile

    async def plan(self, lead: Lead, on_progress: ProgressCallback | None = None) -> Plan:
        plan = await super().plan(lead, on_progress)
        change = self.hostile.get(lead.id)
        if change is None:
            return plan
        steps = [step.model_dump() for step in plan.steps]
        change(steps)
        return Plan.model_construct(steps=[Step.model_construct(**s) for s in steps])


async def test_a_plan_the_database_cannot_store_fails_only_its_own_request(
    database: Database,
) -> None:
    hostile_leads = {
        await database.insert_lead(): change
        for change in (
            lambda s: s[1].update(extra=nested(300)),  # breaks the JSON serialization
            lambda s: s[0].update(description="Like\u0000 posts"),  # jsonb refuses \u0000
            lambda s: s[0].update(suggested_text="Hi \ud800"),  # jsonb refuses a lone surrogate
        )
    }
    others = [await database.insert_lead() for _ in range(OTHERS)]
    planner = UnstorablePlanner(hostile_leads)
    async with running_worker(database.url, planner, max_attempts=2) as worker:
        ids = [await database.insert_request(lead) for lead in [*hostile_leads, *others]]
        rows = await database.wait_all(ids, within=30)
        late = await database.insert_request(await database.insert_lead())
        assert (await database.wait_for(late))["status"] == "completed"
        assert not worker.inflight
    by_lead = {row["lead_id"]: row for row in rows}
    for lead in others:
        assert by_lead[lead]["status"] == "completed"
    for lead in hostile_leads:
        row = by_lead[lead]
        assert row["status"] == "failed"
        assert row["attempts"] == 2  # retried like any invalid output, then failed
        assert row["result"]["error"].startswith(f"{INVALID_OUTPUT}: the plan could not be stored")
        assert await database.reminders(lead, "pending") == []


async def test_a_models_own_key_makes_a_one_line_bounded_error(
    database: Database, llm: FakeLLM, tmp_path: Path
) -> None:
    steps = template_steps(Lead(id=1, telegram_id=1, prospect_name="Ada"))  # type: ignore[arg-type]
    llm.script(Reply(content=json.dumps({"steps": steps, "evil\nkey " + "x" * 200_000: 1})))
    async with Fleet(database.url, tmp_path, llm.base_url) as fleet:
        await fleet.start(env={"PLANBUS_MAX_ATTEMPTS": "1"})
        request_id = await database.insert_request(await database.insert_lead())
        row = await database.wait_for(request_id)
    assert row["status"] == "failed"
    error = row["result"]["error"]
    assert error.startswith(f"{INVALID_OUTPUT}: evil key xxx"), error
    assert "\n" not in error and len(error) <= 300, error
    assert "Extra inputs are not permitted" in error
