"""Providers that misbehave: storms without a wait, a proxy's headers, outages, hangs, queues.

The contract's "Failures" table, against the fake provider of tests/llm_server.py through the
real openai SDK, and real workers. Timings are the scenario's (a 20 s storm is 20 s long);
every wait for an outcome is a condition with a deadline.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import psycopg
import pytest
from prometheus_client import generate_latest

from planbus.llm.plan import Lead
from planbus.llm.planner import template_steps
from planbus.ops import cli
from tests.helpers import Database, eventually, figures_reporter, running_worker
from tests.llm_server import FakeLLM, Limits, Reply
from tests.processes import Fleet
from tests.test_provider_limits import API_KEY, RATE_LIMIT_BODY, burst

pytestmark = pytest.mark.anyio

OVERLOADED_BODY = {"error": {"message": "Overloaded", "type": "overloaded_error"}}


@pytest.fixture
def report(capsys: pytest.CaptureFixture[str]) -> Callable[[str], None]:
    """Print a scenario's figures past pytest's capture."""
    return figures_reporter(capsys, "misbehaving provider")


@pytest.fixture
def llm_api_key() -> str:
    """The key the shared `llm` fixture sends (conftest.py): this module looks for it."""
    return API_KEY


# -- a storm of refusals that name no wait ------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("status", [503, 529])
async def test_a_storm_without_a_wait_header_is_backed_off_together(
    database: Database, tmp_path: Path, report: Callable[[str], None], status: int
) -> None:
    storm = Reply(status=status, body=OVERLOADED_BODY)
    with FakeLLM(default=storm) as server:
        async with Fleet(database.url, tmp_path, server.base_url) as fleet:
            await fleet.start()
            await fleet.start()
            ids = await burst(database, 30)
            await anyio.sleep(20)  # the storm's length, not a synchronization
            server.default = Reply()
            ended = time.monotonic()
            rows = await database.wait_all(ids, within=10)
            recovered = time.monotonic() - ended
    refused = sum(call.status == status for call in server.calls)
    failed = sum(row["status"] == "failed" for row in rows)
    report(
        f"20 s of HTTP {status} without a wait, 2 workers, 30 requests: {refused} refused "
        f"calls, {failed} failed, all completed {recovered:.1f}s after the storm ended"
    )

    assert [row["status"] for row in rows] == ["completed"] * 30
    assert refused <= 60
    assert all(row["attempts"] - row["throttled_claims"] == 1 for row in rows)


# -- the wait a proxy forwards -------------------------------------------------------------------


async def test_a_wait_forwarded_by_a_litellm_proxy_is_honoured(
    database: Database, llm: FakeLLM
) -> None:
    llm.script(Reply(status=429, body=RATE_LIMIT_BODY, headers={"llm_provider-retry-after": "3"}))
    lead = await database.insert_lead()
    async with running_worker(database.url, planner="openai", llm_timeout_seconds=5.0):
        request = await database.wait_for(await database.insert_request(lead), within=15)

    assert request["status"] == "completed"
    first, second = llm.calls
    assert second.arrived - first.arrived >= 2.5


# -- an unreachable server -----------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as probe:  # a port with nothing listening on it
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def test_a_server_that_cannot_be_reached_fails_only_after_the_patience(
    database: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    port = free_port()
    monkeypatch.setenv("OPENAI_BASE_URL", f"http://127.0.0.1:{port}/v1")
    monkeypatch.setenv("OPENAI_API_KEY", API_KEY)
    lead = await database.insert_lead()
    settings: dict[str, Any] = {"max_attempts": 1, "throttle_patience_seconds": 1.0}
    async with running_worker(database.url, planner="openai", **settings):
        request = await database.wait_for(await database.insert_request(lead), within=10)

    assert request["status"] == "failed"
    assert request["result"] == {
        "error": f"Could not connect to the LLM server at http://127.0.0.1:{port}/v1 "
        "for 1 second; giving up."
    }
    assert request["attempts"] == request["throttled_claims"] >= 2  # no attempt spent


@pytest.mark.slow
async def test_requests_that_arrive_while_the_server_is_down_complete_when_it_is_back(
    database: Database, monkeypatch: pytest.MonkeyPatch, report: Callable[[str], None]
) -> None:
    server = FakeLLM().start()
    port = server.port
    monkeypatch.setenv("OPENAI_BASE_URL", server.base_url)
    monkeypatch.setenv("OPENAI_API_KEY", API_KEY)
    async with running_worker(database.url, planner="openai", concurrency=32) as worker:
        first = await database.wait_for(await database.insert_request(await database.insert_lead()))
        assert first["status"] == "completed"
        server.stop()  # the model server goes down for 20 s
        ids = []
        for _ in range(10):
            ids.append(await database.insert_request(await database.insert_lead()))
            await anyio.sleep(2)  # arrivals spread over the outage
        server = FakeLLM(port=port).start()
        back = time.monotonic()
        try:
            rows = await database.wait_all(ids, within=15)
        finally:
            server.stop()
        recovered = time.monotonic() - back
        throttled = worker.limits.pace.throttled_calls
    report(
        f"server down 20 s: 10 requests, all completed {recovered:.1f}s after it came back "
        f"({throttled} calls found it down)"
    )

    assert [row["status"] for row in rows] == ["completed"] * 10
    assert all(row["attempts"] - row["throttled_claims"] == 1 for row in rows)


# -- a hung call --------------------------------------------------------------------------------


@pytest.mark.parametrize("wait_header", [{}, {"retry-after-ms": "200"}])
async def test_a_hung_call_and_a_429_do_not_hold_back_other_requests(
    database: Database, llm: FakeLLM, wait_header: dict[str, str]
) -> None:
    llm.script(Reply(hang=True), Reply(status=429, body=RATE_LIMIT_BODY, headers=wait_header))
    settings: dict[str, Any] = {"concurrency": 32, "llm_timeout_seconds": 60.0}
    async with running_worker(database.url, planner="openai", **settings) as worker:
        hung = await database.insert_request(await database.insert_lead())
        await eventually(lambda: len(llm.calls) == 1, 5, "the hung call")
        await database.insert_request(await database.insert_lead())
        await eventually(lambda: worker.limits.pace.throttled_calls == 1, 5, "the 429")
        await anyio.sleep(1)  # the scenario: others arrive a second later
        ids = [await database.insert_request(await database.insert_lead()) for _ in range(10)]
        rows = await database.wait_all(ids, within=8)
        assert (await database.request(hung))["status"] != "failed"

    assert [row["status"] for row in rows] == ["completed"] * 10


# -- a notification carries no authority ---------------------------------------------------------


HOSTILE_PAYLOADS = ["1e308", "600", "inf", "nan", "-1", "", "x" * 7000, "1e308; stop"]


async def test_a_notification_from_any_role_cannot_pause_or_stop_a_worker(
    database: Database, llm: FakeLLM
) -> None:
    await database.conn.execute("CREATE ROLE planbus_test_notifier NOLOGIN")
    await database.conn.execute("GRANT planbus_test_notifier TO CURRENT_USER")
    settings: dict[str, Any] = {"concurrency": 32, "llm_timeout_seconds": 5.0}
    async with (
        running_worker(database.url, planner="openai", **settings),
        await psycopg.AsyncConnection.connect(database.url, autocommit=True) as hostile,
    ):
        # The role may only connect: it holds nothing on planbus's tables.
        await hostile.execute("SET ROLE planbus_test_notifier")
        for payload in HOSTILE_PAYLOADS:
            for channel in ("planbus_provider_limits", "plan_requests", "plan_request_events"):
                await hostile.execute("SELECT pg_notify(%s, %s)", (channel, payload))
        leads = [await database.insert_lead() for _ in range(5)]
        started = time.monotonic()
        ids = [await database.insert_request(lead) for lead in leads]
        rows = await database.wait_all(ids, within=3)
        took = time.monotonic() - started

    assert [row["status"] for row in rows] == ["completed"] * 5
    assert took < 3


# -- a server that queues instead of refusing ----------------------------------------------------


@pytest.mark.slow
async def test_calls_follow_what_a_server_that_queues_really_serves(
    database: Database, monkeypatch: pytest.MonkeyPatch, report: Callable[[str], None]
) -> None:
    # llama-server -np 2: two calls answered at once, each streaming for 2.5 s; the rest wait.
    # Sent all at once, 8 calls would end at 2.5, 5, 7.5 and 10 s: past the 6 s timeout.
    answer = json.dumps({"steps": template_steps(Lead(id=0, telegram_id=0))})  # type: ignore[arg-type]
    pace = len(answer) / 4 / 2.5
    server = FakeLLM(default=Reply(tokens_per_second=pace), limits=Limits(serve_at_once=2))
    with server:
        monkeypatch.setenv("OPENAI_BASE_URL", server.base_url)
        monkeypatch.setenv("OPENAI_API_KEY", API_KEY)
        settings: dict[str, Any] = {
            "concurrency": 32,
            "llm_timeout_seconds": 6.0,
            "max_attempts": 1,
            "lease_seconds": 30.0,
        }
        async with running_worker(database.url, planner="openai", **settings):
            ids = [await database.insert_request(await database.insert_lead()) for _ in range(8)]
            rows = await database.wait_all(ids, within=40)
        longest = max(call.queued for call in server.calls)
    report(
        f"2-slot queueing server, 8 requests: {sum(r['status'] == 'completed' for r in rows)} "
        f"completed, {len(server.calls)} calls, longest wait in its queue {longest:.1f}s"
    )

    assert [row["status"] for row in rows] == ["completed"] * 8
    assert longest < 2.5


# -- saying why nothing is claimed ---------------------------------------------------------------


async def test_status_says_why_workers_claim_nothing(
    database: Database, capsys: pytest.CaptureFixture[str]
) -> None:
    await database.conn.execute(
        "UPDATE planbus_provider_limits SET paused_until = now() + interval '30 seconds', "
        "refusals = 4"
    )
    await database.conn.execute(
        "INSERT INTO planbus_workers (worker_id, inflight, concurrency, llm_limit, held_back) "
        "VALUES ('host-1', 1, 32, 1, 'at the limit of 1 LLM calls in flight (1 in flight; "
        "PLANBUS_CONCURRENCY 32)'), ('host-2', 0, 32, 32, NULL)"
    )
    code = await anyio.to_thread.run_sync(cli.main, ["status", "--database-url", database.url])
    out = capsys.readouterr().out

    assert code == 0
    assert "(backing off after 4 rounds of refusals that named no wait)" in out
    assert (
        "worker host-1 claims nothing: at the limit of 1 LLM calls in flight (1 in flight; "
        "PLANBUS_CONCURRENCY 32)"
    ) in out
    assert "host-2" not in out.split("LLM provider:")[1]


async def test_metrics_say_what_holds_new_calls_back(database: Database, llm: FakeLLM) -> None:
    async with running_worker(database.url, planner="openai") as worker:
        worker.limits.pace.pause_until(time.monotonic() + 30, time.monotonic())
        metrics = generate_latest(worker.metrics.registry).decode()

    assert 'planbus_llm_held_back{reason="paused"} 1.0' in metrics
    assert 'planbus_llm_held_back{reason="limit"} 0.0' in metrics
    assert "planbus_llm_calls_presumed_hung 0.0" in metrics
