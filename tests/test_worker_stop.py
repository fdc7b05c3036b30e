"""A worker's claims around a stop, in-process against a real PostgreSQL."""

from __future__ import annotations

import anyio
import psycopg
import pytest

from planbus.llm.openai_stream import ProgressCallback
from planbus.llm.plan import Lead, Plan
from planbus.llm.planner import TemplatePlanner
from tests.helpers import Database, eventually, running_worker

pytestmark = pytest.mark.anyio

WAITING_FOR_THE_CEILING = """
SELECT count(*) FROM pg_stat_activity
 WHERE wait_event_type = 'Lock' AND query LIKE '%%planbus_provider_limits%%'
"""


async def until(database: Database, query: str, what: str) -> None:
    """Poll `query` (one boolean-ish value) with a deadline."""
    with anyio.move_on_after(10):
        while True:
            if await database.value(query):
                return
            await anyio.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


async def test_a_claim_granted_after_stop_claims_nothing(database: Database) -> None:
    # The ceiling's row is locked, so the worker's first claim waits for its grant.
    async with await psycopg.AsyncConnection.connect(database.url) as holder:
        await holder.execute("SELECT * FROM planbus_provider_limits FOR UPDATE")
        async with running_worker(database.url, llm_requests_per_minute=600) as worker:
            await until(database, WAITING_FOR_THE_CEILING, "the claim to wait for its grant")
            worker.stop()  # as on SIGTERM
            request_id = await database.insert_request(await database.insert_lead())
            await holder.rollback()  # the grant goes through: the claim must not
    row = await database.request(request_id)
    assert (row["status"], row["attempts"]) == ("pending", 0)


class HangingPlanner(TemplatePlanner):
    """Never answers: the request is still held when the worker stops."""

    async def plan(self, lead: Lead, on_progress: ProgressCallback | None = None) -> Plan:
        await anyio.sleep_forever()
        raise AssertionError("unreachable")


REFUSE_HAND_BACK = """
CREATE FUNCTION refuse_hand_back() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'hand back refused by the test';
END $$;
CREATE TRIGGER refuse_hand_back BEFORE UPDATE ON plan_requests FOR EACH ROW
  WHEN (OLD.status = 'processing' AND NEW.status = 'pending') EXECUTE FUNCTION refuse_hand_back();
"""


async def test_a_hand_back_the_database_refuses_leaves_the_claim_to_the_sweep(
    database: Database, caplog: pytest.LogCaptureFixture
) -> None:
    request_id = await database.insert_request(await database.insert_lead())
    async with running_worker(database.url, HangingPlanner(), shutdown_grace_seconds=0) as worker:
        await eventually(lambda: bool(worker.inflight), 10, "the request to be claimed")
        await database.conn.execute(REFUSE_HAND_BACK)
    # The worker stopped without raising; the claim waits for the sweep.
    assert (await database.request(request_id))["status"] == "processing"
    assert "could not hand back 1 requests" in caplog.text
