"""Deployment wiring: the worker as operators run it, with its connections where the docs say."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import anyio
import pytest
from psycopg import sql
from psycopg.conninfo import make_conninfo

from tests.conftest import TestServer
from tests.helpers import Database, wait_until

pytestmark = pytest.mark.anyio


async def test_work_connections_use_the_work_url_and_listen_stays_on_the_database_url(
    database: Database, pg_server: TestServer, tmp_path: Path
) -> None:
    # A second login stands in for a pooler: its sessions are easy to tell apart.
    role = f"planbus_work_{uuid.uuid4().hex[:8]}"
    pg_server.execute(sql.SQL("CREATE ROLE {} LOGIN SUPERUSER").format(sql.Identifier(role)))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PLANBUS_", "OPENAI_"))}
    env.pop("DATABASE_URL", None)
    env.update(
        PLANBUS_DATABASE_URL=database.url,
        PLANBUS_WORK_DATABASE_URL=make_conninfo(database.url, user=role),
        PLANBUS_PLANNER="template",
    )
    log_path = tmp_path / "worker.log"
    lead = await database.insert_lead()

    async def read_log() -> str:
        return log_path.read_text()

    try:
        with log_path.open("wb") as log_file:
            process = await anyio.open_process(
                [sys.executable, "-m", "planbus.listen"],
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=log_file,
                env=env,
            )
            try:
                await wait_until(read_log, lambda t: "listening on channel" in t, 30, "ready")
                request_id = await database.insert_request(lead)
                row = await database.wait_for(request_id)
                sessions = await database.fetchall(
                    "SELECT application_name, usename FROM pg_stat_activity "
                    "WHERE datname = current_database() AND application_name LIKE 'planbus%%'"
                )
                process.send_signal(signal.SIGTERM)
                with anyio.fail_after(30):
                    code = await process.wait()
            finally:
                if process.returncode is None:
                    process.kill()
                    await process.wait()
    finally:
        pg_server.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(role)))

    assert (row["status"], code) == ("completed", 0)
    by_name = {(s["application_name"], s["usename"]) for s in sessions}
    assert ("planbus-listen", "postgres") in by_name
    assert ("planbus", role) in by_name
    assert ("planbus", "postgres") not in by_name
