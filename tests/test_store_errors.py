"""A database error while storing a finished plan is the database's, never the model's.

The database refuses for real: a trigger on `scheduled_reminders` raises (once, or for as long
as the test leaves it), as a policy, a full disk or a pooler's lost statement would.
"""

from __future__ import annotations

import pytest

from planbus.errors import INVALID_OUTPUT
from tests.helpers import Database, running_worker, wait_until

pytestmark = pytest.mark.anyio

# The next %(times)s effects statements fail in the database, as a policy, a lock or a
# pooler's lost statement would fail them (a sequence counts them: it is not transactional,
# so the failing statement's rollback does not undo the count).
REFUSE_REMINDERS = """
CREATE SEQUENCE planbus_test_refusals;
CREATE FUNCTION planbus_test_refuse() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF nextval('planbus_test_refusals') <= %(times)s THEN
        RAISE EXCEPTION 'reminders are refused right now';
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER planbus_test_refuse BEFORE INSERT ON scheduled_reminders
    FOR EACH ROW EXECUTE FUNCTION planbus_test_refuse();
"""


async def refuse_reminders(database: Database, times: int) -> None:
    await database.conn.execute(REFUSE_REMINDERS.replace("%(times)s", str(times)))


async def test_a_plan_the_database_refuses_once_is_stored_on_retry_in_the_same_attempt(
    database: Database,
) -> None:
    await refuse_reminders(database, times=2)
    lead = await database.insert_lead()
    async with running_worker(database.url, max_attempts=1):
        request_id = await database.insert_request(lead)
        row = await database.wait_for(request_id)
    assert row["status"] == "completed", row["result"]
    assert row["attempts"] == 1  # the plan in hand was written again: no second planning
    assert len(await database.reminders(lead, "pending")) == row["result"]["step_count"]


async def test_a_plan_the_database_keeps_refusing_goes_back_as_the_databases_error(
    database: Database,
) -> None:
    await refuse_reminders(database, times=1_000_000)
    lead = await database.insert_lead()
    async with running_worker(database.url, max_attempts=1, lease_seconds=1.0):
        request_id = await database.insert_request(lead)

        async def given_back() -> dict[str, object]:
            row = await database.fetchone(
                "SELECT * FROM plan_requests WHERE id = %s AND last_error IS NOT NULL",
                (request_id,),
            )
            return row or {}

        row = await wait_until(given_back, bool, 15, "the request to be given back")
    assert row["status"] in ("pending", "processing"), row  # never failed for the database
    assert row["last_error"] == "The database could not store the plan (RaiseException).", row
    assert INVALID_OUTPUT not in str(row["result"])
    assert await database.reminders(lead) == []
