"""Metrics and health over real HTTP: what a Prometheus scrape and a liveness probe see."""

from __future__ import annotations

import json
import os
import resource
import socket
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import pytest
from prometheus_client.parser import text_string_to_metric_families
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict

from planbus import runtime
from planbus.bus.worker import Worker
from planbus.errors import PermanentError, TransientError
from planbus.llm.plan import Lead, Plan
from planbus.llm.planner import TemplatePlanner
from tests.conftest import TestServer
from tests.helpers import Database, running_worker, wait_until
from tests.processes import WorkerProcess
from tests.test_listen_command import listen_env, run_listen

pytestmark = pytest.mark.anyio


@asynccontextmanager
async def serving(worker: Worker) -> AsyncIterator[str]:
    """The worker's /metrics and /healthz on an ephemeral loopback port; yields the base URL."""
    async with anyio.create_task_group() as tg:
        port = await tg.start(runtime.serve_metrics, worker, "127.0.0.1", 0)
        yield f"http://127.0.0.1:{port}"
        tg.cancel_scope.cancel()


def fetch(url: str) -> tuple[int, str, str]:
    """GET `url`: status, content type, body (an HTTP error status is an answer too)."""
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.headers["Content-Type"], response.read().decode()
    except urllib.error.HTTPError as error:
        with error:
            return error.code, error.headers["Content-Type"], error.read().decode()


async def get(url: str) -> tuple[int, str, str]:
    return await anyio.to_thread.run_sync(fetch, url)


def sample(text: str, name: str, **labels: str) -> float:
    """The value of one sample in a Prometheus text exposition."""
    for family in text_string_to_metric_families(text):
        for found in family.samples:
            if found.name == name and found.labels == labels:
                return float(found.value)
    raise AssertionError(f"no sample {name}{labels} in:\n{text}")


async def test_metrics_count_a_completed_request_with_its_latencies(database: Database) -> None:
    lead = await database.insert_lead()
    async with running_worker(database.url) as worker, serving(worker) as base:
        request_id = await database.insert_request(lead)
        await database.wait_for(request_id)
        # Two pending requests the worker must not claim yet: one backing off for an hour,
        # inserted a minute ago, gives the queue depth and the oldest pending age.
        other = await database.insert_lead(telegram_id=43)
        await database.conn.execute(
            "INSERT INTO plan_requests (lead_id, telegram_id, created_at, run_after) "
            "VALUES (%s, 43, now() - interval '1 minute', now() + interval '1 hour')",
            (other,),
        )
        status, content_type, text = await get(f"{base}/metrics")

    assert status == 200
    assert content_type.startswith("text/plain")
    assert sample(text, "planbus_requests_total", outcome="completed") == 1
    assert sample(text, "planbus_pickup_latency_seconds_count") == 1
    assert 0 < sample(text, "planbus_pickup_latency_seconds_sum") < 5
    assert sample(text, "planbus_processing_seconds_count") == 1
    assert sample(text, "planbus_requests_in_flight") == 0
    assert sample(text, "planbus_queue_depth") == 1
    assert 60 <= sample(text, "planbus_oldest_pending_age_seconds") < 120
    assert sample(text, "planbus_listen_connected") == 1
    assert sample(text, "planbus_listen_reconnects_total") == 0


class ScriptedPlanner(TemplatePlanner):
    """Fails by the lead's name: `flaky` once with a transient error, `doomed` for good."""

    def __init__(self) -> None:
        self.calls: dict[str | None, int] = {}

    async def plan(self, lead: Lead, on_progress: object = None) -> Plan:
        calls = self.calls[lead.prospect_name] = self.calls.get(lead.prospect_name, 0) + 1
        if lead.prospect_name == "flaky" and calls == 1:
            raise TransientError("The model took too long to answer.")
        if lead.prospect_name == "doomed":
            raise PermanentError("The LLM credentials were refused.")
        return await super().plan(lead)


