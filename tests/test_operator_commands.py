"""`python -m planbus show|cancel|purge|migrate|status --watch|--version`, and what every command
shares: it names its database, its help has examples, and it never lets a stored text drive the
terminal."""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import anyio
import pytest
from psycopg import sql
from psycopg.types.json import Jsonb

import planbus
from planbus.llm.plan import Lead, Plan
from planbus.llm.planner import TemplatePlanner
from planbus.ops import cli
from planbus.ops.actions import CANCELLED_ERROR
from tests.helpers import Database, listening_events, running_worker
from tests.test_cli import ago, failed_row, insert_row, run
from tests.test_cli import planbus as planbus_process

pytestmark = pytest.mark.anyio


def clean_environment() -> dict[str, str]:
    return {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("PLANBUS_", "OPENAI_")) and k != "DATABASE_URL"
    }


def where(url: str) -> str:
    """How the commands name a database: host:port/dbname."""
    from psycopg.conninfo import conninfo_to_dict

    info = conninfo_to_dict(url)
    return f"{info['host']}:{info['port']}/{info['dbname']}"


# -- version and help ----------------------------------------------------------------------


def test_version_comes_from_one_place_and_the_planbus_command_exists() -> None:
    done = planbus_process("--version")
    assert (done.returncode, done.stdout) == (0, f"planbus {planbus.__version__}\n")
    assert importlib.metadata.version("planbus") == planbus.__version__
    command = shutil.which("planbus", path=str(Path(sys.executable).parent))
    assert command is not None, "the `planbus` console script is not installed"
    again = subprocess.run(
        [command, "--version"], capture_output=True, text=True, timeout=60, check=False
    )
    assert again.stdout == done.stdout


def subcommand_parsers() -> dict[str, Any]:
    parser = cli.build_parser()
    (subcommands,) = [a for a in parser._actions if a.dest == "command"]
    return dict(subcommands.choices or {})


def test_every_subcommand_help_has_a_description_every_flag_a_help_and_examples(
    capsys: pytest.CaptureFixture[str],
) -> None:
    for name, parser in subcommand_parsers().items():
        assert parser.description, name
        for action in parser._actions:
            assert action.help, f"{name} {action.option_strings or action.dest} has no help"
            takes_value = action.nargs != 0 and not action.required
            if takes_value and action.default not in (None, False) and action.option_strings:
                assert "default" in action.help, f"{name} {action.option_strings}: no default"
        with pytest.raises(SystemExit):
            cli.main([name, "--help"])
        out = capsys.readouterr().out
        assert f"examples:\n  python -m planbus {name}" in out, name


