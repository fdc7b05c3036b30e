"""planbus on its worst day: real `python -m planbus.listen` processes under crashes, freezes,
a database restart, many workers, SIGTERM and a burst, checked in the database afterwards.

Each scenario prints one line of figures (shown even without `-s`). Waits poll database state,
the LLM server's record of calls, or a worker's log, always with a deadline.
"""

from __future__ import annotations

import json
import re
import signal
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import anyio.to_thread
import psycopg
import pytest

from tests.conftest import TestServer
from tests.helpers import Database, Events, figures_reporter, listening_events, wait_until
from tests.llm_server import FakeLLM, Reply
from tests.processes import Fleet

pytestmark = [pytest.mark.anyio, pytest.mark.faults]

# A short lease and a quick sweep: a dead worker's claim is recovered within about 1.5 s.
FAST_RECOVERY = ("--lease-seconds", "1", "--sweep-seconds", "0.5")
# A worker that never sweeps on its own: only another worker can recover its claims.
NO_SWEEP = ("--lease-seconds", "1", "--sweep-seconds", "600")

NAME = re.compile(r"Fault Lead \d{5}")


@pytest.fixture
def llm() -> Iterator[FakeLLM]:
    with FakeLLM() as server:
        yield server


@pytest.fixture
async def fleet(database_url: str, tmp_path: Path, llm: FakeLLM) -> AsyncIterator[Fleet]:
    """Worker processes for this test (openai planner against `llm` unless told otherwise)."""
    async with Fleet(database_url, tmp_path, llm.base_url) as workers:
        yield workers


@pytest.fixture
def report(capsys: pytest.CaptureFixture[str]) -> Callable[[str], None]:
    """Print a scenario's line of figures past pytest's capture."""
    return figures_reporter(capsys, "faults")


def lead_name(number: int) -> str:
    return f"Fault Lead {number:05d}"


def calls_by_lead(llm: FakeLLM) -> Counter[str]:
    """How many LLM calls carried each lead's name in the user message."""
    return Counter(name for call in list(llm.calls) for name in NAME.findall(call.user_message))


async def wait_for_calls(llm: FakeLLM, name: str, count: int, within: float = 20.0) -> None:
    async def seen() -> int:
        return calls_by_lead(llm)[name]

    await wait_until(seen, lambda n: n >= count, within, f"{count} LLM calls for {name}")


async def insert_leads(database: Database, numbers: range) -> dict[int, int]:
    """One lead per number, named `lead_name(number)`; lead id by number."""
    rows = await database.fetchall(
        "INSERT INTO lead_registry (telegram_id, prospect_name, prospect_company) "
        "SELECT 1000 + n, format('Fault Lead %%s', lpad(n::text, 5, '0')), 'Faultline' "
        "FROM unnest(%s::int[]) AS n RETURNING id, telegram_id - 1000 AS number",
        (list(numbers),),
    )
    return {row["number"]: row["id"] for row in rows}


async def request_plans(database: Database, leads: list[int]) -> list[int]:
    """One plan request per lead, all in one INSERT (as many TMA taps at once)."""
    rows = await database.fetchall(
        "INSERT INTO plan_requests (lead_id, telegram_id) "
        "SELECT id, telegram_id FROM lead_registry WHERE id = ANY(%s) ORDER BY id RETURNING id",
        (leads,),
    )
    return [row["id"] for row in rows]


async def reminders_per_lead(database: Database, leads: list[int]) -> dict[int, int]:
    rows = await database.fetchall(
        "SELECT lead_id, count(*) AS n FROM scheduled_reminders WHERE lead_id = ANY(%s) "
        "GROUP BY lead_id",
        (leads,),
    )
    return {row["lead_id"]: row["n"] for row in rows}


async def flush_events(database: Database, events: Events) -> None:
    """Wait until every event committed so far has arrived: NOTIFYs arrive in commit order,
    so once our own marker is in, nothing sent before it is still on its way."""
    marker = json.dumps({"id": -1, "status": "marker"})
    await database.conn.execute("SELECT pg_notify('plan_request_events', %s)", (marker,))
    await events.wait_for(-1)


