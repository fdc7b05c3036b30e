"""Many workers on one database, many users in one queue: one claim per request, fair turns."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import anyio
import pytest

from planbus import runtime
from planbus.bus.fleet import FALLBACK_STEP
from planbus.bus.fleet import Fleet as WorkerFleet
from planbus.bus.worker import Worker
from planbus.settings import load_settings
from tests.helpers import Database, eventually, running_worker, wait_until
from tests.llm_server import FakeLLM, Reply


@pytest.fixture
def llm(llm: FakeLLM) -> FakeLLM:
    """The shared fake model (conftest.py), answering every call after 0.5 s."""
    llm.default = Reply(delay=0.5)
    return llm


@asynccontextmanager
async def running_fleet(url: str, size: int, **overrides: Any) -> AsyncIterator[list[Worker]]:
    """`size` real workers in this process, each with its own id, pool and LISTEN connection,
    every one of them counting the claim statements it sends."""
    from tests.conftest import settings_for

    settings = load_settings(settings_for(url, **overrides))
    async with AsyncExitStack() as stack, anyio.create_task_group() as tg:
        workers = []
        for n in range(size):
            worker = await stack.enter_async_context(
                runtime.open_worker(settings, worker_id=f"test-worker-{n}")
            )
            worker.claims_sent = 0  # type: ignore[attr-defined]
            claim = worker._claim

            async def counted(limit: int, worker: Any = worker, claim: Any = claim) -> Any:
                worker.claims_sent += 1
                return await claim(limit)

            worker._claim = counted  # type: ignore[method-assign]
            await tg.start(worker.run)
            workers.append(worker)
        try:
            yield workers
        finally:
            for worker in workers:
                worker.stop()


def sees(workers: list[Worker], peers: int) -> bool:
    """Every worker knows `peers` live workers (a worker without a fleet: nothing to wait for)."""
    return all(
        len((getattr(w, "fleet", None) and w.fleet.peers) or [0] * peers) == peers for w in workers
    )


@pytest.mark.anyio
async def test_eight_workers_spend_about_one_claim_per_request(database: Database) -> None:
    leads = [await database.insert_lead(telegram_id=n) for n in range(40)]
    async with running_fleet(database.url, 8) as workers:
        await eventually(lambda: sees(workers, 8), 10, "every worker to see 8")
        before = sum(w.claims_sent for w in workers)  # type: ignore[attr-defined]
        for lead in leads:  # one at a time, as a steady trickle arrives
            request_id = await database.insert_request(lead)
            await database.wait_for(request_id)
        claims = sum(w.claims_sent for w in workers) - before  # type: ignore[attr-defined]
        rows = await database.fetchall("SELECT worker_id FROM planbus_workers ORDER BY 1")
    assert claims <= 1.5 * len(leads), f"{claims} claims for {len(leads)} requests"
    assert [r["worker_id"] for r in rows] == [f"test-worker-{n}" for n in range(8)]
    assert await database.value("SELECT count(*) FROM planbus_workers") == 0  # each one left
    completed = await database.value(
        "SELECT count(*) FROM plan_requests WHERE status = 'completed' AND attempts = 1"
    )
    assert completed == len(leads)


@pytest.mark.anyio
async def test_a_request_meant_for_a_dead_worker_is_claimed_by_another(
    database: Database,
) -> None:
    # A worker that died a moment ago still looks live: its requests wait one fallback step,
    # not for the sweep (60 s in tests).
    await database.conn.execute(
        "INSERT INTO planbus_workers (worker_id, inflight, concurrency) VALUES ('test-dead', 0, 8)"
    )
    leads = [await database.insert_lead(telegram_id=n) for n in range(6)]
    async with running_fleet(database.url, 2) as workers:
        await eventually(lambda: sees(workers, 3), 10, "every worker to see 3")
        ids = [await database.insert_request(lead) for lead in leads]
        rows = await database.wait_all(ids, within=5.0)
    assert {r["status"] for r in rows} == {"completed"}


@pytest.mark.anyio
async def test_a_worker_keeps_its_row_while_running_and_removes_it_on_stop(
    database: Database, llm: FakeLLM
) -> None:
    lead = await database.insert_lead()
    # A lease of 1 s: the heartbeat (lease/4) renews the row while the 0.5 s call runs.
    async with running_worker(database.url, "openai", concurrency=3, lease_seconds=1.0) as worker:
        row = await database.fetchone("SELECT * FROM planbus_workers")
        assert row is not None
        assert row["worker_id"] == worker.worker_id
        assert (row["inflight"], row["concurrency"], row["llm_limit"]) == (0, 3, 3)
        assert row["version"]
        request_id = await database.insert_request(lead)
        busy = await wait_until(
            lambda: database.fetchone("SELECT * FROM planbus_workers"),
            lambda row: row["inflight"] == 1,
            5,
            "the heartbeat to say one request is in flight",
        )
        assert busy["heartbeat_at"] > row["heartbeat_at"]
        await database.wait_for(request_id)
    assert await database.value("SELECT count(*) FROM planbus_workers") == 0


@pytest.mark.anyio
@pytest.mark.slow
async def test_one_users_batch_does_not_hold_back_other_users(
    database: Database, llm: FakeLLM
) -> None:
    busy_leads = [await database.insert_lead(telegram_id=1) for _ in range(20)]
    other_leads = {user: await database.insert_lead(telegram_id=user) for user in (2, 3, 4)}
    async with running_worker(database.url, "openai", concurrency=2):
        busy = [await database.insert_request(lead, telegram_id=1) for lead in busy_leads]
        others = [await database.insert_request(lead, user) for user, lead in other_leads.items()]
        await database.wait_all(others, within=20.0)
        rows = await database.fetchall(
            "SELECT id, telegram_id, claimed_at, extract(epoch FROM finished_at - created_at) "
            "AS seconds FROM plan_requests WHERE status = 'completed' ORDER BY claimed_at"
        )
    order = [r["id"] for r in rows]
    # The busy user's first two requests took both slots before the others arrived; then
    # every other user's request comes before the busy user's third.
    third = order.index(busy[2]) if busy[2] in order else len(order)
    assert all(order.index(other) < third for other in others), order
    # 0.5 s per call, 2 at once: the three are done after about 1.5 s, not after 5.5 s.
    assert all(r["seconds"] <= 2.5 for r in rows if r["telegram_id"] != 1), rows


def fleet_of(names: list[str]) -> list[WorkerFleet]:
    fleets = [WorkerFleet(name, None, 5.0) for name in names]  # type: ignore[arg-type]
    pids = [PID + n for n in range(len(names))]  # each one's claim connection
    for fleet, pid in zip(fleets, pids, strict=True):
        fleet.claim_pid = pid
        fleet.set_peers(names, pids)
    return fleets


PID = 1000  # host:1's claim connection; host:2's is PID + 1


@pytest.mark.anyio
async def test_each_request_has_exactly_one_designated_claimer() -> None:
    fleets = fleet_of(["host:1", "host:2", "host:3"])
    for request_id in range(1, 31):
        assert sum(f.heard(str(request_id), now=0.0) for f in fleets) == 1
    # The others planned fallbacks one step per place apart.
    assert sorted(f.next_fallback() for f in fleets) == [FALLBACK_STEP] * 3
    # A payload that is not an id (a hand-written NOTIFY) lets anyone look.
    assert all(f.heard("hello", now=0.0) for f in fleets)


@pytest.mark.anyio
async def test_a_peers_claim_drops_the_fallbacks_its_own_does_not() -> None:
    mine, _ = fleet_of(["host:1", "host:2"])
    assert not mine.heard("1", now=0.0)  # id 1 is host:2's
    mine.claimed_elsewhere("p host:1", PID)  # this worker's own announcement
    assert mine.fallback_due(now=1.0)
    assert not mine.heard("3", now=0.0)
    mine.claimed_elsewhere("f host:2 3,4", PID + 1)  # the limit stopped it, but it took 3
    assert not mine.fallback_due(now=1.0)
    assert not mine.heard("5", now=0.0)
    mine.claimed_elsewhere("p host:2", PID + 1)  # it took every due request it found
    assert mine.next_fallback() == float("inf")
    mine.claimed_elsewhere("nonsense", PID + 1)  # ignored


@pytest.mark.anyio
async def test_a_claim_announcement_from_any_other_session_is_ignored() -> None:
    # Any role that may connect can NOTIFY planbus_claims: only a live peer's claim connection
    # (its backend pid, from planbus_workers) may drop a fallback this worker owes a request.
    mine, _ = fleet_of(["host:1", "host:2"])
    assert not mine.heard("1", now=0.0)  # id 1 is host:2's; host:1 falls back to it
    mine.claimed_elsewhere("p host:2", 4242)  # forged: names the peer, another backend
    mine.claimed_elsewhere("f host:2 1", 4242)
    assert mine.fallback_due(now=1.0)  # still owed
