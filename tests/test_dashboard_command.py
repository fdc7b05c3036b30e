"""`python -m planbus dashboard` as a process: where it refuses to listen, and how it stops."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import urllib.request

import pytest

from tests.test_settings import lines

DASHBOARD = [sys.executable, "-m", "planbus", "dashboard"]


def environment(**extra: str) -> dict[str, str]:
    """The test's environment without any planbus variable, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PLANBUS_", "DATABASE_URL"))}
    return {**env, **extra}


def dashboard(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*DASHBOARD, *args],
        env=environment(**env),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.parametrize("host", ["0.0.0.0", "::", ""])
def test_beyond_loopback_without_a_token_it_exits_2_with_one_line(
    database_url: str, host: str
) -> None:
    done = dashboard("--host", host, "--port", "0", "--database-url", database_url)
    assert done.returncode == 2
    [line] = lines(done.stderr)
    assert "PLANBUS_DASHBOARD_TOKEN" in line and "other machines" in line
    assert done.stdout == ""


def test_a_port_in_use_exits_2_with_one_line(database_url: str) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        done = dashboard("--port", port, "--database-url", database_url)
    assert done.returncode == 2
    [line] = lines(done.stderr)
    assert f"127.0.0.1:{port}" in line and "--port" in line


def test_a_bad_port_exits_2_with_one_line(database_url: str) -> None:
    done = dashboard("--port", "70000", "--database-url", database_url)
    assert done.returncode == 2
    [line] = lines(done.stderr)
    assert "not a port" in line


def test_an_unmigrated_database_exits_2_saying_what_to_do(empty_database_url: str) -> None:
    done = dashboard("--port", "0", "--database-url", empty_database_url)
    assert done.returncode == 2
    [line] = lines(done.stderr)
    assert "alembic upgrade head" in line or "python -m planbus migrate" in line


def test_it_serves_until_sigterm_and_then_exits_0(database_url: str) -> None:
    with subprocess.Popen(
        [*DASHBOARD, "--port", "0", "--database-url", database_url],
        env=environment(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as process:
        try:
            assert process.stdout is not None
            first = process.stdout.readline()
            assert first.startswith("planbus dashboard on http://127.0.0.1:"), first
            url = first.split()[3]
            with urllib.request.urlopen(url, timeout=10) as answer:
                assert b"<title>planbus" in answer.read()
            process.send_signal(signal.SIGTERM)
            assert process.wait(timeout=15) == 0
        finally:
            if process.poll() is None:
                process.kill()


def test_the_worker_never_imports_the_dashboards_packages() -> None:
    code = (
        "import sys, planbus.listen, planbus.runtime, planbus.ops.cli; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in "
        "('starlette', 'uvicorn', 'jinja2') or m.startswith('planbus.ops.dashboard.')))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert done.stdout.strip() == "[]"
