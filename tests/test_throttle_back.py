"""The fenced ends of a claim on a real PostgreSQL: THROTTLE_BACK's pause, what GIVE_BACK stores."""

from __future__ import annotations

import time
import uuid
from typing import Any

import pytest
from psycopg_pool import AsyncConnectionPool

from planbus.bus import provider_queries
from planbus.bus.claim import Claim
from planbus.bus.effects import give_back
from planbus.errors import MAX_ERROR_CHARS
from planbus.llm.plan import LeadId, RequestId
from tests.helpers import Database

pytestmark = pytest.mark.anyio


async def claimed(database: Database, token: uuid.UUID) -> int:
    """A request in `processing` under `token`, with progress reported."""
    request_id = await database.insert_request(await database.insert_lead())
    await database.conn.execute(
        "UPDATE plan_requests SET status = 'processing', claim_token = %s, attempts = 1,"
        " lease_expires_at = now() + interval '1 minute',"
        " progress = '{\"steps\": []}'::jsonb WHERE id = %s",
        (token, request_id),
    )
    return request_id


def params(request_id: int, token: uuid.UUID) -> dict[str, Any]:
    return {
        "id": request_id,
        "claim_token": token,
        "error": "throttled",
        "gave_up_error": "gave up",
        "patience_seconds": 600.0,
        "delay_seconds": 30.0,
        "pause_seconds": 30.0,
        "refusals": 0,
    }


async def test_a_claim_taken_over_does_not_pause_every_worker(database: Database) -> None:
    request_id = await claimed(database, uuid.uuid4())
    stale = await database.conn.execute(
        provider_queries.THROTTLE_BACK, params(request_id, uuid.uuid4())
    )
    assert await stale.fetchall() == []
    assert not await database.value(
        "SELECT coalesce(paused_until > now(), false) FROM planbus_provider_limits"
    )


async def test_a_throttled_claim_pauses_and_clears_its_progress(database: Database) -> None:
    token = uuid.uuid4()
    request_id = await claimed(database, token)
    cursor = await database.conn.execute(provider_queries.THROTTLE_BACK, params(request_id, token))
    assert [row[0] for row in await cursor.fetchall()] == ["pending"]
    assert await database.value("SELECT paused_until > now() FROM planbus_provider_limits")
    row = await database.request(request_id)
    assert row["progress"] is None
    assert row["claim_token"] is None


async def test_an_error_given_back_is_stored_on_one_bounded_line(database: Database) -> None:
    token = uuid.uuid4()
    request_id = await claimed(database, token)
    claim = Claim(
        id=RequestId(request_id),
        lead_id=LeadId(0),
        telegram_id=42,
        attempt=1,
        token=token,
        waited_seconds=0.0,
        lead=None,
    )
    error = "first line\n\tsecond line " + "y" * 10_000
    async with AsyncConnectionPool(database.url, min_size=1) as pool:
        outcome = await give_back(
            pool, claim, error=error, final=True, delay_seconds=0, deadline=time.monotonic() + 10
        )
    assert outcome == "failed"
    stored = (await database.request(request_id))["result"]["error"]
    assert stored.startswith("first line second line yyy")
    assert len(stored) <= MAX_ERROR_CHARS and stored.endswith("…")
