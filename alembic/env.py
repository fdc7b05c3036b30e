"""Alembic environment: plain SQL revisions run on a psycopg connection.

The database comes from `config.attributes["dsn"]` when planbus runs the migrations itself,
else from PLANBUS_DATABASE_URL, else DATABASE_URL. Either may be a URL or a libpq conninfo
string, so the connection is made by psycopg rather than parsed by SQLAlchemy.
"""

from __future__ import annotations

import os
import sys

import psycopg
from sqlalchemy import create_engine, pool

from alembic import context


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
        reason = " ".join(str(exc).split())
        sys.exit(f"planbus: cannot connect to the database to migrate it: {reason}")
    engine = create_engine(
        "postgresql+psycopg://",
        creator=lambda: psycopg.connect(dsn),
        poolclass=pool.NullPool,
    )
    with engine.connect() as connection:
        context.configure(connection=connection, transaction_per_migration=True)
        with context.begin_transaction():
            context.run_migrations()
    engine.dispose()


if context.is_offline_mode():
    sys.exit("planbus: offline (--sql) migrations are not supported; run them against a database")
run_migrations_online()