async def test_request_killed_mid_call_is_completed_once_by_another_worker(
    database: Database, llm: FakeLLM, fleet: Fleet, report: Callable[[str], None]
) -> None:
    llm.script(Reply(hang=True))  # the first call never answers: the worker dies waiting
    lead = (await insert_leads(database, range(1, 2)))[1]
    doomed = await fleet.start(*NO_SWEEP)
    [request_id] = await request_plans(database, [lead])
    await wait_for_calls(llm, lead_name(1), 1)

    await doomed.kill()
    killed = time.monotonic()
    rescuer = await fleet.start(*FAST_RECOVERY)
    row = await database.wait_for(request_id, within=20)
    recovered = time.monotonic() - killed

    assert row["status"] == "completed"
    assert row["attempts"] == 2
    steps = row["result"]["plan"]
    reminders = await database.reminders(lead)
    assert [r["step_id"] for r in reminders] == [s["step_id"] for s in steps]
    assert {r["status"] for r in reminders} == {"pending"}
    assert calls_by_lead(llm)[lead_name(1)] == 2
    assert f"request {request_id} recovered from an expired claim" in rescuer.log()
    report(
        f"kill -9 mid-request: completed {recovered:.2f}s after the kill "
        f"(rescuer ready after {rescuer.ready_at - killed:.2f}s), attempts {row['attempts']}, "
        f"{len(reminders)} reminders, 2 LLM calls"
    )


async def snapshot(database: Database, request_id: int, lead: int) -> dict[str, Any]:
    """Everything a stray write from a stale worker could change."""
    return {
        "request": await database.request(request_id),
        "lead": await database.fetchone("SELECT * FROM lead_registry WHERE id = %s", (lead,)),
        "reminders": await database.reminders(lead),
    }


async def test_worker_frozen_past_its_lease_writes_nothing_when_it_wakes(
    database: Database, llm: FakeLLM, fleet: Fleet, report: Callable[[str], None]
) -> None:
    llm.script(Reply(delay=1.0))  # answered while the worker is frozen: it wakes with a plan
    lead = (await insert_leads(database, range(1, 2)))[1]
    async with listening_events(database.url) as events:
        frozen = await fleet.start(*NO_SWEEP)
        [request_id] = await request_plans(database, [lead])
        await wait_for_calls(llm, lead_name(1), 1)
        frozen.send(signal.SIGSTOP)
        stopped = time.monotonic()

        async def lease_expired() -> bool:
            return bool(
                await database.value(
                    "SELECT lease_expires_at < now() FROM plan_requests WHERE id = %s",
                    (request_id,),
                )
            )

        await wait_until(lease_expired, bool, 10, "the frozen worker's lease to expire")
        rescuer = await fleet.start(*FAST_RECOVERY)
        completed = await database.wait_for(request_id, within=20)
        taken_over = time.monotonic() - stopped
        before = await snapshot(database, request_id, lead)

        frozen.send(signal.SIGCONT)
        # Whatever it then does with the request, it logs it; the database decides below.
        outcome = re.compile(rf"request {request_id}\b.*(taken over|completed)")
        await frozen.wait_for_log(outcome, within=15)
        code, _ = await frozen.terminate()
        after = await snapshot(database, request_id, lead)
        await flush_events(database, events)

    assert completed["status"] == "completed"
    assert completed["attempts"] == 2
    assert completed["worker_id"].endswith(f":{rescuer.pid}")
    assert after == before
    assert len(after["reminders"]) == completed["result"]["step_count"]
    assert [e["status"] for e in events.for_request(request_id)] == ["completed"]
    assert code == 0  # frozen, thawed, still a healthy worker that stops cleanly
    report(
        f"frozen past lease: rescued {taken_over:.2f}s after SIGSTOP; after SIGCONT the stale "
        f"worker wrote nothing ({len(after['reminders'])} reminders, 1 completed event)"
    )


async def test_request_whose_worker_dies_on_every_attempt_ends_failed(
    database: Database, llm: FakeLLM, fleet: Fleet, report: Callable[[str], None]
) -> None:
    flags = (*FAST_RECOVERY, "--max-attempts", "3")
    victim_lead = (await insert_leads(database, range(1, 2)))[1]
    [victim] = await request_plans(database, [victim_lead])
    bystanders: list[int] = []
    bystander_leads: list[int] = []
    started = time.monotonic()
    for attempt in range(1, 4):
        # Only the victim is pending when this worker calls the LLM, so the hang is its own.
        llm.script(Reply(hang=True))
        worker = await fleet.start(*flags)
        await wait_for_calls(llm, lead_name(1), attempt)
        first = 10 * attempt
        leads = list((await insert_leads(database, range(first, first + 3))).values())
        batch = await request_plans(database, leads)
        await database.wait_all(batch)
        bystanders += batch
        bystander_leads += leads
        await worker.kill()

    survivor = await fleet.start(*flags)
    row = await database.wait_for(victim, within=20)
    gave_up = time.monotonic() - started
    leads = list((await insert_leads(database, range(40, 43))).values())
    bystanders += await request_plans(database, leads)
    bystander_leads += leads
    others = await database.wait_all(bystanders)

    assert row["status"] == "failed"
    assert row["attempts"] == 3
    error = row["result"]["error"]
    assert "worker" in error.lower() and "stopped responding" in error
    assert "\n" not in error
    assert await database.reminders(victim_lead) == []
    assert calls_by_lead(llm)[lead_name(1)] == 3
    assert all(r["status"] == "completed" and r["attempts"] == 1 for r in others)
    assert set((await reminders_per_lead(database, bystander_leads)).values()) == {6}
    assert survivor.alive
    report(
        f"repeated crashes: failed after 3 attempts in {gave_up:.1f}s ({error!r}); "
        f"{len(others)} other requests completed with 1 attempt each"
    )


