"""A real PgBouncer (transaction mode, no protocol-level prepared statements) in the path.

Work connections through it complete every request exactly once; a LISTEN URL on it is found
out at start-up. Real `python -m planbus.listen` processes, as in test_faults.
"""

from __future__ import annotations

import contextlib
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import anyio
import pytest
from anyio.abc import SocketAttribute, SocketStream, TaskStatus
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from tests.helpers import Database, eventually, figures_reporter, running_worker
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
    return figures_reporter(capsys, "poolers")


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


class Forwarder:
    """A TCP forwarder to the test server that the test can take away, connections and all."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self.scope = anyio.CancelScope()

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        with self.scope:
            listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
            self.port = listener.extra(SocketAttribute.local_port)
            async with listener:
                task_status.started()
                await listener.serve(self._forward)

    async def _forward(self, client: SocketStream) -> None:
        async with client, await anyio.connect_tcp("127.0.0.1", self.target_port) as server:
            async with anyio.create_task_group() as both:
                both.start_soon(self._pipe, client, server)
                both.start_soon(self._pipe, server, client)

    @staticmethod
    async def _pipe(source: SocketStream, sink: SocketStream) -> None:
        with contextlib.suppress(anyio.BrokenResourceError, anyio.ClosedResourceError):
            async for chunk in source:
                await sink.send(chunk)
        await sink.aclose()


async def test_a_listen_reconnect_that_lands_on_a_transaction_pooler_stops_the_worker(
    database: Database, pgbouncer: PgBouncer
) -> None:
    direct = conninfo_to_dict(database.url)
    async with anyio.create_task_group() as tg:
        forwarder = Forwarder(int(str(direct["port"])))
        await tg.start(forwarder.run)
        # libpq tries the hosts in order: the forwarder while it is there, then the pooler.
        listen_url = make_conninfo(
            database.url,
            host="127.0.0.1,127.0.0.1",
            port=f"{forwarder.port},{pgbouncer.port}",
            password=pgbouncer.server_password or None,  # TCP to the server needs it
        )
        async with running_worker(listen_url, work_database_url=database.url) as worker:
            first = await database.insert_request(await database.insert_lead())
            assert (await database.wait_for(first))["status"] == "completed"
            forwarder.scope.cancel()  # the LISTEN connection drops; its reconnect finds the pooler
            await eventually(lambda: worker.failure is not None, 20, "the worker to give up")
        tg.cancel_scope.cancel()
    assert worker.failure is not None
    assert "LISTEN needs a session connection" in str(worker.failure)
    assert not worker.inflight
