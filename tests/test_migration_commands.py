"""The commands operators run: `alembic upgrade head` / `downgrade` from the repository root."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import psycopg
import pytest

from planbus.ops import migrate
from tests.helpers import Database, wait_until

pytestmark = pytest.mark.anyio

REPOSITORY = Path(__file__).resolve().parents[1]


@pytest.fixture
async def connect(empty_database_url: str) -> AsyncIterator[Database]:
    async with await psycopg.AsyncConnection.connect(empty_database_url, autocommit=True) as conn:
        yield Database(conn, empty_database_url)


def alembic_command(url: str, *args: str) -> tuple[list[str], dict[str, str]]:
    """The `alembic` command line an operator runs from the repository root, and its environment."""
    alembic = Path(sys.executable).with_name("alembic")
    command = [str(alembic)] if alembic.exists() else [sys.executable, "-m", "alembic"]
    env = {**os.environ, "PLANBUS_DATABASE_URL": url}
    env.pop("DATABASE_URL", None)
    return [*command, *args], env


async def alembic(url: str, *args: str) -> subprocess.CompletedProcess[str]:
    command, env = alembic_command(url, *args)

    def run() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            command, cwd=REPOSITORY, env=env, capture_output=True, text=True, timeout=60
        )

    return await anyio.to_thread.run_sync(run)


async def test_alembic_upgrade_head_runs_from_the_repository_root(connect: Database) -> None:
    upgraded = await alembic(connect.url, "upgrade", "head")
    assert upgraded.returncode == 0, upgraded.stderr
    assert await connect.value("SELECT version_num FROM alembic_version") == migrate.head_revision()
    assert await connect.value(
        "SELECT relrowsecurity FROM pg_class WHERE relname = 'plan_requests'"
    )
    downgraded = await alembic(connect.url, "downgrade", "base")
    assert downgraded.returncode == 0, downgraded.stderr
    assert await connect.value("SELECT to_regclass('plan_requests')") is None


async def test_alembic_says_what_it_applied_and_what_a_downgrade_drops(connect: Database) -> None:
    upgraded = await alembic(connect.url, "upgrade", "head")
    head = migrate.head_revision()
    assert "applied 0001_bus, 0002_tma_rights, " in upgraded.stderr
    assert f"; the database is at revision {head}" in upgraded.stderr
    again = await alembic(connect.url, "upgrade", "head")
    assert f"nothing to do: the database is at revision {head}" in again.stderr
    lead = await connect.insert_lead(telegram_id=9)
    await connect.insert_lead(telegram_id=9)
    await connect.insert_request(lead, telegram_id=9)
    downgraded = await alembic(connect.url, "downgrade", "base")
    assert downgraded.returncode == 0, downgraded.stderr
    log = downgraded.stderr
    # Counted before the drop: afterwards there is nothing left to count.
    for table, rows in (("plan_requests", 1), ("scheduled_reminders", 0), ("lead_registry", 2)):
        assert f"dropping table public.{table} with {rows} row(s)" in log
    assert "WARNI [planbus.migrations] dropping table public.lead_registry with 2 row(s)" in log
    assert log.index("dropping table public.lead_registry") < log.index("undid ")
    assert "; the database is at revision base (empty)" in log


async def test_two_upgrades_at_once_run_one_after_the_other(connect: Database) -> None:
    # Hold the migration lock, so both commands are known to start while the other runs.
    await connect.conn.execute("SELECT pg_advisory_lock(%s)", (migrate.MIGRATION_LOCK,))
    command, env = alembic_command(connect.url, "upgrade", "head")
    processes = [
        await anyio.open_process(
            command, cwd=REPOSITORY, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL
        )
        for _ in range(2)
    ]
    try:
        await wait_until(
            lambda: connect.value(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted "
                "AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
            ),
            lambda waiting: waiting == 2,
            30.0,
            "both migrations to wait for the lock",
        )
        await connect.conn.execute("SELECT pg_advisory_unlock(%s)", (migrate.MIGRATION_LOCK,))
        outputs = []
        for process in processes:
            assert process.stderr is not None
            with anyio.fail_after(60):
                outputs.append(b"".join([chunk async for chunk in process.stderr]).decode())
                await process.wait()
    finally:
        for process in processes:
            if process.returncode is None:
                process.kill()
                await process.wait()
    assert [process.returncode for process in processes] == [0, 0], outputs
    assert await connect.value("SELECT version_num FROM alembic_version") == migrate.head_revision()
    assert all("another migration of this database is running" in out for out in outputs)
    assert sum("nothing to do" in output for output in outputs) == 1, outputs
