"""Two step rules read strictly: a number JSON cannot keep is invalid output (never stored as
null), and a description is "not empty" only when it has a visible character."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from planbus.errors import INVALID_OUTPUT
from planbus.llm.plan import InvalidPlan, Lead, validate_plan
from planbus.llm.planner import template_steps
from tests.helpers import Database
from tests.llm_server import FakeLLM, Reply
from tests.processes import Fleet

pytestmark = pytest.mark.anyio

MARK = "__NUMBER__"


def steps() -> list[dict[str, Any]]:
    return template_steps(Lead(id=1, telegram_id=1, prospect_name="Ada"))  # type: ignore[arg-type]


def raw_answer(number: str) -> str:
    """A valid plan whose step 3 has a field of the model's own holding `number` as written."""
    plan = steps()
    plan[2]["score"] = MARK
    return json.dumps({"steps": plan}).replace(f'"{MARK}"', number)


@pytest.mark.parametrize("number", ["1e400", "-1e400", "NaN", "Infinity", "[1, 1e999]"])
def test_a_number_json_cannot_keep_is_invalid_output(number: str) -> None:
    with pytest.raises(InvalidPlan, match="step 3 field 'score' holds a number JSON cannot keep"):
        validate_plan(json.loads(raw_answer(number)))


@pytest.mark.parametrize("number", ["1e300", "-0.5", "12345678901234567890", "0"])
def test_a_number_json_keeps_is_kept(number: str) -> None:
    plan = validate_plan(json.loads(raw_answer(number)))
    assert plan.as_json()[2]["score"] == json.loads(number)


INVISIBLE = {
    "spaces": "   ",
    "tabs and newlines": "\t\n\r ",
    "zero-width characters": "\u200b\u200c\u200d\u2060\ufeff",
    "no-break and wide spaces": "\u00a0\u2003\u3000",
    "a soft hyphen and bidi marks": "\u00ad\u200e\u200f\u202a",
    "a Hangul filler": "\u3164 \u3164",
    "a lone combining mark": "\u034f\u0301",
    "a braille blank": "\u2800",
}


@pytest.mark.parametrize("text", INVISIBLE.values(), ids=INVISIBLE.keys())
def test_a_description_with_nothing_visible_is_empty(text: str) -> None:
    plan = steps()
    plan[1]["description"] = text
    with pytest.raises(InvalidPlan, match=r"steps\.1\.description: description must not be empty"):
        validate_plan({"steps": plan})


@pytest.mark.parametrize(
    "text", ["x", " Like\u200b their post ", "東京", "🚀", "\u00e9", "e\u0301"]
)
def test_a_description_with_a_visible_character_passes(text: str) -> None:
    plan = steps()
    plan[1]["description"] = text
    assert validate_plan({"steps": plan}).steps[1].description == text


@pytest.fixture
def llm() -> Iterator[FakeLLM]:
    with FakeLLM() as server:
        yield server


async def test_a_worker_fails_such_answers_as_invalid_output_and_stores_no_null(
    database: Database, llm: FakeLLM, tmp_path: Path
) -> None:
    blank = steps()
    blank[0]["description"] = "\u200b \u2060"
    llm.script(Reply(content=raw_answer("1e400")), Reply(content=json.dumps({"steps": blank})))
    async with Fleet(database.url, tmp_path, llm.base_url) as fleet:
        await fleet.start(env={"PLANBUS_MAX_ATTEMPTS": "1"})
        ids = [await database.insert_request(await database.insert_lead()) for _ in range(2)]
        rows = await database.wait_all(ids, within=30)
    errors = sorted(row["result"]["error"] for row in rows)
    assert [row["status"] for row in rows] == ["failed", "failed"], errors
    assert all(error.startswith(INVALID_OUTPUT) for error in errors), errors
    assert any("JSON cannot keep" in error for error in errors), errors
    assert any("description must not be empty" in error for error in errors), errors
    assert (
        await database.value("SELECT count(*) FROM lead_registry WHERE engagement_plan IS NOT NULL")
        == 0
    )
