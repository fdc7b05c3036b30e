"""The openai planner, through the real SDK, against a real OpenAI-compatible server on loopback."""

from __future__ import annotations

import copy
import datetime as dt
import json
import logging
import socket
from collections.abc import Callable
from typing import Any, get_args

import pytest

from planbus.errors import ConfigurationError, TransientError
from planbus.llm.openai_errors import retry_after_seconds
from planbus.llm.openai_planner import KEYLESS, OpenAIPlanner, parse_plan
from planbus.llm.plan import ActionType, InvalidPlan, Lead, LeadId, validate_plan
from planbus.llm.planner import TemplatePlanner, make_planner, template_steps
from planbus.llm.prompt import (
    CUT_MARK,
    FIELD_BUDGET,
    WEB_RESEARCH_BUDGET,
    load_prompt,
    user_message,
)
from planbus.llm.schema import plan_json_schema, positional_plan_json_schema
from planbus.settings import load_settings
from tests.helpers import Database, running_worker
from tests.llm_server import FakeLLM, Reply

API_KEY = "sk-planbus-test-5f3c9a7e1d2b4c6a"
MODEL = "planbus-test-model"

MODEL_STEPS: list[dict[str, Any]] = [
    {
        "step_id": 1,
        "action_type": "linkedin_like",
        "description": "Like her post about the difference engine",
        "suggested_text": None,
        "timing": "Day 0",
        "delay_days": 0,
        "status": "pending",
        "completed_at": None,
    },
    {
        "step_id": 2,
        "action_type": "linkedin_connect",
        "description": "Connect, mentioning the notes on Menabrea",
        "suggested_text": "Hi Ada, your notes on the Analytical Engine changed how I see software.",
        "timing": "Day 2",
        "delay_days": 2,
        "status": "pending",
        "completed_at": None,
    },
    {
        "step_id": 3,
        "action_type": "meeting_request",
        "description": "Propose a call about Bernoulli numbers",
        "suggested_text": "Would 20 minutes next week work to compare notes?",
        "timing": "Week 2",
        "delay_days": 8,
        "status": "pending",
        "completed_at": None,
        "confidence": "high",  # a field of the model's own is kept as given
    },
]


@pytest.fixture
def llm_api_key() -> str:
    """The key the shared `llm` fixture sends (conftest.py): this module looks for it."""
    return API_KEY


def openai_worker(database: Database, **overrides: Any) -> Any:
    values: dict[str, Any] = {"model": MODEL, "llm_timeout_seconds": 5.0, **overrides}
    return running_worker(database.url, planner="openai", **values)


async def request_to_the_end(
    database: Database, within: float = 15.0, **overrides: Any
) -> dict[str, Any]:
    """One request for a new lead through an openai worker, until it is completed or failed."""
    lead = await database.insert_lead()
    async with openai_worker(database, **overrides):
        request_id = await database.insert_request(lead)
        return await database.wait_for(request_id, within=within)


async def lead_plan(database: Database, lead_id: int) -> Any:
    return await database.value(
        "SELECT engagement_plan FROM lead_registry WHERE id = %s", (lead_id,)
    )


# -- through the worker ----------------------------------------------------------------------

pytestmark = pytest.mark.anyio


async def test_plan_from_the_model_is_stored_as_given(database: Database, llm: FakeLLM) -> None:
    llm.script(Reply(steps=MODEL_STEPS))
    lead = await database.insert_lead()
    async with openai_worker(database):
        request_id = await database.insert_request(lead)
        request = await database.wait_for(request_id)

    assert request["status"] == "completed"
    assert request["attempts"] == 1
    assert request["result"]["plan"] == MODEL_STEPS
    assert request["result"]["step_count"] == 3
    assert await lead_plan(database, lead) == MODEL_STEPS
    drafts = [r["draft_text"] for r in await database.reminders(lead, "pending")]
    assert drafts == [
        MODEL_STEPS[0]["description"],
        MODEL_STEPS[1]["suggested_text"],
        MODEL_STEPS[2]["suggested_text"],
    ]
    assert len(llm.calls) == 1


async def test_server_error_is_retried_then_completes(database: Database, llm: FakeLLM) -> None:
    llm.script(Reply(status=500), Reply(steps=MODEL_STEPS))
    request = await request_to_the_end(database)

    assert request["status"] == "completed"
    assert request["attempts"] == 2
    assert request["result"]["plan"] == MODEL_STEPS
    assert len(llm.calls) == 2


