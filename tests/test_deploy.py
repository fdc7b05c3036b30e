"""Deployment wiring: the worker as operators run it, with its connections where the docs say."""

from __future__ import annotations

import re
import uuid
from pathlib import Path

import pytest
from psycopg import sql
from psycopg.conninfo import make_conninfo

from tests.conftest import TestServer
from tests.helpers import Database
from tests.processes import WorkerProcess

pytestmark = pytest.mark.anyio


async def test_work_connections_use_the_work_url_and_listen_stays_on_the_database_url(
    database: Database, pg_server: TestServer, tmp_path: Path
) -> None:
    # A second login stands in for a pooler: its sessions are easy to tell apart.
    role = f"planbus_work_{uuid.uuid4().hex[:8]}"
    pg_server.execute(sql.SQL("CREATE ROLE {} LOGIN SUPERUSER").format(sql.Identifier(role)))
    worker = WorkerProcess(
        database.url,
        tmp_path / "worker.log",
        env={"PLANBUS_WORK_DATABASE_URL": make_conninfo(database.url, user=role)},
    )
    lead = await database.insert_lead()
    try:
        try:
            await worker.start()
            request_id = await database.insert_request(lead)
            row = await database.wait_for(request_id)
            sessions = await database.fetchall(
                "SELECT application_name, usename FROM pg_stat_activity "
                "WHERE datname = current_database() AND application_name LIKE 'planbus%%'"
            )
            code, _ = await worker.terminate()
        finally:
            await worker.aclose()
    finally:
        pg_server.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(role)))

    assert (row["status"], code) == ("completed", 0)
    by_name = {(s["application_name"], s["usename"]) for s in sessions}
    assert ("planbus-listen", "postgres") in by_name
    assert ("planbus", role) in by_name
    assert ("planbus-claim", role) in by_name
    assert ("planbus", "postgres") not in by_name


def test_the_template_unit_gives_every_instance_its_own_valid_metrics_port() -> None:
    text = (Path(__file__).resolve().parents[1] / "docs" / "deploy.md").read_text()
    template = text.split("/etc/systemd/system/planbus@.service", 1)[1]
    exec_start = re.search(r"^ExecStart=(.*)$", template, re.M)
    enable = re.search(r"systemctl enable --now (planbus@\S+) (planbus@\S+)", template)
    assert exec_start is not None and enable is not None
    first, second = (int(unit.split("@", 1)[1]) for unit in enable.groups())
    # The documented naming, carried on to a tenth and a twentieth worker.
    instances = [first + n * (second - first) for n in range(20)]
    ports = [
        int(exec_start.group(1).replace("%i", str(i)).split("--metrics-port ", 1)[1].split()[0])
        for i in instances
    ]
    assert all(0 < port <= 65535 for port in ports), ports
    assert len(set(ports)) == len(ports)
