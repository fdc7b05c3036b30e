"""Helpers for migrations that adopt an existing database.

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


# A privilege as (grantee, privilege, column); the column is "" for the whole table or sequence
# and the grantee "PUBLIC" for everyone.
Privilege = tuple[str, str, str]

PRIVILEGES = text("""
SELECT coalesce(r.rolname, 'PUBLIC'), a.privilege_type, ''
  FROM pg_class AS c
 CROSS JOIN LATERAL aclexplode(c.relacl) AS a
  LEFT JOIN pg_roles AS r ON r.oid = a.grantee
 WHERE c.oid = to_regclass(:relation)
UNION
SELECT coalesce(r.rolname, 'PUBLIC'), a.privilege_type, att.attname
  FROM pg_attribute AS att
 CROSS JOIN LATERAL aclexplode(att.attacl) AS a
  LEFT JOIN pg_roles AS r ON r.oid = a.grantee
 WHERE att.attrelid = to_regclass(:relation) AND NOT att.attisdropped
""")


def privileges(relation: str, grantees: tuple[str, ...]) -> set[Privilege]:
    """What `grantees` hold on a table or sequence (`relation` as `schema.name`)."""
    rows = op.get_bind().execute(PRIVILEGES, {"relation": relation})
    return {(str(g), str(p), str(c)) for g, p, c in rows if g in grantees}


def record_privilege_changes(
    relation: str, before: set[Privilege], after: set[Privilege], revision: str
) -> None:
    """Record what planbus granted and what it revoked, so a downgrade can undo both."""
    for kind, changed in (("granted", after - before), ("revoked", before - after)):
        for privilege in sorted(changed):
            record(kind, relation, " ".join(part for part in privilege if part), revision)


def restore_privileges(revision: str) -> None:
    """Revoke what a revision granted and grant back what it revoked."""
    for kind, verb, direction in (("granted", "REVOKE", "FROM"), ("revoked", "GRANT", "TO")):
        for relation, recorded in added(kind, revision):
            grantee, privilege, *column = recorded.split(" ", 2)
            statement = _privilege_statement(verb, direction, relation, grantee, privilege, column)
            if statement is not None:
                op.execute(statement)


def _privilege_statement(
    verb: str, direction: str, relation: str, grantee: str, privilege: str, column: list[str]
) -> str | None:
    if not (privilege.isalpha() and privilege.isupper()):
        raise ValueError(f"unexpected privilege {privilege!r} in planbus_schema_origin")
    found = (
        op.get_bind()
        .execute(
            text(
                "SELECT to_regclass(:relation)::text, "
                "(SELECT relkind FROM pg_class WHERE oid = to_regclass(:relation)), "
                "EXISTS (SELECT 1 FROM pg_roles WHERE rolname = :grantee)"
            ),
            {"relation": relation, "grantee": grantee},
        )
        .one()
    )
    target, relkind, role_exists = found
    if target is None or not (role_exists or grantee == "PUBLIC"):
        return None  # the table or the role is gone, and its privileges with it
    on = f"SEQUENCE {target}" if relkind == "S" else f"TABLE {target}"
    who = "PUBLIC" if grantee == "PUBLIC" else quote(grantee)
    columns = f" ({quote(column[0])})" if column else ""
    return f"{verb} {privilege}{columns} ON {on} {direction} {who}"


def quote(identifier: str) -> str:
    """An identifier quoted for SQL, as `quote_ident` would."""
    return '"' + identifier.replace('"', '""') + '"'


# -- closing tables to the API roles ----------------------------------------------------------

# The roles PostgREST (Supabase, InsForge) switches to per request. Managed platforms grant them
# every new table, sequence and function in `public` by default.
API_ROLES = ("anon", "authenticated", "service_role")


def existing_roles(roles: tuple[str, ...]) -> tuple[str, ...]:
    """The ones of `roles` that exist on this server, in the given order."""
    found = op.get_bind().execute(
        text("SELECT rolname FROM pg_roles WHERE rolname = ANY (:roles)"), {"roles": list(roles)}
    )
    present = {str(row[0]) for row in found}
    return tuple(role for role in roles if role in present)


# Roles besides its owner that may update plan_requests: a dedicated worker role set up before a
# revision that adds something the worker needs, which must keep working without a new grant.
WORKERS = text("""
SELECT DISTINCT a.grantee::regrole::text
  FROM pg_class AS c, aclexplode(c.relacl) AS a
 WHERE c.oid = 'public.plan_requests'::regclass
   AND a.privilege_type = 'UPDATE' AND a.grantee <> 0 AND a.grantee <> c.relowner
