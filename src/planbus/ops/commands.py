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
from psycopg import errors

from planbus import logs, runtime
from planbus.ops import admin_queries, client, console, demo, migrate, status
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
    ids = sorted(set(args.ids)) or None
    params = {"ids": ids, "since_seconds": args.since}
    async with connection(settings) as conn:
        print(f"database: {clean(await client.describe(conn, settings))}")
        try:
            retried = await fetchall(conn, admin_queries.RETRY_FAILED, params)
        except errors.UniqueViolation:
            print("a lead got a new request meanwhile; nothing was retried, try again")
            return EXIT_FAILED
        left = [i for i in ids or [] if i not in {r["id"] for r in retried}]
        found = await fetchall(conn, admin_queries.REQUEST_STATUSES, {"ids": left}) if left else []
    for row in retried:
        print(f"request {row['id']} (lead {row['lead_id']}) is pending again")
        print(f"  previous error: {clean(row['last_error'] or '-')}")
        _log_operator_action(row, "requeued")
    _explain_refusals(
        left, found, "retried", "failed", "its lead already has a pending or processing request"
    )
    if not retried and not left:
        print("no failed requests to retry")
    return EXIT_FAILED if left else EXIT_OK


async def cancel_command(settings: Settings, args: argparse.Namespace) -> int:
    ids = sorted(set(args.ids))
    async with connection(settings) as conn:
        print(f"database: {clean(await client.describe(conn, settings))}")
        cancelled = await fetchall(
            conn, admin_queries.CANCEL_PENDING, {"ids": ids, "error": CANCELLED_ERROR}
        )
        left = [i for i in ids if i not in {r["id"] for r in cancelled}]
        found = await fetchall(conn, admin_queries.REQUEST_STATUSES, {"ids": left}) if left else []
    for row in cancelled:
        print(f"request {row['id']} (lead {row['lead_id']}) cancelled: it is failed now")
        _log_operator_action(row, "cancelled")
    _explain_refusals(left, found, "cancelled", "pending", "a worker claimed it meanwhile")
    return EXIT_FAILED if left else EXIT_OK


CANCELLED_ERROR = "An operator cancelled this request before it was planned."


def _log_operator_action(row: dict[str, Any], outcome: str) -> None:
    log.info(
        "request %d lead %d %s by an operator",
        row["id"],
        row["lead_id"],
        outcome,
        extra=logs.request_fields(row["id"], row["lead_id"], 0, outcome, None),
    )


def _explain_refusals(
    left: list[int], found: list[dict[str, Any]], verb: str, expected: str, otherwise: str
) -> None:
    """Why each id in `left` was not acted on, on stderr."""
    statuses = {row["id"]: row["status"] for row in found}
    for request_id in left:
        status = statuses.get(request_id)
        if status is None:
            reason = "no such request"
        elif status != expected:
            reason = f"it is {status}; only {expected} requests are {verb}"
        else:
            reason = otherwise
        print(f"request {request_id} not {verb}: {reason}", file=sys.stderr)


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
