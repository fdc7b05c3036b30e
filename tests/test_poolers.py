"""A real PgBouncer (transaction mode, no protocol-level prepared statements) in the path.

Work connections through it complete every request exactly once; a LISTEN URL on it is found
out at start-up. Real `python -m planbus.listen` processes, as in test_faults.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import anyio
import pytest

from tests.helpers import Database
from tests.llm_server import FakeLLM, Reply
from tests.pgbouncer import PgBouncer
from tests.processes import Fleet, WorkerProcess
from tests.test_faults import calls_by_lead, insert_leads, lead_name

pytestmark = [pytest.mark.anyio, pytest.mark.faults]

REQUESTS = 150


@pytest.fixture
def llm() -> Iterator[FakeLLM]:
    with FakeLLM() as server:
        yield server


@pytest.fixture
def report(capsys: pytest.CaptureFixture[str]) -> Callable[[str], None]:
    """Print a scenario's line of figures past pytest's capture."""

    def emit(line: str) -> None:
        with capsys.disabled():
            print(f"\n[poolers] {line}", flush=True)

    return emit


async def test_work_through_a_transaction_pooler_completes_each_request_once(
    database: Database,
    pgbouncer: PgBouncer,
    llm: FakeLLM,
    tmp_path: Path,
    report: Callable[[str], None],
) -> None:
    pooled = pgbouncer.dsn(database.url)
    pgbouncer.check(database.url)
    llm.default = Reply(delay=0.02)
    numbers = range(1, REQUESTS + 1)
    leads = await insert_leads(database, numbers)
    async with Fleet(database.url, tmp_path, llm.base_url) as fleet:
        workers = [await fleet.start(env={"PLANBUS_WORK_DATABASE_URL": pooled}) for _ in range(2)]
        started = time.monotonic()
        ids = []
        for lead in leads.values():  # about 100 a second, one INSERT each, as the TMA does
            ids.append(await database.insert_request(lead, telegram_id=42))
            await anyio.sleep(0.01)
        rows = await database.wait_all(ids, within=60)
        drained = time.monotonic() - started
        logs = "\n".join(worker.log() for worker in workers)

    assert Counter(row["status"] for row in rows) == {"completed": REQUESTS}
    assert calls_by_lead(llm) == Counter({lead_name(n): 1 for n in numbers})
    assert [row["attempts"] for row in rows] == [1] * REQUESTS
    assert "prepared statement" not in logs
    assert not any("prepared statement" in str(row["result"]) for row in rows)
    pickup = sorted((row["claimed_at"] - row["created_at"]).total_seconds() * 1000 for row in rows)
    report(
        f"PgBouncer transaction mode, pool 3, two workers: {REQUESTS} requests completed in "
        f"{drained:.2f}s, {len(llm.calls)} LLM calls, pickup p50 {pickup[len(pickup) // 2]:.0f} "
        f"ms p99 {pickup[int(len(pickup) * 0.99)]:.0f} ms"
    )


async def test_a_listen_url_on_a_transaction_pooler_is_refused_with_one_line(
    database: Database,
    pgbouncer: PgBouncer,
    tmp_path: Path,
    report: Callable[[str], None],
) -> None:
    worker = WorkerProcess(pgbouncer.dsn(database.url), tmp_path / "worker.log")
    started = time.monotonic()
    try:
        with pytest.raises(AssertionError, match=r"exited \(2\)"):
            await worker.start(within=20)
        code = await worker.wait()
    finally:
        await worker.aclose()
    took = time.monotonic() - started
    lines = worker.log().strip().splitlines()

    assert code == 2
    assert took < 10
    assert len(lines[-1]) < 400
    assert "PLANBUS_DATABASE_URL" in lines[-1]
    assert "LISTEN needs a session connection" in lines[-1]
    assert "Traceback" not in worker.log()
    report(f"LISTEN URL on PgBouncer transaction mode: exit 2 after {took:.2f}s: {lines[-1]}")