async def test_worker_reconnects_after_database_restart(
    database_url: str, pg_server: TestServer, fleet: Fleet, report: Callable[[str], None]
) -> None:
    # No sweep: only a LISTEN connection that came back (and caught up) finds the new row.
    worker = await fleet.start("--sweep-seconds", "600", planner="template")
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
        database = Database(conn, database_url)
        leads = list((await insert_leads(database, range(1, 3))).values())
        [before] = await request_plans(database, leads[:1])
        await database.wait_for(before)

    down = time.monotonic()
    await anyio.to_thread.run_sync(pg_server.restart)
    restart_took = time.monotonic() - down

    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
        database = Database(conn, database_url)
        inserted = time.monotonic()
        [after] = await request_plans(database, leads[1:])
        row = await database.wait_for(after, within=10)
        took = time.monotonic() - inserted
        assert row["status"] == "completed"
        assert row["attempts"] == 1
        assert row["worker_id"].endswith(f":{worker.pid}")
    log = await worker.wait_for_log("LISTEN connection reconnected", within=10)
    assert "LISTEN connection lost" in log
    code, _ = await worker.terminate()
    assert code == 0
    report(
        f"database restart: server down and up in {restart_took:.2f}s; a row inserted right "
        f"after completed in {took:.2f}s by the same worker, which logged its reconnect"
    )


async def test_three_workers_complete_300_requests_with_one_llm_call_each(
    database: Database, llm: FakeLLM, fleet: Fleet, report: Callable[[str], None]
) -> None:
    llm.default = Reply(delay=0.02)  # a little latency, so the three workers overlap
    workers = [await fleet.start("--concurrency", "16") for _ in range(3)]
    numbers = range(1, 301)
    leads = await insert_leads(database, numbers)
    started = time.monotonic()
    ids = await request_plans(database, list(leads.values()))
    rows = await database.wait_all(ids, within=90)
    drained = time.monotonic() - started

    assert [r["status"] for r in rows] == ["completed"] * 300
    calls = calls_by_lead(llm)
    assert calls == Counter({lead_name(n): 1 for n in numbers})
    per_lead = await reminders_per_lead(database, list(leads.values()))
    assert per_lead == {r["lead_id"]: r["result"]["step_count"] for r in rows}
    by_worker = Counter(r["worker_id"].rsplit(":", 1)[1] for r in rows)
    assert set(by_worker) <= {str(w.pid) for w in workers}
    report(
        f"three workers: 300 requests in {drained:.2f}s ({300 / drained:.0f}/s), "
        f"{len(llm.calls)} LLM calls, per worker {sorted(by_worker.values(), reverse=True)}"
    )


async def test_sigterm_finishes_or_hands_back_in_flight_requests_and_exits_0(
    database: Database, llm: FakeLLM, fleet: Fleet, report: Callable[[str], None]
) -> None:
    grace = 3.0
    # Two answers arrive within the grace period, three never do.
    llm.script(
        Reply(delay=1.0), Reply(delay=1.0), Reply(hang=True), Reply(hang=True), Reply(hang=True)
    )
    worker = await fleet.start(env={"PLANBUS_SHUTDOWN_GRACE_SECONDS": str(grace)})
    leads = await insert_leads(database, range(1, 7))
    ids = await request_plans(database, [leads[n] for n in range(1, 6)])

    async def calls() -> int:
        return len(llm.calls)

    await wait_until(calls, lambda n: n == 5, 20, "five LLM calls in flight")
    sent = time.monotonic()
    worker.send(signal.SIGTERM)
    await worker.wait_for_log("received SIGTERM")
    [late] = await request_plans(database, [leads[6]])
    code = await worker.wait(within=grace + 15)
    exited = time.monotonic() - sent

    rows = await database.fetchall(
        "SELECT status, attempts FROM plan_requests WHERE id = ANY(%s)", (ids,)
    )
    late_row = await database.request(late)
    assert code == 0
    assert exited < grace + 3
    assert sorted(r["status"] for r in rows) == ["completed"] * 2 + ["pending"] * 3
    assert all(r["attempts"] == 1 for r in rows)
    assert (late_row["status"], late_row["attempts"]) == ("pending", 0)
    assert "handed back 3 unfinished requests" in worker.log()

    restarted = await fleet.start()
    after = await database.wait_all([*ids, late])
    assert [r["status"] for r in after] == ["completed"] * 6
    assert restarted.alive
    report(
        f"graceful stop: exit 0 {exited:.2f}s after SIGTERM (grace {grace:.0f}s), 2 finished, "
        "3 handed back and completed by the next worker, the late row waited with attempts 0"
    )


