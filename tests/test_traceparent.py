"""The optional `traceparent` column: the Mini App may send one, only a W3C one is kept."""

from __future__ import annotations

import logging
from typing import Any

import pytest
from psycopg import errors

from tests.helpers import Database, acting_as
from tests.test_adoption import connect, downgrade, legacy_database, schema_of, upgrade
from tests.test_security import tma_insert

pytestmark = pytest.mark.anyio

__all__ = ["connect"]  # the adoption tests' fixture: a database with no schema at all

ALICE, BOB = 1001, 2002
TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
REFUSAL = "traceparent must be a W3C traceparent"
CONSTRAINT = "planbus_plan_requests_traceparent_w3c"

NOT_TRACEPARENTS = {
    "empty": "",
    "uppercase": TRACEPARENT.upper(),
    "version 01": "01" + TRACEPARENT[2:],
    "version ff": "ff" + TRACEPARENT[2:],
    "zero trace id": f"00-{'0' * 32}-00f067aa0ba902b7-01",
    "zero parent id": f"00-4bf92f3577b34da6a3ce929d0e0e4736-{'0' * 16}-01",
    "short trace id": "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
    "extra field": TRACEPARENT + "-00",
    "trailing newline": TRACEPARENT + "\n",
    "not hex": "00-4bf92f3577b34da6a3ce929d0e0e473g-00f067aa0ba902b7-01",
    "a header line": f"traceparent: {TRACEPARENT}",
}


async def tma_read(url: str, caller: int) -> list[tuple[Any, ...]]:
    async with acting_as(url, "authenticated", caller) as conn:
        cursor = await conn.execute("SELECT id, traceparent FROM plan_requests ORDER BY id")
        return await cursor.fetchall()


async def test_the_mini_app_sends_a_traceparent_and_only_its_user_reads_it(
    database: Database,
) -> None:
    lead = await database.insert_lead(telegram_id=ALICE)
    with_trace = await tma_insert(database.url, ALICE, lead, traceparent=TRACEPARENT)
    await database.conn.execute("UPDATE plan_requests SET status = 'failed'")
    without = await tma_insert(database.url, ALICE, lead)
    assert await tma_read(database.url, ALICE) == [(with_trace, TRACEPARENT), (without, None)]
    assert await tma_read(database.url, BOB) == []


@pytest.mark.parametrize("value", NOT_TRACEPARENTS.values(), ids=NOT_TRACEPARENTS.keys())
async def test_anything_but_a_w3c_traceparent_is_refused_with_what_one_looks_like(
    database: Database, value: str
) -> None:
    lead = await database.insert_lead(telegram_id=ALICE)
    with pytest.raises(errors.CheckViolation, match=REFUSAL) as refused:
        await tma_insert(database.url, ALICE, lead, traceparent=value)
    message = refused.value.diag.message_primary or ""
    assert "00-<trace id, 32 hex digits>-<parent id, 16 hex digits>" in message
    assert await database.value("SELECT count(*) FROM plan_requests") == 0


async def test_a_huge_traceparent_is_refused_with_a_short_error(database: Database) -> None:
    lead = await database.insert_lead(telegram_id=ALICE)
    with pytest.raises(errors.CheckViolation, match=REFUSAL) as refused:
        await tma_insert(database.url, ALICE, lead, traceparent="0" * 1_000_000)
    message = refused.value.diag.message_primary or ""
    assert len(message) < 400 and "(1000000 characters)" in message


async def test_the_rule_binds_every_writer_even_with_the_trigger_off(database: Database) -> None:
    lead = await database.insert_lead(telegram_id=ALICE)
    request_id = await database.insert_request(lead, telegram_id=ALICE)
    with pytest.raises(errors.CheckViolation, match=REFUSAL):
        await database.conn.execute(
            "UPDATE plan_requests SET traceparent = 'x' WHERE id = %s", (request_id,)
        )
    # The readable refusal is a trigger; the constraint stands behind it.
    await database.conn.execute(
        "ALTER TABLE plan_requests DISABLE TRIGGER planbus_plan_requests_traceparent"
    )
    with pytest.raises(errors.CheckViolation, match=CONSTRAINT):
        await database.conn.execute(
            "UPDATE plan_requests SET traceparent = %s WHERE id = %s",
            (NOT_TRACEPARENTS["zero trace id"], request_id),
        )
    await database.conn.execute(
        "UPDATE plan_requests SET traceparent = %s WHERE id = %s", (TRACEPARENT, request_id)
    )
    assert (await database.request(request_id))["traceparent"] == TRACEPARENT


async def test_the_mini_app_still_may_not_update_its_traceparent(database: Database) -> None:
    lead = await database.insert_lead(telegram_id=ALICE)
    await tma_insert(database.url, ALICE, lead)
    with pytest.raises(errors.InsufficientPrivilege):
        async with acting_as(database.url, "authenticated", ALICE) as conn:
            await conn.execute("UPDATE plan_requests SET traceparent = %s", (TRACEPARENT,))


async def test_an_adopted_traceparent_column_is_kept_with_its_rows_and_its_downgrade(
    connect: Database, caplog: pytest.LogCaptureFixture
) -> None:
    # An older Mini App already stored something it called a traceparent.
    await legacy_database(connect, managed=True)
    await connect.conn.execute("ALTER TABLE plan_requests ADD COLUMN traceparent text")
    await connect.conn.execute("UPDATE plan_requests SET traceparent = 'legacy' WHERE id = 3")
    schema = await schema_of(connect)

    with caplog.at_level(logging.WARNING, logger="planbus.migrations"):
        await upgrade(connect.url)
    assert f"break {CONSTRAINT}" in caplog.text
    assert await connect.value("SELECT traceparent FROM plan_requests WHERE id = 3") == "legacy"
    lead = await connect.insert_lead(telegram_id=ALICE)
    request_id = await tma_insert(connect.url, ALICE, lead, traceparent=TRACEPARENT)
    assert await tma_read(connect.url, ALICE) == [(request_id, TRACEPARENT)]
    with pytest.raises(errors.CheckViolation, match=REFUSAL):
        await tma_insert(connect.url, ALICE, lead, traceparent="legacy")

    await connect.conn.execute("DELETE FROM plan_requests WHERE id = %s", (request_id,))
    await connect.conn.execute("DELETE FROM lead_registry WHERE id = %s", (lead,))
    await downgrade(connect.url)
    assert await schema_of(connect) == schema
    assert await connect.value("SELECT traceparent FROM plan_requests WHERE id = 3") == "legacy"
