"""Deployment wiring: the worker as operators run it, with its connections where the docs say."""

from __future__ import annotations

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