async def test_metrics_count_retries_failures_errors_by_kind_and_sweep_recoveries(
    database: Database,
) -> None:
    flaky = await database.insert_lead(prospect_name="flaky")
    doomed = await database.insert_lead(prospect_name="doomed")
    orphan_lead = await database.insert_lead(prospect_name="orphan")
    # A claim whose worker died: the sweep (which runs when a worker starts) must recover it.
    orphan = await database.value(
        "INSERT INTO plan_requests (lead_id, telegram_id, status, attempts, claim_token, "
        "worker_id, lease_expires_at) VALUES (%s, 42, 'processing', 1, gen_random_uuid(), "
        "'dead-host:1', now() - interval '1 minute') RETURNING id",
        (orphan_lead,),
    )
    async with (
        running_worker(database.url, planner=ScriptedPlanner()) as worker,
        serving(worker) as base,
    ):
        ids = [await database.insert_request(lead) for lead in (flaky, doomed)]
        rows = await database.wait_all([*ids, orphan])
        _, _, text = await get(f"{base}/metrics")

    statuses = {r["id"]: r["status"] for r in rows}
    assert statuses == {ids[0]: "completed", ids[1]: "failed", orphan: "completed"}
    assert sample(text, "planbus_sweep_recoveries_total", status="pending") == 1
    assert sample(text, "planbus_requests_total", outcome="retry") == 1
    assert sample(text, "planbus_requests_total", outcome="failed") == 1
    assert sample(text, "planbus_requests_total", outcome="completed") == 2
    assert sample(text, "planbus_planner_errors_total", kind="transient") == 1
    assert sample(text, "planbus_planner_errors_total", kind="permanent") == 1
    # Only first attempts measure insert -> claim; the retry and the recovered claim do not.
    assert sample(text, "planbus_pickup_latency_seconds_count") == 2


def allow_connections(pg_server: TestServer, url: str, allowed: bool) -> None:
    """Let new sessions into the test's database, or turn them all away (existing ones stay)."""
    name = sql.Identifier(str(conninfo_to_dict(url)["dbname"]))
    value = sql.SQL("true" if allowed else "false")
    pg_server.execute(sql.SQL("ALTER DATABASE {} ALLOW_CONNECTIONS {}").format(name, value))


async def test_healthz_is_503_while_the_listen_connection_is_down(
    database: Database, pg_server: TestServer
) -> None:
    async with running_worker(database.url) as worker, serving(worker) as base:
        assert (await get(f"{base}/healthz"))[0] == 200
        # Kill the LISTEN session and keep it from coming back; the work pool stays connected.
        allow_connections(pg_server, database.url, False)
        try:
            await database.conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = current_database() AND application_name = 'planbus-listen'"
            )
            status, _, body = await wait_until(
                lambda: get(f"{base}/healthz"), lambda r: r[0] != 200, 10, "/healthz to fail"
            )
            assert (status, body) == (503, "LISTEN connection is down\n")
            assert sample((await get(f"{base}/metrics"))[2], "planbus_listen_connected") == 0
        finally:
            allow_connections(pg_server, database.url, True)
        await wait_until(
            lambda: get(f"{base}/healthz"), lambda r: r[0] == 200, 15, "/healthz to recover"
        )
        _, _, text = await get(f"{base}/metrics")
    assert sample(text, "planbus_listen_reconnects_total") == 1


async def test_healthz_is_503_when_the_database_does_not_answer(
    database: Database, pg_server: TestServer
) -> None:
    async with running_worker(database.url) as worker, serving(worker) as base:
        # The work connections die and no new session is accepted; LISTEN itself stays up.
        allow_connections(pg_server, database.url, False)
        try:
            await database.conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = current_database() AND application_name = 'planbus'"
            )
            assert worker.listener.connected
            status, _, body = await get(f"{base}/healthz")
            _, _, text = await get(f"{base}/metrics")
        finally:
            allow_connections(pg_server, database.url, True)
        # The pool reconnects on its own once the database takes sessions again.
        await wait_until(
            lambda: get(f"{base}/healthz"), lambda r: r[0] == 200, 15, "/healthz to recover"
        )
    assert status == 503
    assert body.startswith("database does not answer")
    assert sample(text, "planbus_queue_depth") != sample(text, "planbus_queue_depth")  # NaN


