"""Bad input does no harm: the database refuses what the contract forbids, and nothing a client
can insert makes the worker crash, stall or disturb other requests."""

from __future__ import annotations

from typing import Any

import anyio
import pytest
from psycopg import errors

from planbus.llm.plan import MAX_DRAFT_TEXT, Lead, Plan
from planbus.llm.planner import TemplatePlanner
from planbus.llm.prompt import FIELD_BUDGET, WEB_RESEARCH_BUDGET
from tests.helpers import Database, running_worker
from tests.llm_server import FakeLLM

pytestmark = pytest.mark.anyio

MEGABYTE = 1_000_000
BIGINT_MAX = 2**63 - 1

# Text a person or a scraper may well put into a lead.
WEIRD_TEXT = [
    "👩🏽‍💻 Zoë Ångström-Łukasiewicz 🇵🇱",  # emoji with ZWJ and skin tone, flags, diacritics
    "\u202eevil\u202c \u200b\u200d\ufeff",  # bidi override, zero-width characters, BOM
    "e\u0301\u0301\u0301\u0301\u0301 Z̷̢̛̪a̶l̴g̵o̸",  # stacked combining marks
    "\x01\x07\x1b[31mred\x1b[0m\t\r\n\x7f",  # control characters (PostgreSQL refuses only NUL)
    "Robert'); DROP TABLE plan_requests;-- %s %(id)s {} \\ \"",  # quoting and format specifiers
    "   \n\t  ",  # only whitespace
    "\U0001d518\U0001d52b\U0001d526 " * 2_000,  # long, astral-plane characters
]


class GatedPlanner(TemplatePlanner):
    """The template plan, held back until the test opens the gate."""

    def __init__(self) -> None:
        self.gate = anyio.Event()

    async def plan(self, lead: Lead, on_progress: object = None) -> Plan:
        await self.gate.wait()
        return await super().plan(lead)


async def request_count(database: Database) -> int:
    return int(await database.value("SELECT count(*) FROM plan_requests"))


# -- refused at insert -------------------------------------------------------------------------


@pytest.mark.parametrize("status", ["done", "PENDING", "", " pending", "cancelled"])
async def test_status_the_contract_does_not_know_is_refused(
    database: Database, status: str
) -> None:
    lead = await database.insert_lead()
    with pytest.raises(errors.CheckViolation):
        await database.conn.execute(
            "INSERT INTO plan_requests (lead_id, telegram_id, status) VALUES (%s, 42, %s)",
            (lead, status),
        )
    request_id = await database.insert_request(lead)
    with pytest.raises(errors.CheckViolation):
        await database.conn.execute(
            "UPDATE plan_requests SET status = %s WHERE id = %s", (status, request_id)
        )
    assert (await database.request(request_id))["status"] == "pending"


@pytest.mark.parametrize(
    ("lead_id", "telegram_id", "error"),
    [
        (None, 42, errors.NotNullViolation),
        ("lead", None, errors.NotNullViolation),
        (987_654, 42, errors.ForeignKeyViolation),
        (-1, 42, errors.ForeignKeyViolation),
        (BIGINT_MAX, 42, errors.ForeignKeyViolation),
        (BIGINT_MAX + 1, 42, errors.NumericValueOutOfRange),
        ("lead", -(2**63) - 1, errors.NumericValueOutOfRange),
    ],
)
async def test_request_without_an_existing_lead_or_a_user_is_refused(
    database: Database, lead_id: Any, telegram_id: Any, error: type[Exception]
) -> None:
    lead = await database.insert_lead()
    lead_id = lead if lead_id == "lead" else lead_id
    with pytest.raises(error):
        await database.conn.execute(
            "INSERT INTO plan_requests (lead_id, telegram_id) VALUES (%s, %s)",
            (lead_id, telegram_id),
        )
    assert await request_count(database) == 0


async def test_negative_attempts_are_refused(database: Database) -> None:
    request_id = await database.insert_request(await database.insert_lead())
    with pytest.raises(errors.CheckViolation):
        await database.conn.execute(
            "UPDATE plan_requests SET attempts = -5 WHERE id = %s", (request_id,)
        )


# -- processed without harm --------------------------------------------------------------------


async def test_a_lead_with_megabytes_of_text_is_still_planned(database: Database) -> None:
    lead = await database.insert_lead(
        web_research="R" * MEGABYTE,
        prospect_name="N" * MEGABYTE,
        prospect_company="🏢" * MEGABYTE,
        prospect_analysis="A" * MEGABYTE,
        original_context="C" * MEGABYTE,
    )
    async with running_worker(database.url):
        row = await database.wait_for(await database.insert_request(lead))
    assert row["status"] == "completed"
    assert all(len(r["draft_text"]) <= MAX_DRAFT_TEXT for r in await database.reminders(lead))


@pytest.fixture
def llm_api_key() -> str:
    """The key the shared `llm` fixture sends (conftest.py): this module looks for it."""
    return "sk-planbus-bad-input-test"


