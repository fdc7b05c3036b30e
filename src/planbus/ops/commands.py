"""The operator commands behind `python -m planbus`: each names its database, then acts and
says what it did. Rendering is console.py's; the bus's side (connect, insert, wait) client.py's.

Exit codes, for scripts: 0 done; 1 the thing asked for did not happen (a request failed, an id
was not retried or cancelled, a request or lead does not exist); 2 bad usage or configuration
(flags, database URL, unreachable or unmigrated database); 3 `request --wait` timed out before
the request finished; 141 the output pipe was closed early (`status | head`).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from contextlib import AsyncExitStack
from typing import Any

import anyio

from planbus import runtime
from planbus.ops import actions, admin_queries, client, console, demo, migrate, status
from planbus.ops.client import connection, fetchall
from planbus.ops.console import clean, plural
from planbus.settings import Settings

log = logging.getLogger("planbus.cli")

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_TIMEOUT = 0, 1, 2, 3
CLEAR_SCREEN = "\x1b[H\x1b[2J"


async def status_command(settings: Settings, args: argparse.Namespace) -> int:
    """The queue at a glance; with --watch, again every few seconds until Ctrl-C."""
    async with connection(settings) as conn:
        where = await client.describe(conn, settings)
        while True:
            report = {"database": where, **await client.status_report(conn)}
            if args.json:
                print(json.dumps(report, indent=2, default=console.json_value), flush=True)
            else:
                if args.watch is not None and sys.stdout.isatty():
                    print(CLEAR_SCREEN, end="")
                print(console.format_status(report))
                for line in status.status_lines(report["provider"]):
                    print(clean(line))
                sys.stdout.flush()
            if args.watch is None:
                return EXIT_OK
            await anyio.sleep(args.watch)
            print(flush=True)


async def show_command(settings: Settings, args: argparse.Namespace) -> int:
    """One request's whole story."""
    async with connection(settings) as conn:
        where = await client.describe(conn, settings)
        rows = await fetchall(conn, admin_queries.REQUEST_STORY, {"id": args.id})
        if not rows:
            print(f"request {args.id} does not exist (database {where})", file=sys.stderr)
            return EXIT_FAILED
        reminders = await fetchall(conn, admin_queries.REQUEST_REMINDERS, {"id": args.id})
    if args.json:
        story = {"database": where, **rows[0], "reminders": reminders}
        print(json.dumps(story, indent=2, default=console.json_value))
    else:
        print(f"database: {clean(where)}")
        print(console.format_story(rows[0], reminders))
    return EXIT_OK


async def retry_command(settings: Settings, args: argparse.Namespace) -> int:
    async with connection(settings) as conn:
        print(f"database: {clean(await client.describe(conn, settings))}")
        outcome = await actions.retry(conn, args.ids or None, args.since)
    if outcome.race:
        print(actions.RETRY_RACE)
        return EXIT_FAILED
    for row in outcome.done:
        print(f"request {row['id']} (lead {row['lead_id']}) is pending again")
        print(f"  previous error: {clean(row['last_error'] or '-')}")
    _print_refusals(outcome)
    if not outcome.done and not outcome.refused:
        print("no failed requests to retry")
    return EXIT_FAILED if outcome.refused else EXIT_OK


async def cancel_command(settings: Settings, args: argparse.Namespace) -> int:
    async with connection(settings) as conn:
        print(f"database: {clean(await client.describe(conn, settings))}")
        outcome = await actions.cancel(conn, args.ids)
    for row in outcome.done:
        print(f"request {row['id']} (lead {row['lead_id']}) cancelled: it is failed now")
    _print_refusals(outcome)
    return EXIT_FAILED if outcome.refused else EXIT_OK


def _print_refusals(outcome: actions.Outcome) -> None:
    """Why each id was not acted on, on stderr."""
    for reason in outcome.refused.values():
        print(reason, file=sys.stderr)


