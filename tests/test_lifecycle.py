"""Claims end well: expired claims are recovered, lost claims write nothing, stops hand back."""

from __future__ import annotations

import logging
import re

import anyio
import pytest

from planbus.errors import TransientError
from planbus.llm.openai_stream import ProgressCallback
from planbus.llm.plan import Lead, Plan
from planbus.llm.planner import TemplatePlanner
from planbus.ops import migrate
from tests.conftest import TestServer
from tests.helpers import Database, eventually, listening_events, running_worker

pytestmark = pytest.mark.anyio


class GatedPlanner(TemplatePlanner):
    """The template planner, held until `release` is set; counts the calls it received."""

    def __init__(self) -> None:
        self.release = anyio.Event()
        self.calls = 0

    async def plan(self, lead: Lead, on_progress: object = None) -> Plan:
        self.calls += 1
        await self.release.wait()
        return await super().plan(lead)


async def simulate_dead_claim(database: Database, request_id: int, attempts: int) -> None:
    """Make the request look claimed by a worker that died: processing, lease in the past."""
    await database.conn.execute(
        "UPDATE plan_requests SET status = 'processing', attempts = %s, "
        "claim_token = gen_random_uuid(), worker_id = 'dead:1', claimed_at = now(), "
        "lease_expires_at = now() - interval '1 second' WHERE id = %s",
        (attempts, request_id),
    )


async def test_expired_claim_returns_to_pending_and_is_processed(database: Database) -> None:
    lead = await database.insert_lead()
    request_id = await database.insert_request(lead)
    await simulate_dead_claim(database, request_id, attempts=1)

    async with running_worker(database.url, sweep_seconds=0.2):
        row = await database.wait_for(request_id)

    assert row["status"] == "completed"
    assert row["attempts"] == 2  # the dead worker's claim and the live worker's
    assert row["last_error"] is None
    assert len(await database.reminders(lead, "pending")) == 6


async def test_expired_claim_after_the_last_attempt_fails(database: Database) -> None:
    lead = await database.insert_lead()
    request_id = await database.insert_request(lead)
    await simulate_dead_claim(database, request_id, attempts=3)

    async with listening_events(database.url) as events:
        async with running_worker(database.url, sweep_seconds=0.2, max_attempts=3):
            row = await database.wait_for(request_id)
        event = await events.wait_for(request_id)

    assert row["status"] == "failed"
    assert row["attempts"] == 3
    assert "worker" in row["result"]["error"]
    assert event["status"] == "failed"
    assert await database.reminders(lead) == []


@pytest.mark.slow
async def test_live_claim_is_not_taken_over(database: Database) -> None:
    planner = GatedPlanner()
    lead = await database.insert_lead()
    async with running_worker(database.url, planner=planner, lease_seconds=1.0, sweep_seconds=0.1):
        request_id = await database.insert_request(lead)
        first = await database.wait_for(request_id, statuses=("processing",))
        # Several leases long: only the heartbeat keeps the claim alive.
        with anyio.move_on_after(3):
            await anyio.Event().wait()
        still = await database.request(request_id)
        planner.release.set()
        done = await database.wait_for(request_id)
    assert still["claim_token"] == first["claim_token"]
    assert still["lease_expires_at"] > first["lease_expires_at"]
    assert done["status"] == "completed"
    assert done["attempts"] == 1
    assert planner.calls == 1


async def test_worker_that_lost_its_claim_writes_nothing(database: Database) -> None:
    planner = GatedPlanner()
    lead = await database.insert_lead()
    async with running_worker(database.url, planner=planner, lease_seconds=600) as worker:
        request_id = await database.insert_request(lead)
        await database.wait_for(request_id, statuses=("processing",))
        # Another worker took the request over (as after a sweep and a new claim).
        await database.conn.execute(
            "UPDATE plan_requests SET claim_token = gen_random_uuid(), worker_id = 'other:2' "
            "WHERE id = %s",
            (request_id,),
        )
        taken_over = await database.request(request_id)
        planner.release.set()
        # The worker's final write is what we wait for: its slot becomes free again.
        await eventually(lambda: request_id not in worker.inflight, 10, "the final write")

    after = await database.request(request_id)
    assert after == taken_over
    assert await database.reminders(lead) == []
    lead_row = await database.fetchone(
        "SELECT engagement_plan FROM lead_registry WHERE id = %s", (lead,)
    )
    assert lead_row == {"engagement_plan": None}


async def test_heartbeat_cancels_a_claim_taken_over(
    database: Database, caplog: pytest.LogCaptureFixture
) -> None:
    planner = GatedPlanner()
    lead = await database.insert_lead()
    caplog.set_level(logging.WARNING, logger="planbus")
    async with running_worker(database.url, planner=planner, lease_seconds=0.8) as worker:
        request_id = await database.insert_request(lead)
        await database.wait_for(request_id, statuses=("processing",))
        await database.conn.execute(
            "UPDATE plan_requests SET claim_token = gen_random_uuid() WHERE id = %s",
            (request_id,),
        )
        await eventually(lambda: not worker.inflight, 10, "the claim to be dropped")
    assert "claim lost" in caplog.text
    assert await database.reminders(lead) == []


