"""The LLM provider's limits: throttling is flow control, an exhausted quota fails at once."""

from __future__ import annotations

import datetime as dt
import logging
import re
import time
from collections.abc import Iterator
from typing import Any

import anyio
import pytest
from prometheus_client import generate_latest

from planbus import cli
from planbus.provider_errors import (
    QUOTA_EXHAUSTED,
    duration_seconds,
    public_url,
    throttle_wait_seconds,
)
from tests.helpers import Database, eventually, running_worker
from tests.llm_server import FakeLLM, Reply

API_KEY = "sk-planbus-test-limits-0a1b2c3d"
NOW = dt.datetime(2025, 1, 1, 12, 0, 0, tzinfo=dt.UTC)
QUOTA_BODY = {
    "error": {
        "message": "You exceeded your current quota, please check your plan and billing details.",
        "type": "insufficient_quota",
        "code": "insufficient_quota",
    }
}
RATE_LIMIT_BODY = {
    "error": {
        "message": "Rate limit reached for requests",
        "type": "requests",
        "code": "rate_limit_exceeded",
    }
}


@pytest.fixture
def llm(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeLLM]:
    with FakeLLM() as server:
        monkeypatch.setenv("OPENAI_BASE_URL", server.base_url)
        monkeypatch.setenv("OPENAI_API_KEY", API_KEY)
        yield server


async def request_to_the_end(
    database: Database, within: float = 15.0, **overrides: Any
) -> dict[str, Any]:
    lead = await database.insert_lead()
    values: dict[str, Any] = {"llm_timeout_seconds": 5.0, "retry_base_seconds": 0.05}
    async with running_worker(database.url, planner="openai", **(values | overrides)):
        request_id = await database.insert_request(lead)
        return await database.wait_for(request_id, within=within)


# -- reading the provider's answer -----------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("1s", 1.0),
        ("6m0s", 360.0),
        ("120ms", 0.12),
        ("1h2m3.5s", 3723.5),
        ("0.5", 0.5),
        ("", None),
        ("soon", None),
        ("5s later", None),
    ],
)
def test_reset_durations_are_read_as_openai_writes_them(value: str, seconds: float | None) -> None:
    assert duration_seconds(value) == (pytest.approx(seconds) if seconds is not None else None)


@pytest.mark.parametrize(
    ("headers", "seconds"),
    [
        ({"retry-after-ms": "1500", "x-ratelimit-reset-requests": "9s"}, 1.5),
        ({"x-ratelimit-reset-requests": "2s", "x-ratelimit-remaining-requests": "0"}, 2.0),
        (
            {
                "x-ratelimit-reset-requests": "2s",
                "x-ratelimit-remaining-requests": "0",
                "x-ratelimit-reset-tokens": "7s",
                "x-ratelimit-remaining-tokens": "0",
            },
            7.0,
        ),
        (
            {
                "x-ratelimit-reset-requests": "2s",
                "x-ratelimit-remaining-requests": "0",
                "x-ratelimit-reset-tokens": "50ms",
                "x-ratelimit-remaining-tokens": "9000",
            },
            2.0,
        ),
        ({}, None),
    ],
)
def test_a_throttled_answer_says_how_long_to_wait(
    headers: dict[str, str], seconds: float | None
) -> None:
    assert throttle_wait_seconds(headers, NOW) == seconds


def test_the_url_named_in_errors_carries_no_credentials() -> None:
    assert public_url("https://user:sk-secret@llm.example:8443/v1/?key=sk-x") == (
        "https://llm.example:8443/v1"
    )


# -- through the worker ----------------------------------------------------------------------

pytestmark = pytest.mark.anyio


@pytest.mark.parametrize("where", ["code", "type"])
async def test_exhausted_quota_fails_at_once_and_is_logged_as_an_error(
    database: Database, llm: FakeLLM, caplog: pytest.LogCaptureFixture, where: str
) -> None:
    body = {"error": {"message": "You exceeded your current quota.", where: "insufficient_quota"}}
    llm.default = Reply(status=429, body=body)
    request = await request_to_the_end(database, max_attempts=3)

    assert request["status"] == "failed"
    assert request["attempts"] == 1
    assert request["result"] == {"error": QUOTA_EXHAUSTED}
    assert len(llm.calls) == 1
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert any(QUOTA_EXHAUSTED in m for m in errors)


def rate_limited(retry_after_ms: int = 20) -> Reply:
    return Reply(status=429, body=RATE_LIMIT_BODY, headers={"retry-after-ms": str(retry_after_ms)})


async def test_throttled_calls_spend_no_attempt(database: Database, llm: FakeLLM) -> None:
    llm.script(rate_limited(), Reply(status=503), rate_limited(), Reply(status=503))
    request = await request_to_the_end(database, max_attempts=1)

    assert request["status"] == "completed"
    # `attempts` counts claims, as the contract says; the throttled ones are counted apart.
    assert request["attempts"] == 5
    assert request["throttled_claims"] == 4
    assert len(llm.calls) == 5