async def test_rate_limited_retry_waits_for_retry_after(database: Database, llm: FakeLLM) -> None:
    llm.script(Reply(status=429, headers={"Retry-After": "1"}))
    # Without Retry-After the retry would come after about retry_base_seconds (0.05 s).
    request = await request_to_the_end(database, retry_max_seconds=5.0)

    assert request["status"] == "completed"
    assert request["attempts"] == 2
    first, second = llm.calls
    assert second.arrived - first.arrived >= 1.0


async def test_server_that_keeps_failing_fails_after_the_last_attempt(
    database: Database, llm: FakeLLM
) -> None:
    llm.default = Reply(status=500)
    request = await request_to_the_end(database, max_attempts=3)

    assert request["status"] == "failed"
    assert request["attempts"] == 3
    assert request["result"] == {"error": "The LLM server answered with an error (HTTP 500)."}
    # The SDK retries nothing on its own: one call per attempt.
    assert len(llm.calls) == 3


async def test_refused_credentials_fail_at_once_and_are_logged_as_errors(
    database: Database, llm: FakeLLM, caplog: pytest.LogCaptureFixture
) -> None:
    llm.default = Reply(status=401)
    request = await request_to_the_end(database, max_attempts=3)

    assert request["status"] == "failed"
    assert request["attempts"] == 1
    assert request["result"] == {"error": "The LLM credentials were refused (HTTP 401)."}
    assert len(llm.calls) == 1
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert any("The LLM credentials were refused (HTTP 401)." in m for m in errors)


async def test_other_client_errors_fail_at_once_with_the_servers_reason(
    database: Database, llm: FakeLLM
) -> None:
    llm.default = Reply(
        status=404, body={"error": {"message": f"The model `{MODEL}` does not exist."}}
    )
    request = await request_to_the_end(database, max_attempts=3)

    assert request["status"] == "failed"
    assert request["attempts"] == 1
    assert request["result"] == {
        "error": f"The LLM server rejected the request (HTTP 404): The model `{MODEL}` does "
        "not exist."
    }


async def test_content_that_is_not_json_is_retried_then_failed(
    database: Database, llm: FakeLLM
) -> None:
    llm.default = Reply(content="Sure! Here is a great plan: 1. Like their posts.")
    lead = await database.insert_lead()
    async with openai_worker(database, max_attempts=2):
        request_id = await database.insert_request(lead)
        request = await database.wait_for(request_id)

    assert request["status"] == "failed"
    assert request["attempts"] == 2
    assert len(llm.calls) == 2
    assert "The model's output was invalid: it is not JSON" in request["result"]["error"]
    assert await lead_plan(database, lead) is None
    assert await database.reminders(lead) == []


def _steps() -> list[dict[str, Any]]:
    # Delays 0, 2, 4, 6, 9, 12; step 2 is a comment, step 3 a connection request.
    return template_steps(Lead(id=LeadId(1), telegram_id=1, prospect_name="Ada Lovelace"))


def _with(index: int, **changes: Any) -> Callable[[], Any]:
    def build() -> Any:
        steps = _steps()
        steps[index].update(changes)
        return {"steps": steps}

    return build


BROKEN_PLANS: dict[str, tuple[Callable[[], Any], str]] = {
    "decreasing delay_days": (_with(3, delay_days=1), "delay_days must never decrease"),
    "fractional delay_days": (_with(2, delay_days=4.5), "steps.2.delay_days"),
    "delay_days as text": (_with(2, delay_days="4"), "steps.2.delay_days"),
    "delay_days over 90": (_with(5, delay_days=91), "steps.5.delay_days"),
    "negative delay_days": (_with(0, delay_days=-1), "steps.0.delay_days"),
    "unknown action_type": (_with(0, action_type="twitter_follow"), "steps.0.action_type"),
    "empty description": (_with(0, description="  "), "description must not be empty"),
    "step_id skips": (_with(1, step_id=3), "step_id must run 1..N"),
    "step_id from 0": (
        lambda: {"steps": [dict(s, step_id=s["step_id"] - 1) for s in _steps()]},
        "step_id must run 1..N",
    ),
    "connect text over 200": (_with(2, suggested_text="x" * 201), "at most 200 characters"),
    "comment with text": (_with(1, suggested_text="Great post!"), "suggested_text null"),
    "status not pending": (_with(0, status="done"), "steps.0.status"),
    "completed_at set": (_with(0, completed_at="2024-05-01T00:00:00Z"), "steps.0.completed_at"),
    "zero steps": (lambda: {"steps": []}, "steps: List should have at least 1 item"),
    "eleven steps": (
        lambda: {"steps": [dict(_steps()[0], step_id=n) for n in range(1, 12)]},
        "steps: List should have at most 10 items",
    ),
    "missing steps key": (lambda: {"plan": _steps()}, "steps: required field is missing"),
    "missing step field": (
        lambda: {"steps": [{k: v for k, v in s.items() if k != "timing"} for s in _steps()]},
        "steps.0.timing: required field is missing",
    ),
    "a bare list": (_steps, "plan: expected a JSON object"),
}


