"""The LLM provider's limits: throttling is flow control, an exhausted quota fails at once."""

from __future__ import annotations

import datetime as dt
import logging
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from psycopg import errors

from planbus.bus.metrics import MAX_MODEL_LABELS, TokenCounters
from planbus.llm.accounting import Cost
from planbus.llm.openai_errors import (
    QUOTA_EXHAUSTED,
    duration_seconds,
    public_url,
    throttle_wait_seconds,
)
from planbus.ops import cli
from tests.helpers import Database, eventually, figures_reporter, running_worker
from tests.llm_server import FakeLLM, Limits, Reply
from tests.processes import Fleet
from tests.test_security import ALICE, tma_insert

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
def llm_api_key() -> str:
    """The key the shared `llm` fixture sends (conftest.py): this module looks for it."""
    return API_KEY


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
        ({"llm_provider-retry-after": "3"}, 3.0),
        ({"llm_provider-retry-after-ms": "250", "llm_provider-retry-after": "3"}, 0.25),
        ({"retry-after": "1", "llm_provider-retry-after": "3"}, 1.0),
        (
            {
                "llm_provider-x-ratelimit-reset-requests": "4s",
                "llm_provider-x-ratelimit-remaining-requests": "0",
            },
            4.0,
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


# -- real worker processes against a provider's limits -----------------------------------------


@pytest.fixture
def report(capsys: pytest.CaptureFixture[str]) -> Callable[[str], None]:
    """Print a scenario's figures past pytest's capture."""
    return figures_reporter(capsys, "provider limits")


async def burst(database: Database, count: int) -> list[int]:
    """`count` requests for new leads, inserted at once (one statement), as an import does."""
    await database.conn.execute(
        "INSERT INTO lead_registry (telegram_id, prospect_name) "
        "SELECT 42, 'Limited Lead ' || n FROM generate_series(1, %s) AS n",
        (count,),
    )
    rows = await database.fetchall(
        "INSERT INTO plan_requests (lead_id, telegram_id) "
        "SELECT id, telegram_id FROM lead_registry ORDER BY id RETURNING id"
    )
    return [row["id"] for row in rows]


async def drain(
    database: Database,
    server: FakeLLM,
    tmp_path: Path,
    count: int,
    *flags: str,
    workers: int = 1,
    env: dict[str, str] | None = None,
) -> tuple[list[dict[str, Any]], float]:
    """Start the workers, insert `count` requests at once, wait until all are finished."""
    async with Fleet(database.url, tmp_path, server.base_url) as fleet:
        for _ in range(workers):
            await fleet.start(*flags, env=env)
        started = time.monotonic()
        rows = await database.wait_all(await burst(database, count), within=60)
        return rows, time.monotonic() - started


def outcome(rows: list[dict[str, Any]], server: FakeLLM, seconds: float) -> str:
    refused = server.stats()["refused"]
    failed = sum(row["status"] == "failed" for row in rows)
    return (
        f"{len(rows)} requests in {seconds:.1f}s, {failed} failed, {refused} refused calls "
        f"({refused / len(rows):.2f} per request)"
    )


# Three workers at 16 calls each: the first round (48 calls against a bucket of 20) is refused
# before any worker has heard "slow down", and each worker learns the spacing on its own, so
# 160 requests see 0.3-0.45 refusals each (the benchmark's 300 fewer).
@pytest.mark.parametrize(("workers", "concurrency", "bound"), [(1, 32, 0.5), (3, 16, 0.75)])
async def test_a_burst_at_a_providers_rate_limit_completes_every_request(
    database: Database,
    tmp_path: Path,
    report: Callable[[str], None],
    workers: int,
    concurrency: int,
    bound: float,
) -> None:
    limits = Limits(requests_per_second=20, burst=20)
    flags = ("--concurrency", str(concurrency))
    with FakeLLM(default=Reply(delay=0.1), limits=limits) as server:
        rows, seconds = await drain(database, server, tmp_path, 160, *flags, workers=workers)
    report(f"20/s, {workers} worker(s): {outcome(rows, server, seconds)}")

    assert [row["status"] for row in rows] == ["completed"] * len(rows)
    assert server.stats()["refused"] < bound * len(rows)
    assert all(row["attempts"] - row["throttled_claims"] == 1 for row in rows)


async def test_a_server_with_four_slots_completes_every_request(
    database: Database, tmp_path: Path, report: Callable[[str], None]
) -> None:
    with FakeLLM(default=Reply(delay=0.2), limits=Limits(slots=4)) as server:
        rows, seconds = await drain(database, server, tmp_path, 60)
    report(f"4 slots: {outcome(rows, server, seconds)}")

    assert [row["status"] for row in rows] == ["completed"] * len(rows)
    # A 503 names no wait: the first rounds are refused until the limit comes down to the slots
    # (32, 24, 18, ... calls against 4), which 60 requests do not dilute.
    assert server.stats()["refused"] < 2.0 * len(rows)
    assert server.stats()["max_in_flight"] <= 4


async def test_with_the_ceiling_at_the_accounts_limit_no_call_is_refused(
    database: Database, tmp_path: Path, report: Callable[[str], None]
) -> None:
    limits = Limits(requests_per_second=20, burst=20)
    ceiling = {"PLANBUS_LLM_REQUESTS_PER_MINUTE": "1200"}
    with FakeLLM(default=Reply(delay=0.1), limits=limits) as server:
        rows, seconds = await drain(database, server, tmp_path, 100, workers=2, env=ceiling)
    report(f"ceiling 1200/min at 20/s, 2 workers: {outcome(rows, server, seconds)}")

    assert [row["status"] for row in rows] == ["completed"] * len(rows)
    assert server.stats()["refused"] == 0


async def test_an_exhausted_quota_fails_the_request_at_once_in_a_worker_process(
    database: Database, tmp_path: Path
) -> None:
    with FakeLLM(limits=Limits(quota_calls=0)) as server:
        async with Fleet(database.url, tmp_path, server.base_url) as fleet:
            worker = await fleet.start()
            (request_id,) = await burst(database, 1)
            request = await database.wait_for(request_id)
            await worker.wait_for_log(re.compile(f"ERROR.*{re.escape(QUOTA_EXHAUSTED)}"))

    assert request["status"] == "failed"
    assert request["attempts"] == 1
    assert request["result"] == {"error": QUOTA_EXHAUSTED}


async def test_a_provider_that_throttles_past_the_patience_fails_with_a_sentence(
    database: Database, tmp_path: Path
) -> None:
    # One call per 1,000 s: the first request takes it, the second is refused until it gives up.
    limits = Limits(requests_per_second=0.001, burst=1)
    patience = {"PLANBUS_THROTTLE_PATIENCE_SECONDS": "2"}
    with FakeLLM(limits=limits) as server:
        rows, _ = await drain(database, server, tmp_path, 2, env=patience)

    assert sorted(row["status"] for row in rows) == ["completed", "failed"]
    (failed,) = [row for row in rows if row["status"] == "failed"]
    assert failed["result"] == {
        "error": "The LLM provider kept refusing (rate limited) for 2 seconds; giving up."
    }
    assert failed["throttled_claims"] == failed["attempts"] >= 2


@pytest.mark.parametrize(
    "column", [{"throttled_claims": 5}, {"throttled_since": "2020-01-01T00:00:00Z"}]
)
async def test_the_mini_app_may_not_set_the_throttling_columns_even_with_a_widened_grant(
    database: Database, column: dict[str, Any]
) -> None:
    lead = await database.insert_lead(telegram_id=ALICE)
    with pytest.raises(errors.InsufficientPrivilege, match="permission denied for table"):
        await tma_insert(database.url, ALICE, lead, **column)
    await database.conn.execute("GRANT ALL ON plan_requests TO authenticated")
    with pytest.raises(errors.InsufficientPrivilege, match="throttled_since may not be set"):
        await tma_insert(database.url, ALICE, lead, **column)
    assert await database.value("SELECT count(*) FROM plan_requests") == 0
    await tma_insert(database.url, ALICE, lead)  # the Mini App's own insert still works


def test_tokens_are_counted_under_a_bounded_number_of_model_names() -> None:
    # The model name comes from the provider's answer: a server naming a new model in every
    # answer must not make /metrics grow without end.
    registry = CollectorRegistry()
    tokens = TokenCounters(registry)
    for n in range(MAX_MODEL_LABELS * 3):
        tokens.count(Cost(model=f"model-{n}", prompt_tokens=10, completion_tokens=1))
    metrics = generate_latest(registry).decode()
    models = set(re.findall(r'planbus_llm_tokens_total\{kind="prompt",model="([^"]+)"\}', metrics))
    assert len(models) == MAX_MODEL_LABELS + 1, models
    assert 'planbus_llm_tokens_total{kind="prompt",model="other"} 320.0' in metrics
    assert 'planbus_llm_tokens_total{kind="prompt",model="model-0"} 10.0' in metrics