async def purge_command(settings: Settings, args: argparse.Namespace) -> int:
    """Delete finished requests older than the retention, a batch at a time."""
    params = {"older_than": args.older_than, "batch": PURGE_BATCH}
    async with connection(settings) as conn:
        print(f"database: {clean(await client.describe(conn, settings))}")
        age = console.duration(args.older_than)
        if args.dry_run:
            (row,) = await fetchall(conn, admin_queries.COUNT_FINISHED_BEFORE, params)
            print(f"would purge {plural(row['count'], 'finished request')} older than {age}")
            return EXIT_OK
        purged = 0
        while True:
            cursor = await conn.execute(admin_queries.PURGE_FINISHED, params)
            purged += cursor.rowcount
            if cursor.rowcount < PURGE_BATCH:
                break
    print(f"purged {plural(purged, 'finished request')} (completed or failed) older than {age}")
    log.info("purged %d finished requests older than %s", purged, age)
    return EXIT_OK


PURGE_BATCH = 5000


async def request_command(settings: Settings, args: argparse.Namespace) -> int:
    async with connection(settings) as conn:
        print(f"database: {clean(await client.describe(conn, settings))}")
        if args.wait:
            # Before the insert, so the event cannot slip past between the two.
            await client.listen_events(conn)
        try:
            request_id, status, new = await client.insert_request(conn, args.lead, args.telegram_id)
        except LookupError as exc:
            print(exc, file=sys.stderr)
            return EXIT_FAILED
        if new:
            print(f"request {request_id} created for lead {args.lead} ({status})", flush=True)
        else:
            print(f"lead {args.lead} already has request {request_id} ({status}); using it")
        if not args.wait:
            return EXIT_OK
        row: dict[str, Any] = {}
        shown = (status, 0)  # what the line above said
        async for row in client.follow_request(conn, request_id, args.timeout):
            if row["status"] not in client.TERMINAL and (row["status"], row["attempts"]) != shown:
                print(console.progress_line(row), flush=True)
                shown = (row["status"], row["attempts"])
    return report_outcome(row, args.timeout)


def report_outcome(row: dict[str, Any], timeout: float) -> int:
    result = row["result"] or {}
    if row["status"] == "completed":
        plan = result.get("plan", [])
        print(f"request {row['id']} completed: {plural(len(plan), 'step')}")
        print(console.plan_table(plan))
        return EXIT_OK
    if row["status"] == "failed":
        attempts = plural(row["attempts"], "attempt")
        print(f"request {row['id']} failed after {attempts}: {clean(result.get('error'))}")
        return EXIT_FAILED
    print(
        f"request {row['id']} is still {row['status']} after {console.duration(timeout)}; "
        "is a worker running? (python -m planbus.listen)",
        file=sys.stderr,
    )
    return EXIT_TIMEOUT


async def migrate_command(settings: Settings, args: argparse.Namespace) -> int:
    """`alembic upgrade` from anywhere: the revisions ship inside the package."""
    async with AsyncExitStack() as stack:
        dsn = settings.database_url
        if dsn is None:
            dsn = await anyio.to_thread.run_sync(runtime.join_embedded, settings, stack)
        async with await client.connect(dsn) as conn:
            where = clean(await client.describe(conn, settings))
            before = await client.schema_revision(conn)
            await anyio.to_thread.run_sync(migrate.upgrade, dsn, args.to, before)
            after = await client.schema_revision(conn)
    if after is None or before == after:
        head = " (head)" if after == migrate.head_revision() else ""
        print(f"{where} is already at {after or 'no revision'}{head}; nothing to apply")
        return EXIT_OK
    applied = migrate.revisions_between(before, after)
    print(f"migrated {where} from {before or 'an empty schema'} to {after}")
    print(f"  applied: {', '.join(applied)}")
    log.info("migrated %s from %s to %s", where, before, after)
    return EXIT_OK


async def demo_command(settings: Settings, args: argparse.Namespace) -> int:
    return EXIT_OK if await demo.run_demo(settings, args) else EXIT_FAILED
