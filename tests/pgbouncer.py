"""A real PgBouncer in transaction mode in front of the test server, started by the tests.

Debian's `pgbouncer` package (1.18, no protocol-level prepared statements: what Supabase and
InsForge users meet behind port 6543). PgBouncer refuses to run as root, so under root it
switches to `nobody` (its own `-u`); its ini (with the server's password) lives in a 0700
temporary folder of that user's.
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo

PROGRAM = "pgbouncer"
RUN_AS = "nobody"  # under root: PgBouncer refuses to run as root
SEARCH_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/usr/local/sbin"])


def program() -> str | None:
    """The pgbouncer binary, or None (Debian installs it in /usr/sbin, off a user's PATH)."""
    return shutil.which(PROGRAM, path=SEARCH_PATH)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class PgBouncer:
    """One pgbouncer process pooling every database of `server_dsn` (pool_mode transaction)."""

    def __init__(self, binary: str, server_dsn: str, *, pool_size: int = 3) -> None:
        self.binary = binary
        self.server = conninfo_to_dict(server_dsn)
        self.pool_size = pool_size
        self.folder = Path(tempfile.mkdtemp(prefix="planbus-pgbouncer-"))
        self.port = 0
        self.server_password = ""  # what PgBouncer logs in to the server with, if anything
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def log_path(self) -> Path:
        return self.folder / "pgbouncer.log"

    def dsn(self, server_dsn: str) -> str:
        """`server_dsn` (a database on the test server) reached through this pooler."""
        return make_conninfo(server_dsn, host="127.0.0.1", port=str(self.port))

    def start(self) -> PgBouncer:
        user = str(self.server.get("user") or "postgres")
        target = {
            "host": str(self.server.get("host") or "127.0.0.1"),
            "port": str(self.server.get("port") or "5432"),
            "user": user,
        }
        self.server_password = str(self.server.get("password") or self._from_passfile() or "")
        if self.server_password:
            target["password"] = self.server_password
        self.port = free_port()
        auth = self.folder / "users.txt"
        auth.write_text(f'"{user}" ""\n')
        ini = self.folder / "pgbouncer.ini"
        ini.write_text(
            "[databases]\n"
            f"* = {' '.join(f'{key}={value}' for key, value in target.items())}\n"
            "[pgbouncer]\n"
            "listen_addr = 127.0.0.1\n"
            f"listen_port = {self.port}\n"
            "unix_socket_dir =\n"
            "auth_type = trust\n"
            f"auth_file = {auth}\n"
            "pool_mode = transaction\n"
            f"default_pool_size = {self.pool_size}\n"
            "max_client_conn = 500\n"
            # Many test databases come and go: let an unused one's pool go quickly.
            "server_idle_timeout = 10\n"
            "ignore_startup_parameters = extra_float_digits,options\n"
        )
        # The ini holds the server's password: readable by PgBouncer's user only (mkdtemp made
        # the folder 0700).
        for path in (auth, ini):
            path.chmod(0o600)
        command = [self.binary, str(ini)]
        if os.geteuid() == 0:  # it refuses root; as anyone else it runs as that user
            command[1:1] = ["-u", RUN_AS]
            nobody = pwd.getpwnam(RUN_AS)
            for path in (self.folder, auth, ini):
                os.chown(path, nobody.pw_uid, nobody.pw_gid)
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                command, stdin=subprocess.DEVNULL, stdout=log, stderr=log
            )
        self._wait_ready()
        return self

    def _from_passfile(self) -> str | None:
        """The password in the DSN's passfile (the embedded server keeps one, `*:*:*:user:pw`):
        PgBouncer reads no passfile, its [databases] line names the password."""
        passfile = self.server.get("passfile")
        if not passfile:
            return None
        for line in Path(str(passfile)).read_text().splitlines():
            if line.strip() and not line.startswith("#"):
                return line.rsplit(":", 1)[1]
        return None

    def _wait_ready(self, within: float = 15.0) -> None:
        assert self.process is not None
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"pgbouncer exited: {self.log_path.read_text()[-2000:]}")
            if "listening on 127.0.0.1" in self.log_path.read_text(errors="replace"):
                return
            time.sleep(0.02)
        raise RuntimeError(f"pgbouncer did not start: {self.log_path.read_text()[-2000:]}")

    def check(self, server_dsn: str) -> None:
        """Fail loudly when a query through the pooler does not reach `server_dsn`'s database."""
        with psycopg.connect(self.dsn(server_dsn), prepare_threshold=None) as conn:
            conn.execute("SELECT 1")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        shutil.rmtree(self.folder, ignore_errors=True)