async def test_unknown_paths_get_404(database: Database) -> None:
    async with running_worker(database.url) as worker, serving(worker) as base:
        assert (await get(f"{base}/"))[0] == 404


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_listen_serves_metrics_and_logs_each_state_change_as_json(
    database: Database, tmp_path: Path
) -> None:
    port = free_port()
    worker = WorkerProcess(
        database.url,
        tmp_path / "worker.log",
        flags=[f"--metrics-port={port}", "--log-format=json"],
    )
    lead = await database.insert_lead()
    try:
        await worker.start()
        status, _, _ = await get(f"http://127.0.0.1:{port}/healthz")
        request_id = await database.insert_request(lead)
        await database.wait_for(request_id)
        _, _, text = await get(f"http://127.0.0.1:{port}/metrics")
        code, _ = await worker.terminate()
    finally:
        await worker.aclose()

    assert status == 200
    assert sample(text, "planbus_requests_total", outcome="completed") == 1
    assert code == 0
    lines = [json.loads(line) for line in worker.log().splitlines()]
    changes = [line for line in lines if line.get("request_id") == request_id]
    assert [c["outcome"] for c in changes] == ["claimed", "completed"]
    for change in changes:
        assert change["lead_id"] == lead
        assert change["attempt"] == 1
        assert isinstance(change["duration_ms"], float)
        assert f"request {request_id}" in change["message"]


class MetricsWorker:
    """A `python -m planbus.listen --metrics-port` process, and idle clients held against it."""

    def __init__(self, worker: WorkerProcess, port: int) -> None:
        self.worker = worker
        self.base = f"http://127.0.0.1:{port}"
        self.port = port
        self.idle: list[socket.socket] = []

    def limit_descriptors(self, limit: int) -> None:
        """As `prlimit --nofile=LIMIT --pid PID`."""
        resource.prlimit(self.worker.pid, resource.RLIMIT_NOFILE, (limit, limit))

    def hold_idle_connections(self, count: int) -> None:
        """Connect and send nothing, as a slowloris client does."""
        self.idle.extend(socket.create_connection(("127.0.0.1", self.port)) for _ in range(count))


@asynccontextmanager
async def metrics_worker(database: Database, tmp_path: Path) -> AsyncIterator[MetricsWorker]:
    port = free_port()
    worker = WorkerProcess(database.url, tmp_path / "worker.log", flags=[f"--metrics-port={port}"])
    running = MetricsWorker(worker, port)
    try:
        await worker.start()
        yield running
    finally:
        for connection in running.idle:
            connection.close()
        await worker.aclose()


async def test_idle_connections_never_stop_metrics_or_the_worker(
    database: Database, tmp_path: Path
) -> None:
    async with metrics_worker(database, tmp_path) as running:
        log = running.worker.log()
        assert f"metrics on {running.base}/metrics" in log  # loopback by default
        running.limit_descriptors(256)  # fewer than the idle clients below hold open
        running.hold_idle_connections(300)
        status, _, text = await get(f"{running.base}/metrics")
        assert status == 200
        assert "planbus_requests_in_flight" in text
        request_id = await database.insert_request(await database.insert_lead())
        assert (await database.wait_for(request_id))["status"] == "completed"
        assert (await get(f"{running.base}/healthz"))[0] == 200
        assert running.worker.alive


async def test_running_out_of_descriptors_on_accept_is_logged_and_survived(
    database: Database, tmp_path: Path
) -> None:
    async with metrics_worker(database, tmp_path) as running:
        first = await database.insert_request(await database.insert_lead())
        await database.wait_for(first)
        # A few descriptors to spare, far fewer than the server's connection limit.
        running.limit_descriptors(len(os.listdir(f"/proc/{running.worker.pid}/fd")) + 6)
        running.hold_idle_connections(50)
        await running.worker.wait_for_log("metrics: cannot accept a connection")
        assert (await get(f"{running.base}/metrics"))[0] == 200
        assert running.worker.alive


def test_a_metrics_port_in_use_is_one_line_and_exit_2_and_changes_nothing(
    data_root: Path,
) -> None:
    data = data_root / "pg"  # the embedded server: the worker would make and migrate it
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = run_listen(f"--metrics-port={port}", env=listen_env(PLANBUS_DATA_DIR=str(data)))
    assert done.returncode == 2
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, done.stderr
    assert f"127.0.0.1:{port}" in lines[0] and "--metrics-port" in lines[0]
    assert not data.exists()  # no data folder made, no server started, nothing migrated