@pytest.mark.parametrize("rule", list(BROKEN_PLANS))
async def test_plan_breaking_a_step_rule_is_never_stored(
    database: Database, llm: FakeLLM, rule: str
) -> None:
    build, broken = BROKEN_PLANS[rule]
    llm.default = Reply(content=json.dumps(build()))
    lead = await database.insert_lead()
    async with openai_worker(database, max_attempts=1):
        request_id = await database.insert_request(lead)
        request = await database.wait_for(request_id)

    assert request["status"] == "failed"
    assert request["result"]["error"].startswith("The model's output was invalid: ")
    assert broken in request["result"]["error"]
    assert await lead_plan(database, lead) is None
    assert await database.reminders(lead) == []


async def test_server_that_never_answers_times_out_and_is_retried(
    database: Database, llm: FakeLLM
) -> None:
    llm.script(Reply(hang=True), Reply(hang=True), Reply(steps=MODEL_STEPS))
    request = await request_to_the_end(database, within=10, llm_timeout_seconds=0.5, max_attempts=3)

    assert request["status"] == "completed"
    assert request["attempts"] == 3
    assert request["result"]["plan"] == MODEL_STEPS
    assert len(llm.calls) == 3


async def test_server_that_never_answers_ends_failed_with_a_timeout_error(
    database: Database, llm: FakeLLM
) -> None:
    llm.default = Reply(hang=True)
    request = await request_to_the_end(database, within=10, llm_timeout_seconds=0.3, max_attempts=2)

    assert request["status"] == "failed"
    assert request["attempts"] == 2
    assert request["result"] == {"error": "The LLM call timed out after 0.3 s."}


async def test_connection_dropped_by_the_server_is_a_connection_error(
    database: Database, llm: FakeLLM
) -> None:
    llm.default = Reply(drop=True)
    request = await request_to_the_end(database, within=10, max_attempts=2)

    assert request["status"] == "failed"
    assert request["attempts"] == 2
    assert request["result"] == {"error": f"Could not connect to the LLM server at {llm.base_url}."}
    # Unanswered, each call is sent once more at once: it may have met a connection the server
    # had closed after its previous answer (llama-server does so after every stream).
    assert len(llm.calls) == 4