async def test_a_real_failure_after_throttling_still_has_its_attempts(
    database: Database, llm: FakeLLM
) -> None:
    llm.script(rate_limited(), rate_limited(), Reply(status=500))
    llm.default = Reply(status=500)
    request = await request_to_the_end(database, max_attempts=2)

    assert request["status"] == "failed"
    assert request["attempts"] == 4
    assert request["throttled_claims"] == 2
    assert request["result"] == {"error": "The LLM server answered with an error (HTTP 500)."}


async def test_a_provider_that_throttles_longer_than_the_patience_fails_the_request(
    database: Database, llm: FakeLLM
) -> None:
    llm.default = rate_limited(retry_after_ms=50)
    request = await request_to_the_end(database, throttle_patience_seconds=0.5, max_attempts=1)

    assert request["status"] == "failed"
    assert request["result"] == {
        "error": "The LLM provider kept refusing (rate limited) for 0.5 seconds; giving up."
    }
    assert request["throttled_claims"] == request["attempts"] > 1


async def test_a_providers_pause_reaches_every_worker_of_the_database(
    database: Database, llm: FakeLLM
) -> None:
    llm.script(rate_limited(retry_after_ms=3_000))
    lead = await database.insert_lead()
    settings: dict[str, Any] = {"llm_timeout_seconds": 5.0}
    async with (
        running_worker(database.url, planner="openai", **settings) as first,
        running_worker(database.url, planner="openai", **settings) as second,
    ):
        request_id = await database.insert_request(lead)
        await eventually(
            lambda: first.limits.pace.throttled_calls + second.limits.pace.throttled_calls == 1,
            5,
            "one throttled call",
        )
        await eventually(
            lambda: (
                first.limits.pace.paused(time.monotonic())
                and second.limits.pace.paused(time.monotonic())
            ),
            5,
            "both workers to pause",
        )
        paused_until = await database.value("SELECT paused_until FROM planbus_provider_limits")
        assert paused_until is not None
        request = await database.wait_for(request_id, within=10)
    assert request["status"] == "completed"
    first_call, second_call = llm.calls
    assert second_call.arrived - first_call.arrived >= 3.0


async def test_a_completed_request_records_what_its_plan_cost(
    database: Database, llm: FakeLLM
) -> None:
    llm.script(rate_limited(), Reply(delay=0.05))
    lead = await database.insert_lead()
    async with running_worker(database.url, planner="openai", model="cost-model") as worker:
        request_id = await database.insert_request(lead)
        request = await database.wait_for(request_id)
        metrics = generate_latest(worker.metrics.registry).decode()

    result = request["result"]
    assert request["status"] == "completed"
    assert result["step_count"] == len(result["plan"])
    assert result["model"] == "cost-model"  # the fake server answers as the model asked for
    usage = result["usage"]
    assert usage["prompt_tokens"] > 0
    assert usage["completion_tokens"] > 0
    assert 0.05 <= result["model_seconds"] < 5
    assert result["throttled_calls"] == 1
    for kind in ("prompt", "completion"):
        line = f'planbus_llm_tokens_total{{kind="{kind}",model="cost-model"}} '
        assert f"{line}{float(usage[kind + '_tokens'])}" in metrics
    assert "planbus_llm_throttled_calls_total 1.0" in metrics
    assert "planbus_llm_concurrency_limit " in metrics
    assert "planbus_llm_paused_seconds_total " in metrics


async def test_a_worker_that_starts_during_a_pause_honours_it(
    database: Database, llm: FakeLLM
) -> None:
    paused_until = await database.value(
        "UPDATE planbus_provider_limits SET paused_until = now() + interval '1.5 seconds' "
        "RETURNING paused_until"
    )
    lead = await database.insert_lead()
    request_id = await database.insert_request(lead)
    async with running_worker(database.url, planner="openai", llm_timeout_seconds=5.0):
        request = await database.wait_for(request_id)

    assert request["status"] == "completed"
    (call,) = llm.calls
    assert call.arrived >= paused_until.timestamp()


async def test_status_shows_the_pause_the_throttled_requests_and_the_last_hours_tokens(
    database: Database, llm: FakeLLM, capsys: pytest.CaptureFixture[str]
) -> None:
    lead = await database.insert_lead()
    async with running_worker(database.url, planner="openai", model="cost-model"):
        await database.wait_for(await database.insert_request(lead))
    await database.conn.execute(
        "UPDATE planbus_provider_limits SET paused_until = now() + interval '30 seconds'"
    )
    waiting = await database.insert_request(await database.insert_lead())
    await database.conn.execute(
        "UPDATE plan_requests SET throttled_since = now(), throttled_claims = 2 WHERE id = %s",
        (waiting,),
    )

    code = await anyio.to_thread.run_sync(cli.main, ["status", "--database-url", database.url])
    out = capsys.readouterr().out

    assert code == 0
    assert "LLM provider: paused for " in out
    assert "1 requests finished in the last minute; 1 throttled requests waiting" in out
    assert re.search(
        r"tokens in the last hour: cost-model: \d+ prompt \+ \d+ completion in 1 plans", out
    )
