"""`python -m planbus status|retry|request|demo` against a real database, as operators run it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import anyio
import pytest
from psycopg import sql
from psycopg.types.json import Jsonb

from planbus.errors import PermanentError
from planbus.llm.plan import Lead, Plan
from planbus.llm.planner import TemplatePlanner
from planbus.ops import cli
from tests.helpers import Database, running_worker

pytestmark = pytest.mark.anyio


async def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """`python -m planbus ARGV` in this process (its own event loop, in a thread). The line
    naming the database, which a command prints first, is taken off `out`."""
    code = await anyio.to_thread.run_sync(cli.main, list(argv))
    captured = capsys.readouterr()
    out = captured.out
    if out.startswith("database: "):
        out = out.partition("\n")[2]
    return code, out, captured.err


async def insert_row(database: Database, lead: int, **columns: object) -> int:
    """A plan_requests row in any state, as a worker would have left it; `sql.SQL` values are
    written as SQL (e.g. `now() - interval '5 minutes'`), others as literals."""
    values = {"lead_id": lead, "telegram_id": 42, **columns}
    query = sql.SQL("INSERT INTO plan_requests ({}) VALUES ({}) RETURNING id").format(
        sql.SQL(", ").join(map(sql.Identifier, values)),
        sql.SQL(", ").join(
            v if isinstance(v, sql.Composable) else sql.Literal(v) for v in values.values()
        ),
    )
    return int(await database.value(query))


def ago(interval: str) -> sql.Composed:
    return sql.SQL("now() - {}::interval").format(sql.Literal(interval))


def from_now(interval: str) -> sql.Composed:
    return sql.SQL("now() + {}::interval").format(sql.Literal(interval))


async def failed_row(database: Database, lead: int, error: str, before: str = "10 min") -> int:
    return await insert_row(
        database,
        lead,
        status="failed",
        attempts=3,
        result=Jsonb({"error": error}),
        last_error=error,
        finished_at=ago(before),
    )


async def test_status_shows_counts_oldest_pending_claims_and_recent_failures(
    database: Database, capsys: pytest.CaptureFixture[str]
) -> None:
    leads = [await database.insert_lead() for _ in range(5)]
    pending = await insert_row(database, leads[0], created_at=ago("5 minutes"))
    processing = await insert_row(
        database,
        leads[1],
        status="processing",
        attempts=1,
        worker_id="host-a:12",
        claim_token=sql.SQL("gen_random_uuid()"),
        claimed_at=ago("2 seconds"),
        lease_expires_at=from_now("30 seconds"),
    )
    recent = await failed_row(database, leads[2], "The LLM credentials were refused.")
    await failed_row(database, leads[3], "An old failure.", before="3 hours")
    await insert_row(database, leads[4], status="completed", attempts=1)

    code, out, _ = await run(capsys, "status", "--json", "--database-url", database.url)
    assert code == 0
    report = json.loads(out)
    assert report["counts"] == {"pending": 1, "processing": 1, "completed": 1, "failed": 2}
    assert report["oldest_pending"]["id"] == pending
    assert 300 <= report["oldest_pending"]["age_seconds"] < 400
    (claim,) = report["processing"]
    assert (claim["id"], claim["worker_id"]) == (processing, "host-a:12")
    assert 20 < claim["lease_expires_in_seconds"] <= 30
    assert claim["lease_expires_at"].endswith("+00:00")
    assert [(f["id"], f["error"]) for f in report["failed_last_hour"]] == [
        (recent, "The LLM credentials were refused.")
    ]

    code, out, _ = await run(capsys, "status", "--database-url", database.url)
    assert code == 0
    assert "requests: 1 pending, 1 processing, 1 completed, 2 failed" in out
    assert f"oldest pending: request {pending} (lead {leads[0]}), waiting 5 min, due now" in out
    assert "host-a:12" in out and "expires in" in out
    assert "The LLM credentials were refused." in out
    assert "An old failure." not in out


async def test_status_on_an_unreachable_database_exits_2_with_one_line(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code, _, err = await run(capsys, "status", "--database-url", "postgresql://x@127.0.0.1:1/x")
    assert code == 2
    assert err.startswith("planbus: cannot connect to the database") and err.count("\n") == 1


async def test_retry_resets_a_failed_request_and_keeps_its_error(
    database: Database, capsys: pytest.CaptureFixture[str]
) -> None:
    lead = await database.insert_lead()
    failed = await failed_row(database, lead, "The model's output was invalid.")

    code, out, err = await run(capsys, "retry", str(failed), "--database-url", database.url)

    assert code == 0, err
    assert f"request {failed} (lead {lead}) is pending again" in out
    assert "previous error: The model's output was invalid." in out
    row = await database.request(failed)
    assert (row["status"], row["attempts"], row["finished_at"]) == ("pending", 0, None)
    assert row["last_error"] == "The model's output was invalid."
    assert row["result"] == {"previous_error": "The model's output was invalid."}
    assert await database.value(
        "SELECT run_after <= now() FROM plan_requests WHERE id = %s", (failed,)
    )


async def test_retry_starts_the_throttling_patience_and_count_afresh(
    database: Database, capsys: pytest.CaptureFixture[str]
) -> None:
    # A request that failed after throttling past the patience: retried, it must get a whole
    # new patience and its attempts must count from zero again, not go negative.
    lead = await database.insert_lead()
    failed = await failed_row(database, lead, "The LLM provider kept refusing; giving up.")
    await database.conn.execute(
        "UPDATE plan_requests SET attempts = 3, throttled_claims = 3,"
        " throttled_since = now() - interval '1 hour' WHERE id = %s",
        (failed,),
    )

    code, _, err = await run(capsys, "retry", str(failed), "--database-url", database.url)

    assert code == 0, err
    row = await database.request(failed)
    assert (row["attempts"], row["throttled_claims"], row["throttled_since"]) == (0, 0, None)


async def test_retry_refuses_ids_that_are_not_failed_and_exits_1(
    database: Database, capsys: pytest.CaptureFixture[str]
) -> None:
    leads = [await database.insert_lead() for _ in range(2)]
    failed = await failed_row(database, leads[0], "Boom.")
    completed = await insert_row(database, leads[1], status="completed", attempts=1)

    argv = ["retry", str(failed), str(completed), "999999", "--database-url", database.url]
    code, out, err = await run(capsys, *argv)

    assert code == 1
    assert f"request {failed} (lead {leads[0]}) is pending again" in out
    assert f"request {completed} not retried: it is completed" in err
    assert "request 999999 not retried: no such request" in err
    assert (await database.request(completed))["status"] == "completed"


async def test_retried_request_is_picked_up_at_once_by_a_running_worker(
    database: Database, capsys: pytest.CaptureFixture[str]
) -> None:
    lead = await database.insert_lead()
    failed = await failed_row(database, lead, "The LLM did not answer in time.")
    # No sweep during the test: only the requeue trigger's NOTIFY can wake the worker.
    async with running_worker(database.url, sweep_seconds=3600):
        code, _, _ = await run(capsys, "retry", str(failed), "--database-url", database.url)
        row = await database.wait_for(failed, within=5)
    assert code == 0
    assert (row["status"], row["attempts"]) == ("completed", 1)


async def test_retry_failed_since_takes_only_recent_failures(
    database: Database, capsys: pytest.CaptureFixture[str]
) -> None:
    leads = [await database.insert_lead() for _ in range(2)]
    recent = await failed_row(database, leads[0], "Recent.", before="30 minutes")
    old = await failed_row(database, leads[1], "Old.", before="3 hours")

    code, out, _ = await run(
        capsys, "retry", "--failed", "--since", "2h", "--database-url", database.url
    )
    assert code == 0
    assert f"request {recent} " in out and f"request {old} " not in out
    assert (await database.request(old))["status"] == "failed"

    code, out, _ = await run(
        capsys, "retry", "--failed", "--since", "2h", "--database-url", database.url
    )
    assert (code, out) == (0, "no failed requests to retry\n")


async def test_retry_needs_ids_or_failed(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        cli.main(["retry"])
    assert exit_.value.code == 2
    assert "give request IDs or --failed" in capsys.readouterr().err


async def test_retry_since_without_failed_names_the_real_problem(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as exit_:
        cli.main(["retry", "--since", "2h"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "--since" in err and "needs --failed" in err
    assert "not both" not in err


async def test_request_wait_prints_the_plan_as_a_table(
    database: Database, capsys: pytest.CaptureFixture[str]
) -> None:
    lead = await database.insert_lead(telegram_id=77, prospect_name="Grace Hopper")
    async with running_worker(database.url):
        code, out, err = await run(
            capsys, "request", "--lead", str(lead), "--wait", "--database-url", database.url
        )
    assert code == 0, err
    (row,) = await database.fetchall("SELECT * FROM plan_requests WHERE lead_id = %s", (lead,))
    assert (row["status"], row["telegram_id"]) == ("completed", 77)
    lines = out.splitlines()
    assert lines[0] == f"request {row['id']} created for lead {lead} (pending)"
    done = lines.index(f"request {row['id']} completed: 6 steps")
    assert lines[done + 1].split() == ["step", "day", "action", "text"]
    assert lines[done + 2].split()[:3] == ["1", "0", "linkedin_like"]
    assert "Hi Grace" in out


async def test_request_uses_the_given_telegram_id(
    database: Database, capsys: pytest.CaptureFixture[str]
) -> None:
    lead = await database.insert_lead(telegram_id=77)
    argv = ["request", "--lead", str(lead), "--telegram-id", "88", "--database-url", database.url]
    code, out, _ = await run(capsys, *argv)
    assert code == 0 and "created" in out
    assert await database.value("SELECT telegram_id FROM plan_requests") == 88


async def test_request_for_a_lead_with_an_active_request_uses_that_request(
    database: Database, capsys: pytest.CaptureFixture[str]
) -> None:
    lead = await database.insert_lead()
    active = await database.insert_request(lead)

    code, out, _ = await run(capsys, "request", "--lead", str(lead), "--database-url", database.url)

    assert code == 0
    assert out == f"lead {lead} already has request {active} (pending); using it\n"
    assert await database.value("SELECT count(*) FROM plan_requests") == 1


class RefusedPlanner(TemplatePlanner):
    async def plan(self, lead: Lead, on_progress: object = None) -> Plan:
        raise PermanentError("The LLM credentials were refused.")


async def test_request_wait_exits_1_with_the_error_when_the_request_fails(
    database: Database, capsys: pytest.CaptureFixture[str]
) -> None:
    lead = await database.insert_lead()
    async with running_worker(database.url, planner=RefusedPlanner()):
        code, out, _ = await run(
            capsys, "request", "--lead", str(lead), "--wait", "--database-url", database.url
        )
    assert code == 1
    assert "failed after 1 attempt: The LLM credentials were refused." in out


async def test_request_wait_exits_3_when_no_worker_finishes_it_in_time(
    database: Database, capsys: pytest.CaptureFixture[str]
) -> None:
    lead = await database.insert_lead()
    argv = ["request", "--lead", str(lead), "--wait", "--timeout", "0.3"]
    code, _, err = await run(capsys, *argv, "--database-url", database.url)
    assert code == 3
    assert "is still pending after 300 ms; is a worker running?" in err


async def test_request_for_a_missing_lead_exits_1(
    database: Database, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = await run(capsys, "request", "--lead", "424242", "--database-url", database.url)
    assert (code, err) == (1, "lead 424242 does not exist\n")
    assert await database.value("SELECT count(*) FROM plan_requests") == 0


async def test_demo_plans_three_sample_leads(
    database: Database, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = await run(capsys, "demo", "--database-url", database.url)
    assert code == 0, err
    assert "planning: 3/3 done, 0 planning, 0 waiting" in out
    for name in ("Ada Lovelace", "Grace Hopper", "Katherine Johnson"):
        assert name in out
    assert out.count("linkedin_connect") == 3
    rows = await database.fetchall("SELECT status FROM plan_requests")
    assert [r["status"] for r in rows] == ["completed"] * 3


async def test_demo_reuses_its_sample_leads_on_every_run(
    database: Database, capsys: pytest.CaptureFixture[str]
) -> None:
    for _ in range(2):
        code, _, err = await run(capsys, "demo", "--database-url", database.url)
        assert code == 0, err
    assert await database.value("SELECT count(*) FROM lead_registry") == 3
    requests = await database.fetchall("SELECT lead_id, status FROM plan_requests")
    assert len(requests) == 6 and len({r["lead_id"] for r in requests}) == 3
    assert {r["status"] for r in requests} == {"completed"}


async def test_demo_claims_on_its_own_database_whatever_the_environment_says(
    database: Database, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # A work URL in the environment belongs to some deployment, not to the demo's database.
    monkeypatch.setenv("PLANBUS_WORK_DATABASE_URL", "postgresql://nobody@127.0.0.1:1/nowhere")
    code, _, err = await run(capsys, "demo", "--database-url", database.url, "--timeout", "30")
    assert code == 0, err
    rows = await database.fetchall("SELECT status FROM plan_requests")
    assert [r["status"] for r in rows] == ["completed"] * 3


def planbus(*argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """`python -m planbus ARGV` as a child process, with no database or LLM settings inherited."""
    clean = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("PLANBUS_", "OPENAI_")) and k != "DATABASE_URL"
    }
    return subprocess.run(
        [sys.executable, "-m", "planbus", *argv],
        capture_output=True,
        text=True,
        timeout=120,
        env={**clean, **(env or {})},
        stdin=subprocess.DEVNULL,
        check=False,
    )


def test_every_subcommand_has_help(capsys: pytest.CaptureFixture[str]) -> None:
    done = planbus("--help")
    assert done.returncode == 0
    for command in ("status", "retry", "request", "demo"):
        assert command in done.stdout
        with pytest.raises(SystemExit) as exit_:
            cli.main([command, "--help"])
        assert exit_.value.code == 0
        assert f"usage: python -m planbus {command}" in capsys.readouterr().out
    no_command = planbus()
    assert no_command.returncode == 2 and "usage:" in no_command.stderr


def test_demo_runs_on_a_fresh_embedded_database(data_root: Path) -> None:
    data = data_root / "postgres"
    done = planbus("demo", env={"PLANBUS_DATA_DIR": str(data)})
    assert done.returncode == 0, done.stderr
    first = done.stdout.splitlines()[0]
    assert first.startswith("database: ") and str(data.resolve()) in first
    assert done.stdout.count("linkedin_connect") == 3
    assert "planning: 3/3 done" in done.stdout
    # The server the demo started is stopped again: nothing is left running.
    assert not (data / "postmaster.pid").exists()