async def test_idle_worker_stops_at_once_on_sigterm(
    database: Database, fleet: Fleet, report: Callable[[str], None]
) -> None:
    worker = await fleet.start(planner="template")
    code, took = await worker.terminate()
    assert code == 0
    assert took < 5
    assert worker.log().rstrip().endswith("stopped")
    report(f"idle stop: exit 0 {took:.2f}s after SIGTERM")


@pytest.mark.timeout(240)
async def test_burst_of_5000_requests_completes_each_exactly_once(
    database: Database, llm: FakeLLM, fleet: Fleet, report: Callable[[str], None]
) -> None:
    count = 5000
    await fleet.start()  # the fake LLM answers at once; it runs in this process and sets the pace
    leads = await insert_leads(database, range(1, count + 1))
    async with listening_events(database.url) as events:
        ids = await request_plans(database, list(leads.values()))

        async def finished() -> int:
            return int(
                await database.value(
                    "SELECT count(*) FROM plan_requests WHERE status IN ('completed', 'failed')"
                )
            )

        await wait_until(finished, lambda n: n >= count, 180, f"{count} requests to finish")
        await flush_events(database, events)

    statuses = await database.fetchall(
        "SELECT status, count(*) AS n, sum(attempts) AS attempts FROM plan_requests GROUP BY status"
    )
    assert statuses == [{"status": "completed", "n": count, "attempts": count}]
    per_lead = await reminders_per_lead(database, list(leads.values()))
    assert len(per_lead) == count and set(per_lead.values()) == {6}
    completed_events = Counter(e["id"] for e in events.received if e["status"] == "completed")
    assert completed_events == Counter(dict.fromkeys(ids, 1))
    assert calls_by_lead(llm) == Counter({lead_name(n): 1 for n in leads})
    span = float(
        await database.value(
            "SELECT extract(epoch FROM max(finished_at) - min(created_at)) FROM plan_requests"
        )
    )
    report(
        f"burst: {count} requests drained in {span:.2f}s ({count / span:.0f}/s), "
        f"{len(llm.calls)} LLM calls, {sum(per_lead.values())} reminders, "
        f"{len(completed_events)} events: none lost, none twice"
    )


@pytest.mark.timeout(240)
async def test_eight_workers_survive_a_kill_a_freeze_and_a_sigterm(
    database: Database, llm: FakeLLM, fleet: Fleet, report: Callable[[str], None]
) -> None:
    # The fleet shares claiming by request id: a killed, a frozen and a stopping worker must
    # cost their requests latency, never the request or a second set of effects.
    llm.default = Reply(delay=0.3)
    workers = [await fleet.start(*FAST_RECOVERY, within=60) for _ in range(8)]
    numbers = range(1, 121)
    leads = await insert_leads(database, numbers)
    started = time.monotonic()
    async with listening_events(database.url) as events:
        ids = await request_plans(database, list(leads.values()))

        async def calls() -> int:
            return len(llm.calls)

        await wait_until(calls, lambda n: n >= 20, 30, "twenty LLM calls")
        killed, frozen, stopped = workers[0], workers[1], workers[2]
        await killed.kill()
        frozen.send(signal.SIGSTOP)
        stopped.send(signal.SIGTERM)
        assert await stopped.wait(within=30) == 0
        rows = await database.wait_all(ids, within=120)
        frozen.send(signal.SIGCONT)
        await flush_events(database, events)
    drained = time.monotonic() - started

    assert [r["status"] for r in rows] == ["completed"] * len(ids)
    per_lead = await reminders_per_lead(database, list(leads.values()))
    assert per_lead == {r["lead_id"]: r["result"]["step_count"] for r in rows}
    completed = Counter(e["id"] for e in events.received if e["status"] == "completed")
    assert completed == Counter(dict.fromkeys(ids, 1))
    retried = sum(1 for r in rows if r["attempts"] > 1)
    report(
        f"eight workers, one killed, one frozen, one stopped: {len(ids)} requests completed "
        f"once each in {drained:.1f}s ({retried} after a recovery), {len(llm.calls)} LLM calls"
    )