async def test_graceful_stop_hands_back_unfinished_requests(database: Database) -> None:
    planner = GatedPlanner()
    leads = [await database.insert_lead(telegram_id=i) for i in range(3)]
    async with running_worker(database.url, planner=planner, shutdown_grace_seconds=0.3):
        ids = [await database.insert_request(lead, telegram_id=i) for i, lead in enumerate(leads)]
        await database.wait_all(ids, statuses=("processing",))
    rows = await database.fetchall(
        "SELECT status, attempts, claim_token FROM plan_requests WHERE id = ANY(%s)", (ids,)
    )
    assert rows == [{"status": "pending", "attempts": 1, "claim_token": None}] * 3

    async with running_worker(database.url):
        rows = await database.wait_all(ids)
    assert {r["status"] for r in rows} == {"completed"}


async def test_graceful_stop_lets_in_flight_requests_finish(database: Database) -> None:
    planner = GatedPlanner()
    lead = await database.insert_lead()
    async with running_worker(database.url, planner=planner, shutdown_grace_seconds=30) as worker:
        request_id = await database.insert_request(lead)
        await database.wait_for(request_id, statuses=("processing",))
        worker.stop()
        planner.release.set()
    row = await database.request(request_id)
    assert row["status"] == "completed"


async def test_worker_survives_a_database_restart(
    database: Database, pg_server: TestServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="planbus")
    lead = await database.insert_lead()
    async with running_worker(database.url, sweep_seconds=3600) as worker:
        before = await database.insert_request(lead)
        await database.wait_for(before)
        await anyio.to_thread.run_sync(pg_server.restart)
        await database.reconnect()
        # Wait until the listener is back, as a client would see it: then insert.
        await eventually(
            lambda: worker.listener.connected and worker.listener.reconnects > 0,
            15,
            "the LISTEN connection to come back",
        )
        after = await database.insert_request(lead)
        row = await database.wait_for(after, within=10)
    assert row["status"] == "completed"
    assert "reconnected" in caplog.text


async def test_claims_go_on_after_the_claim_connection_is_killed(database: Database) -> None:
    lead = await database.insert_lead()
    async with running_worker(database.url, sweep_seconds=3600):
        first = await database.insert_request(lead)
        await database.wait_for(first)
        killed = await database.value(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE datname = current_database() AND application_name = 'planbus-claim'"
        )
        after = await database.insert_request(lead)
        row = await database.wait_for(after, within=10)
    assert killed == 1
    assert row["status"] == "completed"


async def test_migrations_go_up_down_and_up_again(empty_database_url: str) -> None:
    await anyio.to_thread.run_sync(migrate.upgrade, empty_database_url)
    await anyio.to_thread.run_sync(migrate.downgrade, empty_database_url)
    import psycopg

    async with await psycopg.AsyncConnection.connect(empty_database_url) as conn:
        cursor = await conn.execute(
            "SELECT count(*) FROM information_schema.tables WHERE table_schema = 'public' "
            "AND table_name IN ('plan_requests', 'lead_registry', 'scheduled_reminders', "
            "'planbus_schema_origin')"
        )
        assert await cursor.fetchone() == (0,)
    await anyio.to_thread.run_sync(migrate.upgrade, empty_database_url)
    async with await psycopg.AsyncConnection.connect(empty_database_url) as conn:
        cursor = await conn.execute("SELECT version_num FROM alembic_version")
        assert await cursor.fetchone() == (migrate.head_revision(),)


class FailsOnce(TemplatePlanner):
    """A transient error on each lead's first attempt, a plan afterwards."""

    def __init__(self) -> None:
        self.seen: set[int] = set()

    async def plan(self, lead: Lead, on_progress: ProgressCallback | None = None) -> Plan:
        if lead.id not in self.seen:
            self.seen.add(lead.id)
            raise TransientError("The LLM server answered with an error (HTTP 500).")
        return await super().plan(lead, on_progress)


async def test_a_retried_claim_counts_its_wait_from_when_it_became_due(
    database: Database, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="planbus")
    lead = await database.insert_lead()
    request_id = await database.insert_request(lead)
    # Inserted an hour ago (as a request `planbus retry` brings back would be).
    await database.conn.execute(
        "UPDATE plan_requests SET created_at = now() - interval '1 hour' WHERE id = %s",
        (request_id,),
    )
    async with running_worker(database.url, FailsOnce()):
        row = await database.wait_for(request_id)
    assert (row["status"], row["attempts"]) == ("completed", 2)
    waits = {
        int(attempt): float(ms)
        for attempt, ms in re.findall(
            rf"request {request_id} lead {lead} claimed \(attempt (\d), waited ([\d.]+) ms\)",
            caplog.text,
        )
    }
    assert set(waits) == {1, 2}
    assert waits[2] < 60_000  # from the end of its retry delay, not from the insert