async def test_a_lead_with_megabytes_of_text_reaches_the_model_within_budget(
    database: Database, llm: FakeLLM
) -> None:
    fields = (
        "prospect_name",
        "prospect_title",
        "prospect_company",
        "prospect_analysis",
        "closing_strategy",
        "original_context",
        "web_research",
    )
    huge: dict[str, Any] = dict.fromkeys(fields, "x" * MEGABYTE)
    lead = await database.insert_lead(**huge)
    async with running_worker(database.url, planner="openai", llm_timeout_seconds=5.0):
        row = await database.wait_for(await database.insert_request(lead))
    assert row["status"] == "completed"
    sent = llm.calls[0].user_message
    assert len(sent) <= 6 * FIELD_BUDGET + WEB_RESEARCH_BUDGET + 1_000


async def test_weird_text_and_extreme_numbers_are_planned_and_the_worker_carries_on(
    database: Database,
) -> None:
    requests = []
    for number, text in enumerate(WEIRD_TEXT):
        telegram_id = (BIGINT_MAX, -BIGINT_MAX - 1, 0, -1)[number % 4]
        lead = await database.insert_lead(
            telegram_id=telegram_id,
            prospect_name=text,
            prospect_title=text,
            prospect_company=text,
            web_research=text,
        )
        requests.append(await database.insert_request(lead, telegram_id=telegram_id))
    empty = await database.insert_lead(prospect_name=None, prospect_company=None)
    requests.append(await database.insert_request(empty))
    # An operator may file a request for a user other than the lead's owner.
    someone_elses = await database.insert_lead(telegram_id=7)
    requests.append(await database.insert_request(someone_elses, telegram_id=8))

    async with running_worker(database.url):
        rows = await database.wait_all(requests)
        assert [r["status"] for r in rows] == ["completed"] * len(requests)
        after = await database.wait_for(await database.insert_request(await database.insert_lead()))
    assert after["status"] == "completed"
    reminders = await database.reminders(someone_elses)
    assert {r["telegram_id"] for r in reminders} == {8}


async def test_notifications_with_garbage_payloads_only_wake_the_worker(
    database: Database,
) -> None:
    # Any role may NOTIFY any channel; the payload is never trusted.
    async with running_worker(database.url, sweep_seconds=3600):
        for payload in ("", "not a number", "-1", str(BIGINT_MAX), "{'id': 1}", "x" * 7_900):
            await database.conn.execute("SELECT pg_notify('plan_requests', %s)", (payload,))
        row = await database.wait_for(await database.insert_request(await database.insert_lead()))
    assert row["status"] == "completed"


# -- a lead deleted while its request is in flight ---------------------------------------------


async def test_deleting_a_lead_mid_request_removes_that_request_and_no_other(
    database: Database,
) -> None:
    doomed = await database.insert_lead(telegram_id=1)
    kept = await database.insert_lead(telegram_id=2)
    planner = GatedPlanner()
    async with running_worker(database.url, planner=planner):
        doomed_request = await database.insert_request(doomed, telegram_id=1)
        kept_request = await database.insert_request(kept, telegram_id=2)
        await database.wait_all([doomed_request, kept_request], statuses=("processing",))
        await database.conn.execute("DELETE FROM lead_registry WHERE id = %s", (doomed,))
        planner.gate.set()
        row = await database.wait_for(kept_request)
        after = await database.wait_for(await database.insert_request(kept, telegram_id=2))
    assert row["status"] == after["status"] == "completed"
    assert (
        await database.fetchone("SELECT * FROM plan_requests WHERE id = %s", (doomed_request,))
        is None
    )
    assert (
        await database.value(
            "SELECT count(*) FROM scheduled_reminders WHERE lead_id = %s", (doomed,)
        )
        == 0
    )


async def test_deleting_a_lead_without_a_cascading_key_ends_its_request_failed(
    database: Database,
) -> None:
    # An operator may have dropped the foreign key; the request must still end, and say why.
    await database.conn.execute(
        "ALTER TABLE plan_requests DROP CONSTRAINT plan_requests_lead_id_fkey"
    )
    doomed = await database.insert_lead(telegram_id=1)
    kept = await database.insert_lead(telegram_id=2)
    planner = GatedPlanner()
    async with running_worker(database.url, planner=planner, lease_seconds=1.0, sweep_seconds=0.2):
        doomed_request = await database.insert_request(doomed, telegram_id=1)
        kept_request = await database.insert_request(kept, telegram_id=2)
        await database.wait_all([doomed_request, kept_request], statuses=("processing",))
        await database.conn.execute("DELETE FROM lead_registry WHERE id = %s", (doomed,))
        planner.gate.set()
        rows = await database.wait_all([doomed_request, kept_request])
    assert [r["status"] for r in rows] == ["failed", "completed"]
    assert f"Lead {doomed}" in rows[0]["result"]["error"]
    assert (
        await database.value(
            "SELECT count(*) FROM scheduled_reminders WHERE lead_id = %s", (doomed,)
        )
        == 0
    )


async def test_a_request_row_deleted_mid_request_is_shrugged_off(database: Database) -> None:
    lead = await database.insert_lead()
    planner = GatedPlanner()
    async with running_worker(database.url, planner=planner):
        gone = await database.insert_request(lead)
        await database.wait_for(gone, statuses=("processing",))
        await database.conn.execute("DELETE FROM plan_requests WHERE id = %s", (gone,))
        planner.gate.set()
        row = await database.wait_for(await database.insert_request(lead))
    assert row["status"] == "completed"
    assert len(await database.reminders(lead, "pending")) == row["result"]["step_count"]