""")


def worker_roles() -> list[str]:
    """The quoted names of the roles that work plan_requests besides its owner, API roles aside."""
    roles = op.get_bind().execute(WORKERS).scalars()
    return [role for role in roles if role.strip('"') not in API_ROLES]


def close_to_api_roles(table: str, revision: str, *, keep: tuple[str, ...] = ()) -> None:
    """Revoke everything PUBLIC and the API roles (but `keep`) hold on a table planbus created
    and on its id sequences, and turn row-level security on; recorded for the downgrade."""
    grantees = ("PUBLIC", *(role for role in existing_roles(API_ROLES) if role not in keep))
    _revoke_recorded(f"public.{table}", grantees, revision)
    for sequence in owned_sequences(table):
        _revoke_recorded(sequence, grantees, revision)
    enable_row_security(table, revision)


def close_bookkeeping(relation: str, revision: str) -> None:
    """Close one of planbus's bookkeeping tables (`alembic_version`, `planbus_*`) to every role
    but its owner, so nobody else can rewrite what a downgrade reads: PUBLIC and the API roles
    lose everything, any other role all but SELECT (a worker's role reads alembic_version)."""
    api = ("PUBLIC", *existing_roles(API_ROLES))
    _revoke_recorded(relation, api, revision)
    others = tuple(role for role in _grantees_other_than_owner(relation) if role not in api)
    _revoke_recorded(relation, others, revision, keep_select=True)


def bookkeeping_tables() -> list[str]:
    """`alembic_version` and every `planbus_*` table in `public`, as `schema.name`."""
    found = op.get_bind().execute(
        text(
            "SELECT format('%I.%I', 'public', relname) FROM pg_class "
            "WHERE relnamespace = 'public'::regnamespace AND relkind IN ('r', 'p') "
            "AND relname LIKE 'planbus\\_%' ORDER BY relname"
        )
    )
    return [qualified_name("alembic_version"), *(str(row[0]) for row in found)]


def owned_sequences(table: str) -> list[str]:
    """The sequences behind `public.<table>`'s serial and identity columns, as `schema.name`."""
    found = op.get_bind().execute(
        text(
            "SELECT format('%I.%I', n.nspname, s.relname) FROM pg_depend AS d "
            "JOIN pg_class AS s ON s.oid = d.objid AND s.relkind = 'S' "
            "JOIN pg_namespace AS n ON n.oid = s.relnamespace "
            "WHERE d.classid = 'pg_class'::regclass AND d.refobjid = to_regclass(:table) "
            "AND d.deptype IN ('a', 'i') ORDER BY 1"
        ),
        {"table": f"public.{table}"},
    )
    return [str(row[0]) for row in found]


def _grantees_other_than_owner(relation: str) -> tuple[str, ...]:
    found = op.get_bind().execute(
        text(
            "SELECT DISTINCT coalesce(r.rolname, 'PUBLIC') FROM pg_class AS c "
            "CROSS JOIN LATERAL aclexplode(c.relacl) AS a "
            "LEFT JOIN pg_roles AS r ON r.oid = a.grantee "
            "WHERE c.oid = to_regclass(:relation) AND a.grantee <> c.relowner ORDER BY 1"
        ),
        {"relation": relation},
    )
    return tuple(str(row[0]) for row in found)


def _revoke_recorded(
    relation: str, grantees: tuple[str, ...], revision: str, *, keep_select: bool = False
) -> None:
    # A table's REVOKE takes its column privileges with it.
    before = privileges(relation, grantees)
    target = _relation(relation)
    if keep_select:
        for grantee, privilege in sorted({(g, p) for g, p, _ in before if p != "SELECT"}):
            who = grantee if grantee == "PUBLIC" else quote(grantee)
            op.execute(f"REVOKE {privilege} ON {target} FROM {who}")
    elif grantees:
        who = ", ".join(role if role == "PUBLIC" else quote(role) for role in grantees)
        op.execute(f"REVOKE ALL ON {target} FROM {who}")
    record_privilege_changes(relation, before, privileges(relation, grantees), revision)


def _relation(relation: str) -> str:
    """`TABLE name` or `SEQUENCE name`, the name as PostgreSQL prints it (quoted where needed)."""
    found = op.get_bind().execute(
        text(
            "SELECT c.oid::regclass::text, c.relkind FROM pg_class AS c "
            "WHERE c.oid = to_regclass(:relation)"
        ),
        {"relation": relation},
    )
    name, relkind = found.one()
    return f"{'SEQUENCE' if relkind == 'S' else 'TABLE'} {name}"