async def test_server_that_refuses_connections_is_an_outage_not_a_failed_attempt(
    database: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    with socket.socket() as probe:  # a port with nothing listening on it
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.setenv("OPENAI_BASE_URL", f"http://127.0.0.1:{port}/v1")
    monkeypatch.setenv("OPENAI_API_KEY", API_KEY)
    request = await request_to_the_end(
        database, within=10, max_attempts=2, throttle_patience_seconds=0.5
    )

    assert request["status"] == "failed"
    assert request["attempts"] == request["throttled_claims"] >= 2  # flow control, like a 503
    assert request["result"] == {
        "error": f"Could not connect to the LLM server at http://127.0.0.1:{port}/v1 "
        "for 0.5 seconds; giving up."
    }


LEAD_FIELDS: dict[str, Any] = {
    "prospect_name": "Ada Lovelace",
    "prospect_title": "Lead Analyst",
    "prospect_company": "Analytical Engines Ltd",
    "prospect_analysis": "Publishes detailed notes on Bernoulli numbers.",
    "closing_strategy": "Offer a pilot on the engine's punched cards.",
    "original_context": "Met at the Royal Society soiree in June.",
    "web_research": "Translated Menabrea's memoir and added Note G.",
}


async def test_request_carries_the_leads_fields_and_the_plan_schema(
    database: Database, llm: FakeLLM
) -> None:
    lead = await database.insert_lead(**LEAD_FIELDS)
    async with openai_worker(database):
        request_id = await database.insert_request(lead)
        await database.wait_for(request_id)

    (call,) = llm.calls
    assert call.path == "/v1/chat/completions"
    assert call.body["model"] == MODEL
    for value in LEAD_FIELDS.values():
        assert value in call.user_message
    assert call.body["messages"][0] == {"role": "system", "content": load_prompt()}
    assert call.body["response_format"] == {
        "type": "json_schema",
        "json_schema": {
            "name": "engagement_plan",
            "strict": True,
            "schema": positional_plan_json_schema(),
        },
    }
    assert call.headers["authorization"] == f"Bearer {API_KEY}"


async def test_very_long_fields_are_cut_to_their_budget(database: Database, llm: FakeLLM) -> None:
    research = "R" * 1_000_000
    analysis = "A" * 50_000
    lead = await database.insert_lead(web_research=research, prospect_analysis=analysis)
    async with openai_worker(database):
        request_id = await database.insert_request(lead)
        request = await database.wait_for(request_id)

    assert request["status"] == "completed"
    sent = llm.calls[0].user_message
    assert "R" * (WEB_RESEARCH_BUDGET - len(CUT_MARK)) + CUT_MARK in sent
    assert "A" * (FIELD_BUDGET - len(CUT_MARK)) + CUT_MARK in sent
    assert len(sent) < WEB_RESEARCH_BUDGET + FIELD_BUDGET + 500


async def test_api_key_never_reaches_logs_or_rows(
    database: Database, llm: FakeLLM, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    # Servers echo (parts of) the key in their errors; none of it may be written anywhere.
    echo = {"error": {"message": f"Incorrect API key provided: {API_KEY}."}}
    llm.script(
        Reply(status=401, body=echo),
        Reply(status=404, body=echo),
        Reply(status=500, body=echo),
        Reply(content=f"not a plan {API_KEY}"),
    )
    lead = await database.insert_lead()
    async with openai_worker(database, max_attempts=3):
        for expected in ("failed", "failed", "completed"):
            request_id = await database.insert_request(lead)
            request = await database.wait_for(request_id)
            assert request["status"] == expected

    assert all(call.headers["authorization"] == f"Bearer {API_KEY}" for call in llm.calls)
    assert len(llm.calls) == 5
    logged = "\n".join(f"{r.getMessage()} {r.exc_text or ''} {r.__dict__}" for r in caplog.records)
    assert logged
    assert API_KEY not in logged
    stored = await database.value(
        "SELECT concat_ws(' ', (SELECT json_agg(r)::text FROM plan_requests r),"
        " (SELECT json_agg(l)::text FROM lead_registry l),"
        " (SELECT json_agg(s)::text FROM scheduled_reminders s))"
    )
    assert "Incorrect API key provided" in stored  # the 404's detail, with the key redacted
    assert API_KEY not in stored


async def test_json_schema_rejection_falls_back_to_json_mode_once(
    database: Database, llm: FakeLLM, caplog: pytest.LogCaptureFixture
) -> None:
    refusal = {
        "error": {
            "message": "response_format type 'json_schema' is not supported",
            "type": "invalid_request_error",
        }
    }
    # Refusals that name no keyword: each schema once (positional and item, with and without
    # text lengths), then JSON mode from then on.
    llm.script(*[Reply(status=400, body=refusal)] * 4)
    lead = await database.insert_lead()
    async with openai_worker(database):
        first = await database.wait_for(await database.insert_request(lead))
        second = await database.wait_for(await database.insert_request(lead))

    assert first["status"] == second["status"] == "completed"
    assert first["attempts"] == 1
    formats = [call.body["response_format"] for call in llm.calls]
    assert [f["type"] for f in formats] == ["json_schema"] * 4 + ["json_object"] * 2
    # JSON mode carries the schema in the prompt instead.
    assert json.dumps(plan_json_schema()) in llm.calls[4].body["messages"][0]["content"]
    warnings = [r for r in caplog.records if "JSON mode" in r.getMessage()]
    assert len(warnings) == 1
    assert warnings[0].levelno == logging.WARNING


async def test_unrelated_bad_request_fails_without_falling_back(
    database: Database, llm: FakeLLM
) -> None:
    llm.script(Reply(status=400, body={"error": {"message": "messages: too many tokens"}}))
    lead = await database.insert_lead()
    async with openai_worker(database):
        request = await database.wait_for(await database.insert_request(lead))

    assert request["status"] == "failed"
    assert request["result"] == {
        "error": "The LLM server rejected the request (HTTP 400): messages: too many tokens."
    }
    assert len(llm.calls) == 1


# -- choosing the planner --------------------------------------------------------------------


async def test_auto_picks_openai_when_an_api_key_is_set(llm: FakeLLM) -> None:
    planner = make_planner(load_settings({"planner": "auto"}))
    try:
        assert isinstance(planner, OpenAIPlanner)
    finally:
        await planner.aclose()


def test_auto_picks_the_template_without_an_api_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    assert isinstance(make_planner(load_settings({"planner": "auto"})), TemplatePlanner)


def test_openai_planner_without_a_key_is_a_configuration_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with pytest.raises(ConfigurationError, match="OPENAI_API_KEY"):
        make_planner(load_settings({"planner": "openai"}), environ={})


def test_auto_with_a_server_but_no_key_says_so_in_one_warning(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    environ = {"OPENAI_BASE_URL": "http://127.0.0.1:8080/v1"}
    planner = make_planner(load_settings({"planner": "auto"}), environ=environ)
    assert isinstance(planner, TemplatePlanner)  # the contract: auto keys on OPENAI_API_KEY
    [warning] = [r for r in caplog.records if r.levelno >= logging.WARNING]
    message = warning.getMessage()
    for needed in ("OPENAI_BASE_URL", "OPENAI_API_KEY", "PLANBUS_PLANNER=openai", ":8080/v1"):
        assert needed in message
    caplog.clear()
    make_planner(load_settings({"planner": "template"}), environ=environ)
    make_planner(load_settings({"planner": "auto"}), environ={})
    assert not caplog.records  # asked for the template, or no server named: nothing to say


async def test_openai_planner_calls_a_server_without_a_key_when_given_none(
    database: Database, llm: FakeLLM, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("OPENAI_API_KEY")  # OPENAI_BASE_URL names the loopback server
    request = await request_to_the_end(database)
    assert request["status"] == "completed"
    assert llm.calls[0].headers["authorization"] == f"Bearer {KEYLESS}"


# -- pure functions --------------------------------------------------------------------------


@pytest.mark.parametrize("rule", list(BROKEN_PLANS))
def test_each_step_rule_is_enforced_and_named(rule: str) -> None:
    build, broken = BROKEN_PLANS[rule]
    data = build()
    original = copy.deepcopy(data)
    with pytest.raises(InvalidPlan) as raised:
        validate_plan(data)
    assert broken in str(raised.value)
    assert data == original  # rejected, not repaired
    with pytest.raises(TransientError) as invalid:
        parse_plan(json.dumps(data))
    assert invalid.value.message == f"The model's output was invalid: {raised.value}."


def test_valid_answer_keeps_the_models_fields() -> None:
    plan = parse_plan(json.dumps({"steps": MODEL_STEPS}))
    assert plan.as_json() == MODEL_STEPS


NOW = dt.datetime(2025, 1, 1, 12, 0, 0, tzinfo=dt.UTC)


@pytest.mark.parametrize(
    ("headers", "seconds"),
    [
        ({}, None),
        ({"retry-after": "3"}, 3.0),
        ({"retry-after": "1.5"}, 1.5),
        ({"retry-after-ms": "250", "retry-after": "9"}, 0.25),
        ({"retry-after": "Wed, 01 Jan 2025 12:00:30 GMT"}, 30.0),
        ({"retry-after": "Wed, 01 Jan 2025 11:00:00 GMT"}, 0.0),
        ({"retry-after": "soon"}, None),
        ({"retry-after": "-4"}, None),
        ({"retry-after-ms": "nan"}, None),
    ],
)
def test_retry_after_header_is_read_in_every_form(
    headers: dict[str, str], seconds: float | None
) -> None:
    assert retry_after_seconds(headers, NOW) == seconds


def test_user_message_leaves_out_missing_fields() -> None:
    message = user_message(
        Lead(id=LeadId(1), telegram_id=1, prospect_name="Ada", prospect_company="  ")
    )
    assert "## Name\nAda" in message
    for heading in ("Title", "Company", "Analysis", "Closing", "Original", "Web research"):
        assert f"## {heading}" not in message


def test_prompt_states_the_plan_rules() -> None:
    prompt = load_prompt()
    for phrase in ("5 to 8 steps", "200 characters", "`suggested_text` null", "Never invent"):
        assert phrase in prompt
    for action in get_args(ActionType):
        assert f"`{action}`" in prompt
