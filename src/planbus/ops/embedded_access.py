"""Who may connect to the embedded server: the OS user that started it, and root; nobody else.

There are two ways in, each closed to other local users:

- a unix socket in the data folder itself, which PostgreSQL keeps at mode 0700 (it refuses to
  start otherwise): only the folder's owner (the user the server runs as) and root reach it, so
  whoever arrives there is trusted, as the folder's owner could read the data files anyway;
- TCP on 127.0.0.1, which every local user reaches, so it asks a password (scram-sha-256),
  generated when the folder is made and kept in `planbus.pgpass` (libpq's passfile format,
  mode 0600) in that same folder; a TCP DSN names it with the `passfile` parameter.

The DSN planbus logs and uses is the socket's; the TCP one is for a folder whose path is too
long for a socket (at most 103 bytes, as macOS allows) and for tools that speak only TCP.
As root the server runs as a system user and owns the folder: root enters it anyway.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from urllib.parse import quote

PASSFILE = "planbus.pgpass"
SUPERUSER = "postgres"
SOCKET_PATH_MAX = 103  # sun_path holds 108 bytes on Linux, 104 on macOS, the final NUL included

# Rewritten at every start of the server, so a folder made by an older planbus (which trusted
# every connection) is closed too. The first matching line decides.
HBA = f"""\
# Written by planbus at every start of the server; edits here are lost.
# The socket lives in the data folder (mode 0700): only its owner and root reach it.
local all all trust
# Every local user reaches 127.0.0.1: a password, kept in {PASSFILE} (mode 0600).
host all all 127.0.0.1/32 scram-sha-256
"""


def socket_fits(data_dir: Path) -> bool:
    """Whether the server's socket, `.s.PGSQL.<port>`, fits in a socket path in `data_dir`.

    A comma or quote in the path would split PostgreSQL's list of socket folders: no socket.
    """
    path = str(data_dir / ".s.PGSQL.65535")
    return len(path.encode()) <= SOCKET_PATH_MAX and not set(path) & {",", '"', "\\"}


def dsn(data_dir: Path, port: int, socket_dir: Path | None) -> str:
    """A URL psycopg and `psql` both accept: by the socket when the server has one, else TCP
    with the password file."""
    if socket_dir is not None:
        return f"postgresql://{SUPERUSER}@/postgres?host={quote(str(socket_dir))}&port={port}"
    passfile = quote(str(data_dir / PASSFILE))
    return f"postgresql://{SUPERUSER}@127.0.0.1:{port}/postgres?passfile={passfile}"


def tcp_dsn(data_dir: Path, port: int) -> str:
    """The TCP URL, which needs the password file (readable by its owner and root only)."""
    return dsn(data_dir, port, None)


def new_password() -> str:
    """A password no one guesses; URL-safe letters, so the passfile needs no escaping."""
    return secrets.token_urlsafe(32)


def write_passfile(data_dir: Path, password: str) -> None:
    """`planbus.pgpass` with `password` for the superuser on any host, port and database (the
    DSN names it only for this server), created at mode 0600 whatever the umask."""
    path = data_dir / PASSFILE
    partial = path.with_name(f"{PASSFILE}.{os.getpid()}")
    partial.unlink(missing_ok=True)
    descriptor = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w") as file:
        file.write(f"*:*:*:{SUPERUSER}:{password}\n")
    partial.rename(path)


def password(data_dir: Path) -> str:
    """The superuser's password, for a client that cannot read a password file itself (e.g. a
    pooler's configuration); readable only by the folder's owner and root."""
    return (data_dir / PASSFILE).read_text().strip().rsplit(":", 1)[1]


def set_password_statement(password: str) -> str:
    """What single-user mode runs to give the superuser `password` (URL-safe: no quoting)."""
    assert password.replace("-", "").replace("_", "").isalnum()
    return f"ALTER ROLE {SUPERUSER} PASSWORD '{password}';\n"
