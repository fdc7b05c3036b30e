"""Helpers for migrations: privileges and roles (closing tables to the API roles, restoring them).

Frozen like `adoption`: the alembic revisions call these, so changing what one does changes
history. Add a new helper rather than change an old one.
"""

from __future__ import annotations

from sqlalchemy import text

from alembic import op
from planbus.schema.adoption import added, enable_row_security, qualified_name, quote, record

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
