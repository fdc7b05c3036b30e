"""Test fixtures: one real PostgreSQL per session, a fresh database per test from a template.

The server is the embedded one (started here, in a temporary folder), or the server named by
PLANBUS_TEST_DATABASE_URL. The schema is migrated once into a template database; each test gets
`CREATE DATABASE ... TEMPLATE` and drops it `WITH (FORCE)` afterwards.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import make_conninfo

from planbus.ops import embedded_access, migrate
from planbus.ops.embedded import EmbeddedPostgres
from tests.helpers import Database
from tests.llm_server import FakeLLM
from tests.pgbouncer import PgBouncer
from tests.pgbouncer import program as pgbouncer_program

TEMPLATE = "planbus_test_template"


@pytest.fixture(scope="session")
def anyio_backend() -> str:
    return "asyncio"


class TestServer:
    """The session's PostgreSQL server: make databases on it, restart it."""

    __test__ = False  # a fixture's type, not a test class

    def __init__(self, admin_dsn: str, embedded: EmbeddedPostgres | None) -> None:
        self.admin_dsn = admin_dsn
        self.embedded = embedded

    def dsn(self, dbname: str) -> str:
        return make_conninfo(self.admin_dsn, dbname=dbname)

    def execute(self, statement: sql.Composed) -> None:
        with psycopg.connect(self.admin_dsn, autocommit=True) as conn:
            conn.execute(statement)

    def create_database(self, template: str | None = None) -> str:
        name = f"planbus_test_{uuid.uuid4().hex[:12]}"
        if template:
            self.execute(
                sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(
                    sql.Identifier(name), sql.Identifier(template)
                )
            )
        else:
            self.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        return name

    def drop_database(self, name: str) -> None:
        self.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )

    def restart(self) -> None:
        if self.embedded is None:
            pytest.skip("restarting needs the embedded server (PLANBUS_TEST_DATABASE_URL is set)")
        self.embedded.restart()


def reachable_folder(prefix: str) -> Path:
    """A new folder the embedded server's system user (under root) may enter.

    mkdtemp makes it 0700, as pytest's tmp_path is: planbus never opens a folder up itself, so
    the tests open up the one they made.
    """
    folder = Path(tempfile.mkdtemp(prefix=prefix))
    folder.chmod(0o755)
    return folder


@pytest.fixture
def data_root() -> Iterator[Path]:
    """A folder of this test's own for embedded data folders."""
    folder = reachable_folder("planbus-data-")
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="session")
def pg_server() -> Iterator[TestServer]:
    given = os.environ.get("PLANBUS_TEST_DATABASE_URL")
    if given:
        yield TestServer(given, None)
        return
    folder = reachable_folder("planbus-test-")
    # Durability is not under test; speed is welcome.
    server = EmbeddedPostgres(
        folder / "pgdata",
        settings={
            "fsync": "off",
            "synchronous_commit": "off",
            "full_page_writes": "off",
            "max_connections": "300",
        },
    )
    server.start()
    try:
        yield TestServer(server.dsn, server)
    finally:
        server.stop("immediate")


@pytest.fixture(scope="session")
def pgbouncer(pg_server: TestServer) -> Iterator[PgBouncer]:
    """PgBouncer in transaction mode (pool size 3) in front of the session's server.

    Skipped only where the binary is missing, and never under CI (the `CI` variable set), which
    installs it (.ci/run): there a missing PgBouncer fails the tests that need it.
    """
    binary = pgbouncer_program()
    if binary is None:
        reason = "pgbouncer is not installed (apt-get install -y pgbouncer)"
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    server_dsn = pg_server.admin_dsn
    embedded = pg_server.embedded
    if embedded is not None:  # its socket folder is closed to PgBouncer's user: TCP, password
        assert embedded.port is not None
        server_dsn = embedded_access.tcp_dsn(embedded.data_dir, embedded.port)
    pooler = PgBouncer(binary, server_dsn).start()
    try:
        yield pooler
    finally:
        pooler.stop()


@pytest.fixture(scope="session")
def template_database(pg_server: TestServer) -> Iterator[str]:
    pg_server.drop_database(TEMPLATE)
    name = TEMPLATE
    pg_server.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    migrate.upgrade(pg_server.dsn(name))
    yield name
    pg_server.drop_database(name)


@pytest.fixture
def database_url(pg_server: TestServer, template_database: str) -> Iterator[str]:
    """A freshly migrated database of this test's own."""
    name = pg_server.create_database(template_database)
    yield pg_server.dsn(name)
    pg_server.drop_database(name)


@pytest.fixture
def empty_database_url(pg_server: TestServer) -> Iterator[str]:
    """An empty database (nothing migrated) of this test's own."""
    name = pg_server.create_database()
    yield pg_server.dsn(name)
    pg_server.drop_database(name)


@pytest.fixture
async def database(database_url: str) -> AsyncIterator[Database]:
    conn = await psycopg.AsyncConnection.connect(database_url, autocommit=True)
    db = Database(conn, database_url)
    try:
        yield db
    finally:
        await db.conn.close()  # the test may have replaced it (see Database.reconnect)


def settings_for(database_url: str, **overrides: Any) -> dict[str, Any]:
    """Worker settings suited to tests: template planner, quick retries."""
    values: dict[str, Any] = {
        "database_url": database_url,
        "planner": "template",
        "concurrency": 8,
        "lease_seconds": 5.0,
        "sweep_seconds": 60.0,
        "retry_base_seconds": 0.05,
        "retry_max_seconds": 0.2,
        "shutdown_grace_seconds": 5.0,
        "pool_size": 4,
    }
    values.update(overrides)
    return values


@pytest.fixture
def llm_api_key() -> str:
    """The key the `llm` fixture puts in OPENAI_API_KEY; a module that looks for its key in
    logs and rows overrides this fixture with a key of its own."""
    return "sk-test"


@pytest.fixture
def llm(monkeypatch: pytest.MonkeyPatch, llm_api_key: str) -> Iterator[FakeLLM]:
    """The tests' OpenAI-compatible server, with the SDK's environment pointing at it."""
    with FakeLLM() as server:
        monkeypatch.setenv("OPENAI_BASE_URL", server.base_url)
        monkeypatch.setenv("OPENAI_API_KEY", llm_api_key)
        yield server
