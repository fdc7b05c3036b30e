"""`python -m planbus.listen` as an operator runs it: clear errors, ready line, clean stop."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

READY = "listening on channel plan_requests"


def listen_env(**extra: str) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("PLANBUS_", "OPENAI_")) and k != "DATABASE_URL"
    }
    env.update(extra)
    return env


def run_listen(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "planbus.listen", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


class Listener:
    """A running `python -m planbus.listen` whose stderr is read line by line."""

    def __init__(self, env: dict[str, str], *args: str) -> None:
        self.lines: list[str] = []
        self.process = subprocess.Popen(
            [sys.executable, "-m", "planbus.listen", *args],
            env=env,
            stderr=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            text=True,
        )

    def wait_for_line(self, fragment: str, within: float = 30) -> str:
        deadline = time.monotonic() + within
        assert self.process.stderr is not None
        while time.monotonic() < deadline:
            line = self.process.stderr.readline()
            if not line and self.process.poll() is not None:
                break
            self.lines.append(line)
            if fragment in line:
                return line
        raise AssertionError(f"no log line with {fragment!r}; got:\n{''.join(self.lines)}")

    def stop(self) -> int:
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(30)
        finally:
            assert self.process.stderr is not None
            self.lines.extend(self.process.stderr.readlines())
            self.process.stderr.close()


@pytest.fixture
def listener_factory() -> Iterator[list[Listener]]:
    started: list[Listener] = []
    yield started
    for listener in started:
        if listener.process.poll() is None:
            listener.process.kill()
            listener.process.wait()
        if listener.process.stderr:
            listener.process.stderr.close()


def test_unreachable_database_exits_with_one_clear_line() -> None:
    done = run_listen(
        "--database-url", "postgresql://planbus:secret@127.0.0.1:1/nowhere", env=listen_env()
    )
    assert done.returncode == 2
    errors = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(errors) == 1, done.stderr
    assert "cannot connect to the database" in errors[0]
    assert "secret" not in done.stderr


def test_malformed_database_url_exits_with_one_clear_line() -> None:
    done = run_listen(env=listen_env(PLANBUS_DATABASE_URL="not a url"))
    assert done.returncode == 2
    assert "invalid database URL" in done.stderr
    assert "Traceback" not in done.stderr


def test_unmigrated_database_says_to_run_alembic(empty_database_url: str) -> None:
    done = run_listen(env=listen_env(DATABASE_URL=empty_database_url))
    assert done.returncode == 2
    assert "alembic upgrade head" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize(
    ("flag", "value", "setting"),
    [
        ("--concurrency", "0", "PLANBUS_CONCURRENCY"),
        ("--planner", "magic", "PLANBUS_PLANNER"),
        ("--lease-seconds", "-1", "PLANBUS_LEASE_SECONDS"),
    ],
)
def test_bad_setting_names_the_setting(flag: str, value: str, setting: str) -> None:
    done = run_listen(flag, value, env=listen_env())
    assert done.returncode == 2
    assert setting in done.stderr
    assert "Traceback" not in done.stderr


def test_flag_wins_over_environment(database_url: str, listener_factory: list[Listener]) -> None:
    env = listen_env(
        PLANBUS_DATABASE_URL="postgresql://nobody@127.0.0.1:1/x", PLANBUS_CONCURRENCY="0"
    )
    listener = Listener(env, "--database-url", database_url, "--concurrency", "3")
    listener_factory.append(listener)
    ready = listener.wait_for_line(READY)
    assert "concurrency 3" in ready
    assert listener.stop() == 0


def test_a_server_named_without_a_key_is_one_warning_at_start(
    database_url: str, listener_factory: list[Listener]
) -> None:
    env = listen_env(OPENAI_BASE_URL="http://127.0.0.1:8080/v1")
    listener = Listener(env, "--database-url", database_url)
    listener_factory.append(listener)
    warning = listener.wait_for_line("OPENAI_BASE_URL is set but OPENAI_API_KEY is not")
    assert "WARNING" in warning
    assert "PLANBUS_PLANNER=openai" in warning
    assert "planner template" in listener.wait_for_line(READY)
    assert listener.stop() == 0
    assert sum("OPENAI_BASE_URL" in line for line in listener.lines) == 1


def test_sigterm_stops_cleanly_and_claims_nothing_new(
    database_url: str, listener_factory: list[Listener]
) -> None:
    listener = Listener(listen_env(PLANBUS_DATABASE_URL=database_url))
    listener_factory.append(listener)
    listener.wait_for_line(READY)
    assert listener.stop() == 0
    with psycopg.connect(database_url, autocommit=True) as conn:
        lead = conn.execute(
            "INSERT INTO lead_registry (telegram_id) VALUES (1) RETURNING id"
        ).fetchone()
        assert lead is not None
        row = conn.execute(
            "INSERT INTO plan_requests (lead_id, telegram_id) VALUES (%s, 1) "
            "RETURNING status, attempts",
            (lead[0],),
        ).fetchone()
    assert row == ("pending", 0)
    assert any("stopped" in line for line in listener.lines)


def test_embedded_default_starts_migrates_and_reuses_its_data(
    data_root: Path, listener_factory: list[Listener]
) -> None:
    env = listen_env(PLANBUS_DATA_DIR=str(data_root / "pg"))
    first = Listener(env)
    listener_factory.append(first)
    dsn_line = first.wait_for_line("psql '")
    dsn = dsn_line.split("psql '", 1)[1].split("'", 1)[0]
    first.wait_for_line(READY)
    with psycopg.connect(dsn, autocommit=True) as conn:
        lead = conn.execute(
            "INSERT INTO lead_registry (telegram_id, prospect_name) VALUES (5, 'Ada') RETURNING id"
        ).fetchone()
        assert lead is not None
        request = conn.execute(
            "INSERT INTO plan_requests (lead_id, telegram_id) VALUES (%s, 5) RETURNING id",
            (lead[0],),
        ).fetchone()
        assert request is not None
        deadline = time.monotonic() + 10
        status = None
        while time.monotonic() < deadline and status != "completed":
            found = conn.execute(
                "SELECT status FROM plan_requests WHERE id = %s", (request[0],)
            ).fetchone()
            status = found[0] if found else None
            time.sleep(0.05)
        assert status == "completed"
    assert first.stop() == 0
    assert any(str(data_root / "pg") in line for line in first.lines)

    second = Listener(env)
    listener_factory.append(second)
    second.wait_for_line(READY)
    with psycopg.connect(dsn, autocommit=True) as conn:
        kept = conn.execute("SELECT count(*) FROM plan_requests").fetchone()
    assert kept == (1,)
    assert second.stop() == 0


def test_sigterm_during_start_up_exits_cleanly(
    data_root: Path, listener_factory: list[Listener]
) -> None:
    listener = Listener(listen_env(PLANBUS_DATA_DIR=str(data_root / "pg")))
    listener_factory.append(listener)
    listener.wait_for_line("initialising a new PostgreSQL data folder")
    assert listener.stop() == 0
    assert any("stopped during start-up" in line for line in listener.lines)
    assert not any(READY in line for line in listener.lines)


def test_sighup_stops_as_gracefully_as_sigterm(
    database_url: str, listener_factory: list[Listener]
) -> None:
    listener = Listener(listen_env(PLANBUS_DATABASE_URL=database_url))
    listener_factory.append(listener)
    listener.wait_for_line(READY)
    listener.process.send_signal(signal.SIGHUP)  # the terminal was closed
    assert listener.process.wait(30) == 0
    listener.wait_for_line("received SIGHUP: claiming nothing new")
    listener.wait_for_line("stopped")
