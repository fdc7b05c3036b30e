"""Every bad argument to an operator command is one line and exit 2, and changes nothing: ids
past bigint or below 1, durations past an interval's range, waits that are not a number."""

from __future__ import annotations

from typing import Any

import anyio
import pytest

from tests.helpers import Database
from tests.test_cli import ago, failed_row, insert_row
from tests.test_cli import planbus as planbus_process

pytestmark = pytest.mark.anyio

TOO_BIG = "99999999999999999999"


async def every_request(database: Database) -> list[dict[str, Any]]:
    return await database.fetchall(
        "SELECT id, status, attempts, result, updated_at FROM plan_requests ORDER BY id"
    )


@pytest.mark.parametrize(
    "argv, says",
    [
        (["cancel", TOO_BIG], "an id out of range"),
        (["cancel", "{pending}", TOO_BIG], "an id out of range"),
        (["cancel", "-{pending}"], "an id out of range"),
        (["retry", TOO_BIG], "an id out of range"),
        (["retry", "{failed}", "-1"], "an id out of range"),
        (["show", TOO_BIG], "an id out of range"),
        (["show", "-1"], "an id out of range"),
        (["show", "0"], "an id out of range"),
        (["purge", "--older-than", "99999999999d"], "too long"),
        (["purge", "--older-than", "1e400"], "not a duration"),
        (["retry", "--failed", "--since", "99999999999d"], "too long"),
        (["request", "--lead", TOO_BIG], "an id out of range"),
        (["request", "--lead", "{lead}", "--telegram-id", TOO_BIG], "telegram id out of range"),
        (["request", "--lead", "{lead}", "--wait", "--timeout", "inf"], "seconds out of range"),
        (["status", "--watch", "nan"], "seconds out of range"),
        (["status", "--watch", "-1"], "seconds out of range"),
    ],
)
async def test_a_bad_argument_is_one_line_and_exit_2_and_changes_nothing(
    database: Database, argv: list[str], says: str
) -> None:
    lead = await database.insert_lead()
    failed = await failed_row(database, lead, "The model's output was invalid.")
    pending = await insert_row(database, lead, created_at=ago("2 days"))
    before = await every_request(database)
    values = {"lead": lead, "failed": failed, "pending": pending}
    argv = [arg.format(**values) for arg in argv]

    done = await anyio.to_thread.run_sync(
        lambda: planbus_process(*argv, "--database-url", database.url)
    )
    assert done.returncode == 2, done.stderr
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    assert says in lines[0]
    assert "Traceback" not in done.stderr and done.stdout == ""
    assert await every_request(database) == before