def test_demo_help_says_plainly_which_database_it_uses(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli.main(["demo", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "embedded PostgreSQL" in text
    assert "never on the database PLANBUS_DATABASE_URL or DATABASE_URL names" in text
    assert "default: PLANBUS_DATABASE_URL" not in text  # the other commands' rule, not the demo's


# -- every command names its database ---------------------------------------------------------


async def test_every_command_names_the_database_it_uses_first(
    database: Database, capsys: pytest.CaptureFixture[str]
) -> None:
    lead = await database.insert_lead()
    failed = await failed_row(database, lead, "Boom.")
    url = ["--database-url", database.url]
    for argv in (
        ["status"],
        ["show", str(failed)],
        ["retry", "--failed"],
        ["cancel", str(failed)],
        ["purge", "--older-than", "30d"],
        ["request", "--lead", str(lead)],
        ["migrate"],
    ):
        await anyio.to_thread.run_sync(cli.main, [*argv, *url])
        out = capsys.readouterr().out
        first = out.splitlines()[0]
        assert where(database.url) in first, f"{argv}: {first!r}"
        assert "password" not in out
    await anyio.to_thread.run_sync(cli.main, ["status", "--json", *url])
    assert json.loads(capsys.readouterr().out)["database"] == where(database.url)


def test_status_on_the_embedded_server_names_its_data_folder(data_root: Path) -> None:
    data = data_root / "postgres"
    done = planbus_process("status", env={"PLANBUS_DATA_DIR": str(data)})
    assert done.returncode == 0, done.stderr
    first = done.stdout.splitlines()[0]
    assert first.startswith("database: ") and str(data.resolve()) in first


# -- show ------------------------------------------------------------------------------------


async def test_show_tells_a_retried_requests_whole_story(
    database: Database, capsys: pytest.CaptureFixture[str]
) -> None:
    lead = await database.insert_lead(prospect_name="Grace Hopper")
    failed = await failed_row(database, lead, "The LLM did not answer in time.")
    async with running_worker(database.url, sweep_seconds=3600):
        code, _, _ = await run(capsys, "retry", str(failed), "--database-url", database.url)
        await database.wait_for(failed, within=10)
    assert code == 0

    code, out, _ = await run(capsys, "show", str(failed), "--database-url", database.url)

    assert code == 0
    assert out.startswith(f"request {failed}: completed\n")
    assert f"lead:           {lead} (Grace Hopper" in out
    assert "attempts:       1" in out
    assert "previous error: The LLM did not answer in time." in out
    for timing in ("created:", "run after:", "claimed:", "finished:"):
        assert timing in out
    assert "plan: 6 steps" in out and "linkedin_connect" in out
    assert "reminders: 6" in out and out.count("pending") >= 6

    code, out, _ = await run(capsys, "show", str(failed), "--json", "--database-url", database.url)
    story = json.loads(out)
    assert story["result"]["previous_error"] == "The LLM did not answer in time."
    assert [r["step_id"] for r in story["reminders"]] == [1, 2, 3, 4, 5, 6]


async def test_show_an_unknown_request_exits_1_with_one_line(
    database: Database, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = await run(capsys, "show", "424242", "--database-url", database.url)
    assert code == 1 and out == ""
    assert err.startswith("request 424242 does not exist") and err.count("\n") == 1


async def test_retried_request_keeps_its_old_error_after_it_completes(
    database: Database, capsys: pytest.CaptureFixture[str]
) -> None:
    lead = await database.insert_lead()
    failed = await failed_row(database, lead, "The model's output was invalid.")
    await run(capsys, "retry", str(failed), "--database-url", database.url)
    async with running_worker(database.url):
        row = await database.wait_for(failed)
    assert row["status"] == "completed"
    assert row["result"]["previous_error"] == "The model's output was invalid."
    assert row["result"]["step_count"] == 6
    assert row["last_error"] == "The model's output was invalid."


# -- cancel ----------------------------------------------------------------------------------


async def test_cancel_fails_a_pending_request_and_sends_the_event(
    database: Database, capsys: pytest.CaptureFixture[str]
) -> None:
    leads = [await database.insert_lead() for _ in range(2)]
    pending = await database.insert_request(leads[0])
    completed = await insert_row(database, leads[1], status="completed", attempts=1)

    async with listening_events(database.url) as events:
        argv = ["cancel", str(pending), str(completed), "--database-url", database.url]
        code, out, err = await run(capsys, *argv)
        event = await events.wait_for(pending)

    assert code == 1  # one of the ids was not cancelled
    assert f"request {pending} (lead {leads[0]}) cancelled" in out
    assert f"request {completed} not cancelled: it is completed" in err
    assert event == {"id": pending, "lead_id": leads[0], "telegram_id": 42, "status": "failed"}
    row = await database.request(pending)
    assert (row["status"], row["result"], row["attempts"]) == (
        "failed",
        {"error": CANCELLED_ERROR},
        0,
    )
    assert row["finished_at"] is not None
    assert (await database.request(completed))["status"] == "completed"


# -- purge -----------------------------------------------------------------------------------


async def test_purge_deletes_only_finished_requests_older_than_the_retention(
    database: Database, capsys: pytest.CaptureFixture[str]
) -> None:
    leads = [await database.insert_lead() for _ in range(5)]
    old_done = await insert_row(database, leads[0], status="completed", finished_at=ago("40 days"))
    old_failed = await failed_row(database, leads[1], "Old.", before="31 days")
    recent = await insert_row(database, leads[2], status="completed", finished_at=ago("2 days"))
    pending = await insert_row(database, leads[3], created_at=ago("60 days"))
    url = ["--database-url", database.url]

    code, out, _ = await run(capsys, "purge", "--older-than", "30d", "--dry-run", *url)
    assert (code, out) == (0, "would purge 2 finished requests older than 30.0 days\n")
    assert await database.value("SELECT count(*) FROM plan_requests") == 4

    code, out, _ = await run(capsys, "purge", "--older-than", "30d", *url)
    assert code == 0 and out.startswith("purged 2 finished requests")
    ids = [r["id"] for r in await database.fetchall("SELECT id FROM plan_requests ORDER BY id")]
    assert ids == sorted([recent, pending])
    assert old_done not in ids and old_failed not in ids


def test_purge_needs_a_retention(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        cli.main(["purge"])
    assert exit_.value.code == 2
    assert "--older-than" in capsys.readouterr().err


# -- migrate ---------------------------------------------------------------------------------


async def test_migrate_says_what_it_applied_and_then_that_nothing_is_left(
    empty_database_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    url = ["--database-url", empty_database_url]
    code, out, err = await run(capsys, "migrate", "--to", "0002_tma_rights", *url)
    assert code == 0, err
    assert f"migrated {where(empty_database_url)} from an empty schema to 0002_tma_rights" in out

    code, out, err = await run(capsys, "migrate", *url)
    assert code == 0, err
    head = queries_head()
    assert f"from 0002_tma_rights to {head}" in out
    assert "applied: 0003_event_payload" in out

    code, out, _ = await run(capsys, "migrate", *url)
    assert (code, out) == (
        0,
        f"{where(empty_database_url)} is already at {head} (head); nothing to apply\n",
    )


def queries_head() -> str:
    from planbus.ops import migrate

    head = migrate.head_revision()
    assert head is not None
    return head


def test_migrate_works_from_any_folder(empty_database_url: str, tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "planbus", "migrate", "--database-url", empty_database_url],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,  # no alembic.ini here
        env=clean_environment(),
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert f"to {queries_head()}" in done.stdout


@pytest.mark.parametrize(
    "argv, says",
    [
        (["--database-url", "postgresql://x@127.0.0.1:1/x"], "cannot connect to the database"),
        (["--to", "no_such_revision"], "cannot migrate to 'no_such_revision'"),
    ],
)
async def test_migrate_with_a_bad_database_or_revision_exits_2_with_one_line(
    database: Database, capsys: pytest.CaptureFixture[str], argv: list[str], says: str
) -> None:
    code, _, err = await run(capsys, "migrate", "--database-url", database.url, *argv)
    assert code == 2
    assert err.startswith(f"planbus: {says}") and err.count("\n") == 1, err


# -- status --watch --------------------------------------------------------------------------


def test_status_watch_shows_the_queue_again_until_ctrl_c(database_url: str) -> None:
    argv = ["status", "--watch", "0.1", "--database-url", database_url]
    process = subprocess.Popen(
        [sys.executable, "-m", "planbus", *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=clean_environment(),
    )
    assert process.stdout is not None
    reports = 0
    for line in process.stdout:
        reports += line.startswith("requests: ")
        if reports == 3:
            break
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=30)
    assert reports == 3
    assert process.returncode == 0, err
    assert "Traceback" not in err


# -- request --wait --------------------------------------------------------------------------


class GatedPlanner(TemplatePlanner):
    """Plans only once the test opens the gate, so the request is seen in `processing`."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = anyio.Event()

    async def plan(self, lead: Lead, *args: Any, **kwargs: Any) -> Plan:
        await self.gate.wait()
        return await super().plan(lead, *args, **kwargs)


async def test_request_wait_shows_each_status_as_it_changes(database: Database) -> None:
    lead = await database.insert_lead()
    planner = GatedPlanner()
    argv = ["request", "--lead", str(lead), "--wait", "--database-url", database.url]
    async with (
        running_worker(database.url, planner=planner),
        await anyio.open_process(
            [sys.executable, "-m", "planbus", *argv], env=clean_environment()
        ) as process,
    ):
        assert process.stdout is not None
        out = ""
        with anyio.fail_after(30):
            async for chunk in process.stdout:
                out += chunk.decode()
                if " is processing" in out:
                    break
            planner.gate.set()
            async for chunk in process.stdout:
                out += chunk.decode()
            await process.wait()
    lines = out.splitlines()
    request_id = await database.value("SELECT id FROM plan_requests")
    assert process.returncode == 0, out
    assert lines[1] == f"request {request_id} created for lead {lead} (pending)"
    assert lines[2] == f"request {request_id} is processing: attempt 1, worker test-worker"
    assert lines[3] == f"request {request_id} completed: 6 steps"


# -- control characters ----------------------------------------------------------------------


ESCAPE = "\x1b[2J\x1b[31m"


async def test_stored_escape_sequences_never_reach_the_terminal(
    database: Database, capsys: pytest.CaptureFixture[str]
) -> None:
    leads = [await database.insert_lead(prospect_name=f"Eve{ESCAPE}") for _ in range(2)]
    failed = await failed_row(database, leads[0], f"Bad{ESCAPE}news\u202e.")
    step = {
        "step_id": 1,
        "action_type": "linkedin_like",
        "description": f"Like{ESCAPE}",
        "suggested_text": None,
        "timing": "Day 0",
        "delay_days": 0,
        "status": "pending",
        "completed_at": None,
    }
    done = await insert_row(
        database,
        leads[1],
        status="completed",
        attempts=1,
        worker_id=f"host{ESCAPE}",
        result=Jsonb({"plan": [step], "step_count": 1}),
        finished_at=sql.SQL("now()"),
    )
    url = ["--database-url", database.url]
    outputs = []
    for argv in (["status"], ["show", str(failed)], ["show", str(done)], ["retry", str(failed)]):
        await anyio.to_thread.run_sync(cli.main, [*argv, *url])
        captured = capsys.readouterr()
        outputs.append(captured.out + captured.err)
    text = "\n".join(outputs)
    assert "\x1b" not in text and "\u202e" not in text
    assert "Bad\\x1b[2J\\x1b[31mnews\\u202e." in text
    assert "Like\\x1b[2J" in text and "Eve\\x1b[2J" in text


async def test_migrate_refuses_to_go_back(
    database: Database, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = await run(
        capsys, "migrate", "--to", "0002_tma_rights", "--database-url", database.url
    )
    assert code == 2 and err.count("\n") == 1, err
    assert await database.value("SELECT version_num FROM alembic_version") == queries_head()


def test_migrate_on_a_fresh_embedded_server_says_it_applied_every_revision(
    data_root: Path,
) -> None:
    data = data_root / "postgres"
    done = planbus_process("migrate", env={"PLANBUS_DATA_DIR": str(data)})
    assert done.returncode == 0, done.stderr
    assert str(data.resolve()) in done.stdout
    assert f"from an empty schema to {queries_head()}" in done.stdout
    assert not (data / "postmaster.pid").exists()  # the server it started is stopped again


async def test_show_names_the_model_its_tokens_and_the_steps_so_far(
    database: Database, capsys: pytest.CaptureFixture[str]
) -> None:
    leads = [await database.insert_lead() for _ in range(2)]
    step = {"step_id": 1, "action_type": "linkedin_like", "description": "Like a post"}
    cost = {"model": "gpt-4o-mini", "model_seconds": 1.5}
    usage = {"prompt_tokens": 812, "completion_tokens": 301}
    done = await insert_row(
        database,
        leads[0],
        status="completed",
        attempts=1,
        result=Jsonb({"plan": [step], "step_count": 1, **cost, "usage": usage}),
    )
    planning = await insert_row(
        database,
        leads[1],
        status="processing",
        attempts=1,
        claim_token=sql.SQL("gen_random_uuid()"),
        progress=Jsonb({"steps": [step]}),
    )
    url = ["--database-url", database.url]

    _, out, _ = await run(capsys, "show", str(done), *url)
    assert "model:          gpt-4o-mini (812 prompt tokens, 301 completion tokens" in out

    _, out, _ = await run(capsys, "show", str(planning), *url)
    assert "plan so far: 1 step (still planning)" in out and "Like a post" in out
