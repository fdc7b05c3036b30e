"""Alembic environment: plain SQL revisions run on a psycopg connection.

The database comes from `config.attributes["dsn"]` when planbus runs the migrations itself,
else from PLANBUS_DATABASE_URL, else DATABASE_URL. Either may be a URL or a libpq conninfo
string, so the connection is made by psycopg rather than parsed by SQLAlchemy.

One migration runs at a time per database (a session advisory lock); a second `alembic upgrade
head` waits for the first, then finds nothing left to do. Every DROP TABLE a revision runs is
logged with the table's row count before it runs, and the end says what was applied.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from logging.config import fileConfig
from typing import Any

import psycopg
from alembic.runtime.migration import MigrationInfo
from psycopg import sql
from sqlalchemy import create_engine, event, pool, text
from sqlalchemy.engine import Connection

from alembic import context
from planbus.bus.db import redact
from planbus.ops.migrate import MIGRATION_LOCK

log = logging.getLogger("planbus.migrations")

DROP_TABLE = re.compile(r"\bDROP\s+TABLE\s+(?:IF\s+EXISTS\s+)?((?:\"[^\"]+\"|[\w.])+)", re.I)


def _dsn() -> str:
    given = context.config.attributes.get("dsn")
    dsn = given or os.environ.get("PLANBUS_DATABASE_URL") or os.environ.get("DATABASE_URL")
    if not dsn:
        sys.exit(
            "planbus: set PLANBUS_DATABASE_URL (or DATABASE_URL) to the database to migrate, "
            "e.g. postgresql://user@localhost:5432/app"
        )
    return dsn


def run_migrations_online() -> None:
    dsn = _dsn()
    try:
        psycopg.connect(dsn, connect_timeout=10).close()
    except psycopg.Error as exc:
        reason = redact(" ".join(str(exc).split()), dsn)
        sys.exit(f"planbus: cannot connect to the database to migrate it: {reason}")
    engine = create_engine(
        "postgresql+psycopg://",
        creator=lambda: psycopg.connect(dsn),
        poolclass=pool.NullPool,
    )
    event.listen(engine, "before_cursor_execute", _log_table_drops)
    steps: list[MigrationInfo] = []
    with engine.connect() as connection:
        _take_migration_lock(connection)
        context.configure(
            connection=connection,
            transaction_per_migration=True,
            on_version_apply=lambda step, **_: steps.append(step),
        )
        with context.begin_transaction():
            context.run_migrations()
        _say_what_was_done(steps, context.get_context().get_current_revision())
    engine.dispose()  # closing the session releases the lock


def _take_migration_lock(connection: Connection) -> None:
    """Wait for any other migration of this database to end; held until the session closes."""
    if not connection.execute(
        text("SELECT pg_try_advisory_lock(:key)"), {"key": MIGRATION_LOCK}
    ).scalar():
        log.info("another migration of this database is running; waiting for it to end")
        connection.execute(text("SELECT pg_advisory_lock(:key)"), {"key": MIGRATION_LOCK})
    connection.commit()  # the session lock outlives this transaction; alembic starts its own


def _log_table_drops(
    connection: Any, cursor: Any, statement: str, parameters: Any, context: Any, many: bool
) -> None:
    """Before a revision drops a table, say which and how many rows go with it."""
    for match in DROP_TABLE.finditer(statement):
        with cursor.connection.cursor() as lookup:
            found = lookup.execute(
                "SELECT n.nspname, c.relname FROM pg_class AS c "
                "JOIN pg_namespace AS n ON n.oid = c.relnamespace WHERE c.oid = to_regclass(%s)",
                (match.group(1),),
            ).fetchone()
            if found is None:
                continue
            schema, table = found
            count = lookup.execute(
                sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(schema, table))
            ).fetchone()
        rows = count[0] if count else 0
        level = logging.WARNING if rows and not table.startswith("planbus_") else logging.INFO
        log.log(level, "dropping table %s.%s with %d row(s)", schema, table, rows)


def _say_what_was_done(steps: list[MigrationInfo], current: str | None) -> None:
    if not steps:
        log.info("nothing to do: the database is at revision %s", current or "base (empty)")
        return
    verb = "applied" if steps[0].is_upgrade else "undid"
    revisions = [step.up_revision_id for step in steps]
    log.info(
        "%s %s; the database is at revision %s",
        verb,
        ", ".join(str(revision) for revision in revisions),
        current or "base (empty)",
    )


if context.is_offline_mode():
    sys.exit("planbus: offline (--sql) migrations are not supported; run them against a database")
if context.config.config_file_name is not None:
    # The `alembic` command: log as alembic.ini says. planbus's own callers configure logging.
    fileConfig(context.config.config_file_name, disable_existing_loggers=False)
run_migrations_online()
