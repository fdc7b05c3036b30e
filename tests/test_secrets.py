"""Database passwords never reach a log line or an error message, in any form a DSN takes."""

from __future__ import annotations

import subprocess
import sys

import anyio
import pytest

from planbus.bus import db
from planbus.errors import ConfigurationError

pytestmark = pytest.mark.anyio

PASSWORD = "S3cret%ZZPW"


@pytest.mark.parametrize(
    ("dsn", "secret"),
    [
        ("postgresql://app:hunter22@db.example:5432/app", "hunter22"),
        ("postgres://app:p@ss@w0rd@db.example/app", "ss@w0rd"),  # '@' in the password
        ("postgresql://app:S3cret%40x@db.example/app", "S3cret"),  # percent-encoded
        ("postgresql://app@db.example/app?password=hunter22&sslmode=require", "hunter22"),
        ("host=db.example user=app password=hunter22 dbname=app", "hunter22"),
        ("host=db.example password = 'with space\\'s' dbname=app", "space"),
        ("host=db.example PASSWORD=hunter22", "hunter22"),
    ],
)
def test_every_form_of_a_dsn_is_masked(dsn: str, secret: str) -> None:
    masked = db.redact(dsn)
    assert secret not in masked
    assert "***" in masked
    assert "db.example" in masked


@pytest.mark.parametrize(
    ("dsn", "message"),
    [
        # psycopg's own message quotes the token it could not decode.
        (
            f"postgresql://app:{PASSWORD}@127.0.0.1:1/app",
            f'invalid percent-encoded token: "{PASSWORD}"',
        ),
        # libpq ends the password at the first '@' and echoes the rest as a host name.
        ("postgresql://app:p@ssw0rd@127.0.0.1:1/app", "failed to resolve host 'ssw0rd@127.0.0.1'"),
        ("postgresql://app:p%40ssw0rd@127.0.0.1:1/app", "password p@ssw0rd was refused"),
        ("host=127.0.0.1 password='h\\'unter' port=1", "password h'unter was refused"),
    ],
)
def test_a_password_the_driver_echoes_is_masked(dsn: str, message: str) -> None:
    masked = db.redact(message, dsn)
    assert "***" in masked
    for piece in ("S3cret", "ssw0rd", "unter"):
        assert piece not in masked


@pytest.mark.parametrize(
    "dsn",
    [
        f"postgresql://app:{PASSWORD}@127.0.0.1:1/app",
        "postgresql://app:p@ssw0rd@nowhere.invalid:1/app",
        "host=127.0.0.1 port=1 user=app password=hunter22 connect_timeout=2",
    ],
)
async def test_start_up_errors_name_the_database_but_not_its_password(dsn: str) -> None:
    with pytest.raises(ConfigurationError) as refused:
        await db.check_database(dsn, None)
    message = str(refused.value)
    for piece in ("S3cret", "ZZPW", "ssw0rd", "hunter22"):
        assert piece not in message, message
    assert "***" in message


async def test_the_worker_prints_no_password_when_it_cannot_start() -> None:
    def run() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "planbus.listen"],
            env={
                "PLANBUS_DATABASE_URL": f"postgresql://app:{PASSWORD}@127.0.0.1:1/app",
                "PATH": "/usr/bin:/bin",
            },
            capture_output=True,
            text=True,
            timeout=60,
        )

    finished = await anyio.to_thread.run_sync(run)
    assert finished.returncode == 2, finished.stderr
    assert "S3cret" not in finished.stderr + finished.stdout
    assert "invalid percent-encoded token" in finished.stderr
