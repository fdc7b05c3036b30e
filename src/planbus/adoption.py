"""Helpers for migrations that adopt an existing database.

planbus may meet tables it did not create. Every table, column or constraint a revision adds to
the database is recorded in `planbus_schema_origin`, so `alembic downgrade` removes exactly what
planbus added and never a table or column that was there before.
"""

from __future__ import annotations

from typing import LiteralString

from sqlalchemy import text

from alembic import op

ORIGIN_TABLE: LiteralString = """
CREATE TABLE IF NOT EXISTS planbus_schema_origin (
    kind        text NOT NULL CHECK (kind IN ('table', 'column', 'constraint')),
    table_name  text NOT NULL,
    object_name text NOT NULL,
    revision    text NOT NULL,
    added_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (kind, table_name, object_name)
)
"""


def table_exists(table: str) -> bool:
    """True when `public.<table>` exists."""
    found = op.get_bind().execute(
        text("SELECT to_regclass(:name) IS NOT NULL"), {"name": f"public.{table}"}
    )
    return bool(found.scalar())


def column_exists(table: str, column: str) -> bool:
    """True when `public.<table>.<column>` exists."""
    found = op.get_bind().execute(
        text(
            "SELECT 1 FROM information_schema.columns "
            "WHERE table_schema = 'public' AND table_name = :t AND column_name = :c"
        ),
        {"t": table, "c": column},
    )
    return found.first() is not None


def record(kind: str, table: str, name: str, revision: str) -> None:
    """Remember that planbus added this object."""
    op.get_bind().execute(
        text(
            "INSERT INTO planbus_schema_origin (kind, table_name, object_name, revision) "
            "VALUES (:kind, :table, :name, :revision) ON CONFLICT DO NOTHING"
        ),
        {"kind": kind, "table": table, "name": name, "revision": revision},
    )


def ensure_table(table: str, create_sql: str, revision: str) -> bool:
    """Create the table when missing and record it; return True when planbus created it."""
    if table_exists(table):
        return False
    op.execute(create_sql)
    record("table", table, table, revision)
    return True


def ensure_columns(table: str, columns: dict[str, str], revision: str) -> None:
    """Add each missing column (name -> type and default) and record it."""
    for column, definition in columns.items():
        if not column_exists(table, column):
            op.execute(f'ALTER TABLE {table} ADD COLUMN "{column}" {definition}')
            record("column", table, column, revision)


def added(kind: str, revision: str) -> list[tuple[str, str]]:
    """(table, object) pairs of one kind that a revision added, newest first."""
    rows = op.get_bind().execute(
        text(
            "SELECT table_name, object_name FROM planbus_schema_origin "
            "WHERE kind = :kind AND revision = :revision ORDER BY added_at DESC, object_name"
        ),
        {"kind": kind, "revision": revision},
    )
    return [(str(table), str(name)) for table, name in rows]


def forget(revision: str) -> None:
    """Drop the revision's records once its objects are gone."""
    op.get_bind().execute(
        text("DELETE FROM planbus_schema_origin WHERE revision = :revision"),
        {"revision": revision},
    )


def remove_added_columns_and_constraints(revision: str) -> None:
    """Undo what a revision added to tables that existed before planbus."""
    for table, constraint in added("constraint", revision):
        if table_exists(table):
            op.execute(f'ALTER TABLE {table} DROP CONSTRAINT IF EXISTS "{constraint}"')
    for table, column in added("column", revision):
        if table_exists(table):
            op.execute(f'ALTER TABLE {table} DROP COLUMN IF EXISTS "{column}"')
