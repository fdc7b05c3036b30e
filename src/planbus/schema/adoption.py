"""Helpers for migrations that adopt an existing database: tables, columns, constraints, defaults.

Frozen: the alembic revisions call these, so changing what one does changes history. Add a new
helper rather than change an old one, and import nothing from planbus here.

planbus may meet tables it did not create. Every table, column, constraint, default, privilege
or row-security switch a revision adds to (or takes from) the database is recorded in
`planbus_schema_origin`, so `alembic downgrade` undoes exactly what planbus did and never drops
a table or column that was there before. Names read back from it are always quoted.

A revision that creates a table calls `close_to_api_roles(table, revision)` when the Mini App's
API roles may not reach it (managed platforms grant them every new table), and
`close_bookkeeping(relation, revision)` for a `planbus_*` table; its downgrade calls
`restore_privileges(revision)` and `disable_added_row_security(revision)`.
"""

from __future__ import annotations

import logging
from typing import LiteralString

from sqlalchemy import exc, text

from alembic import op

log = logging.getLogger("planbus.migrations")

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
    # Looked up by name, not parsed: a name read from planbus_schema_origin may be anything.
    found = op.get_bind().execute(
        text(
            "SELECT EXISTS (SELECT 1 FROM pg_class WHERE relname = :name "
            "AND relnamespace = 'public'::regnamespace AND relkind IN ('r', 'p'))"
        ),
        {"name": table},
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


def qualified_name(relation: str) -> str:
    """`schema.name` of a relation found on the search path (e.g. alembic's own table)."""
    found = op.get_bind().execute(
        text(
            "SELECT format('%I.%I', n.nspname, c.relname) FROM pg_class AS c "
            "JOIN pg_namespace AS n ON n.oid = c.relnamespace WHERE c.oid = to_regclass(:name)"
        ),
        {"name": relation},
    )
    return str(found.scalar_one())


def any_nullable(table: str, columns: tuple[str, ...]) -> bool:
    """True when one of `public.<table>`'s `columns` allows NULL."""
    found = op.get_bind().execute(
        text(
            "SELECT bool_or(NOT attnotnull) FROM pg_attribute "
            "WHERE attrelid = to_regclass(:table) AND attname = ANY (:columns)"
        ),
        {"table": f"public.{table}", "columns": list(columns)},
    )
    return bool(found.scalar())


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
            op.execute(f"ALTER TABLE {quote(table)} ADD COLUMN {quote(column)} {definition}")
            record("column", table, column, revision)


def add_constraint(table: str, name: str, definition: str, revision: str) -> None:
    """Add a constraint that binds every new or updated row; validate it when the old rows allow.

    An adopted table may hold rows that break it (an unknown status, a request whose lead is
    gone). They are kept, and the constraint stays NOT VALID until an operator fixes them.
    """
    op.execute(f"ALTER TABLE {quote(table)} ADD CONSTRAINT {quote(name)} {definition} NOT VALID")
    record("constraint", table, name, revision)
    bind = op.get_bind()
    try:
        with bind.begin_nested():
            bind.execute(text(f"ALTER TABLE {quote(table)} VALIDATE CONSTRAINT {quote(name)}"))
    except exc.IntegrityError:
        log.warning(
            "%s has rows that break %s; they are kept and the constraint holds for new and "
            "updated rows. Fix them, then run: ALTER TABLE %s VALIDATE CONSTRAINT %s",
            table,
            name,
            table,
            name,
        )


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
            op.execute(f"ALTER TABLE {quote(table)} DROP CONSTRAINT IF EXISTS {quote(constraint)}")
    for table, column in added("column", revision):
        if table_exists(table):
            op.execute(f"ALTER TABLE {quote(table)} DROP COLUMN IF EXISTS {quote(column)}")


def set_default(table: str, column: str, expression: str, revision: str) -> None:
    """Give an adopted column the contract's default when it has none, and record it."""
    found = op.get_bind().execute(
        text(
            "SELECT atthasdef FROM pg_attribute "
            "WHERE attrelid = to_regclass(:table) AND attname = :column AND NOT attisdropped"
        ),
        {"table": f"public.{table}", "column": column},
    )
    has_default = found.scalar()
    if has_default is False:
        op.execute(
            f"ALTER TABLE {quote(table)} ALTER COLUMN {quote(column)} SET DEFAULT {expression}"
        )
        record("default", table, column, revision)


def remove_added_defaults(revision: str) -> None:
    """Drop the defaults a revision gave to columns that had none."""
    for table, column in added("default", revision):
        if column_exists(table, column):
            op.execute(f"ALTER TABLE {quote(table)} ALTER COLUMN {quote(column)} DROP DEFAULT")


def enable_row_security(table: str, revision: str) -> None:
    """Turn row-level security on; record it when planbus was the one to turn it on."""
    found = op.get_bind().execute(
        text("SELECT relrowsecurity FROM pg_class WHERE oid = to_regclass(:table)"),
        {"table": f"public.{table}"},
    )
    if not found.scalar():
        op.execute(f"ALTER TABLE {quote(table)} ENABLE ROW LEVEL SECURITY")
        record("row_security", table, "enabled", revision)


def disable_added_row_security(revision: str) -> None:
    """Turn row-level security off again where planbus turned it on."""
    for table, _ in added("row_security", revision):
        if table_exists(table):
            op.execute(f"ALTER TABLE {quote(table)} DISABLE ROW LEVEL SECURITY")


def quote(identifier: str) -> str:
    """An identifier quoted for SQL, as `quote_ident` would."""
    return '"' + identifier.replace('"', '""') + '"'
