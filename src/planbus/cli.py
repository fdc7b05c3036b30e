"""`python -m planbus status|retry|request|demo`: see and fix the bus without writing SQL.

Exit codes, for scripts: 0 done; 1 the thing asked for did not happen (a request failed, an id
was not retried, a lead does not exist); 2 bad usage or configuration (flags, database URL,
unreachable or unmigrated database); 3 `request --wait` timed out before the request finished;
141 the output pipe was closed early (`status | head`), as for a process killed by SIGPIPE.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shutil
import sys
import textwrap
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from datetime import datetime
from typing import Any, LiteralString

import anyio
import psycopg
from psycopg import errors
from psycopg.rows import dict_row
from pydantic import BaseModel, ValidationError

from planbus import db, listen, logs, provider_limits, queries
from planbus.errors import ConfigurationError
from planbus.settings import Settings, load_settings

log = logging.getLogger("planbus.cli")

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_TIMEOUT = 0, 1, 2, 3
EXIT_BROKEN_PIPE = 128 + 13  # as a shell reports a process ended by SIGPIPE
TERMINAL = ("completed", "failed")
STATUSES = ("pending", "processing", "completed", "failed")
LIST_LIMIT = 50

Handler = Callable[[Settings, argparse.Namespace], Awaitable[int]]


class RequestEvent(BaseModel):
    """The payload of `plan_request_events`; other keys may come and are ignored."""

    id: int
    status: str


# -- database --------------------------------------------------------------------------------


@asynccontextmanager
async def connection(settings: Settings) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
    """An autocommit connection to the configured database, or to the embedded server."""
    async with AsyncExitStack() as stack:
        dsn = await stack.enter_async_context(database(settings))
        conn = await psycopg.AsyncConnection.connect(
            dsn, autocommit=True, application_name="planbus-cli"
        )
        async with conn:
            yield conn


@asynccontextmanager
async def database(settings: Settings) -> AsyncIterator[str]:
    """The DSN to use; with no URL, the embedded server in PLANBUS_DATA_DIR, started if needed
    (and stopped again afterwards when this command started it)."""
    async with AsyncExitStack() as stack:
        dsn = settings.database_url
        if dsn is None:
            dsn = await anyio.to_thread.run_sync(listen.start_embedded, settings, stack)
        await db.check_database(dsn, None)
        yield dsn


async def fetchall(
    conn: psycopg.AsyncConnection[Any], query: LiteralString, params: dict[str, Any] | None = None
) -> list[dict[str, Any]]:
    cursor = conn.cursor(row_factory=dict_row)
    await cursor.execute(query, params)
    return await cursor.fetchall()


# -- status ----------------------------------------------------------------------------------


async def status_command(settings: Settings, args: argparse.Namespace) -> int:
    async with connection(settings) as conn:
        counts = {status: 0 for status in STATUSES}
        for row in await fetchall(conn, queries.STATUS_COUNTS):
            counts[row["status"]] = row["count"]
        oldest = await fetchall(conn, queries.STATUS_OLDEST_PENDING)
        report = {
            "counts": counts,
            "oldest_pending": oldest[0] if oldest else None,
            "processing": await fetchall(conn, queries.STATUS_PROCESSING, {"limit": LIST_LIMIT}),
            "failed_last_hour": await fetchall(
                conn, queries.STATUS_RECENT_FAILURES, {"limit": LIST_LIMIT}
            ),
            "provider": await provider_limits.status_report(conn),
        }
    if args.json:
        print(json.dumps(report, indent=2, default=_json_value))
    else:
        print(format_status(report))
    return EXIT_OK


def format_status(report: dict[str, Any]) -> str:
    counts = report["counts"]
    lines = ["requests: " + ", ".join(f"{counts[s]} {s}" for s in counts)]
    oldest = report["oldest_pending"]
    if oldest is None:
        lines.append("oldest pending: none")
    else:
        due = oldest["due_in_seconds"]
        lines.append(
            f"oldest pending: request {oldest['id']} (lead {oldest['lead_id']}), waiting "
            f"{duration(oldest['age_seconds'])}, "
            + (f"retry due in {duration(due)}" if due > 0 else "due now")
        )
    processing = report["processing"]
    lines.append(f"processing: {len(processing) if processing else 'none'}")
    if processing:
        rows = [
            [
                *(r["id"], r["lead_id"], r["attempts"], r["worker_id"] or "-"),
                *(_lease(r["lease_expires_in_seconds"]), duration(r["running_seconds"])),
            ]
            for r in processing
        ]
        headers = ["request", "lead", "attempt", "worker", "lease", "running for"]
        lines.append(table(headers, rows, indent="  "))
    failures = report["failed_last_hour"]
    lines.append(f"failed in the last hour: {len(failures) if failures else 'none'}")
    if failures:
        rows = [
            [
                r["id"],
                r["lead_id"],
                r["attempts"],
                f"{r['failed_at']:%H:%M:%S %Z}",
                r["error"] or "",
            ]
            for r in failures
        ]
        lines.append(table(["request", "lead", "attempts", "at", "error"], rows, indent="  "))
    lines.extend(provider_limits.status_lines(report["provider"]))
    return "\n".join(lines)


def _lease(seconds: float | None) -> str:
    if seconds is None:
        return "none (the sweep recovers it)"
    return (
        f"expires in {duration(seconds)}" if seconds >= 0 else f"expired {duration(-seconds)} ago"
    )


# -- retry -----------------------------------------------------------------------------------


async def retry_command(settings: Settings, args: argparse.Namespace) -> int:
    ids = sorted(set(args.ids)) or None
    params = {"ids": ids, "since_seconds": args.since}
    async with connection(settings) as conn:
        try:
            retried = await fetchall(conn, queries.RETRY_FAILED, params)
        except errors.UniqueViolation:
            print("a lead got a new request meanwhile; nothing was retried, try again")
            return EXIT_FAILED
        left = [i for i in ids or [] if i not in {r["id"] for r in retried}]
        found = await fetchall(conn, queries.REQUEST_STATUSES, {"ids": left}) if left else []
    for row in retried:
        print(f"request {row['id']} (lead {row['lead_id']}) is pending again")
        print(f"  previous error: {row['last_error'] or '-'}")
        log.info(
            "request %d lead %d requeued by an operator",
            row["id"],
            row["lead_id"],
            extra=logs.request_fields(row["id"], row["lead_id"], 0, "requeued", None),
        )
    statuses = {row["id"]: row["status"] for row in found}
    for request_id in left:
        status = statuses.get(request_id)
        if status is None:
            reason = "no such request"
        elif status != "failed":
            reason = f"it is {status}; only failed requests are retried"
        else:
            reason = "its lead already has a pending or processing request"
        print(f"request {request_id} not retried: {reason}", file=sys.stderr)
    if not retried and not left:
        print("no failed requests to retry")
    return EXIT_FAILED if left else EXIT_OK


def parse_duration(text: str) -> float:
    """`90`, `90s`, `15m`, `2h`, `1d` -> seconds."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", text.lower())
    if not match:
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (try 90s, 15m, 2h or 1d)")
    unit = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[match.group(2)]
    return float(match.group(1)) * unit


# -- request ---------------------------------------------------------------------------------


async def request_command(settings: Settings, args: argparse.Namespace) -> int:
    async with connection(settings) as conn:
        if args.wait:
            # Before the insert, so the event cannot slip past between the two.
            await conn.execute(f"LISTEN {queries.EVENTS_CHANNEL}")
        try:
            request_id, status, new = await insert_request(conn, args.lead, args.telegram_id)
        except LookupError as exc:
            print(exc, file=sys.stderr)
            return EXIT_FAILED
        if new:
            print(f"request {request_id} created for lead {args.lead} ({status})")
        else:
            print(f"lead {args.lead} already has request {request_id} ({status}); using it")
        if not args.wait:
            return EXIT_OK
        row = await wait_for_request(conn, request_id, args.timeout)
    return report_outcome(row, args.timeout)


async def insert_request(
    conn: psycopg.AsyncConnection[Any], lead_id: int, telegram_id: int | None
) -> tuple[int, str, bool]:
    """Insert as the TMA does; on the one-active-request refusal, return the active request."""
    for _ in range(3):  # the active request may finish between the refusal and the read
        try:
            rows = await fetchall(
                conn, queries.INSERT_REQUEST, {"lead_id": lead_id, "telegram_id": telegram_id}
            )
        except errors.UniqueViolation:
            active = await fetchall(conn, queries.ACTIVE_REQUEST, {"lead_id": lead_id})
            if active:
                return active[0]["id"], active[0]["status"], False
            continue
        except errors.NotNullViolation:
            raise LookupError(f"lead {lead_id} has no telegram_id; pass --telegram-id") from None
        if not rows:
            raise LookupError(f"lead {lead_id} does not exist")
        row = rows[0]
        log.info(
            "request %d lead %d requested by an operator",
            row["id"],
            lead_id,
            extra=logs.request_fields(row["id"], lead_id, 0, "requested", None),
        )
        return row["id"], row["status"], True
    raise LookupError(f"lead {lead_id}: could not create or find an active request")


async def wait_for_request(
    conn: psycopg.AsyncConnection[Any], request_id: int, within: float
) -> dict[str, Any]:
    """Wait on `plan_request_events` until the request ends or `within` seconds pass."""
    deadline = anyio.current_time() + within
    row = await request_row(conn, request_id)
    while row["status"] not in TERMINAL:
        remaining = deadline - anyio.current_time()
        if remaining <= 0:
            break
        async for notify in conn.notifies(timeout=remaining):
            if event_id(notify.payload) == request_id:
                break
        row = await request_row(conn, request_id)
    return row


async def request_row(conn: psycopg.AsyncConnection[Any], request_id: int) -> dict[str, Any]:
    rows = await fetchall(conn, queries.REQUEST_ROW, {"id": request_id})
    if rows:
        return rows[0]
    # The lead was deleted and the request with it (ON DELETE CASCADE).
    return {
        "id": request_id,
        "status": "failed",
        "attempts": 0,
        "result": {"error": "The request no longer exists (its lead was deleted)."},
    }


def event_id(payload: str) -> int | None:
    try:
        return RequestEvent.model_validate_json(payload).id
    except ValidationError:
        return None  # someone else's payload on our channel: not ours to judge


def report_outcome(row: dict[str, Any], timeout: float) -> int:
    result = row["result"] or {}
    if row["status"] == "completed":
        plan = result.get("plan", [])
        print(f"request {row['id']} completed: {len(plan)} steps")
        print(plan_table(plan))
        return EXIT_OK
    if row["status"] == "failed":
        print(f"request {row['id']} failed after {row['attempts']} attempts: {result.get('error')}")
        return EXIT_FAILED
    print(
        f"request {row['id']} is still {row['status']} after {duration(timeout)}; is a worker "
        "running? (python -m planbus.listen)",
        file=sys.stderr,
    )
    return EXIT_TIMEOUT


def plan_table(plan: list[dict[str, Any]], indent: str = "") -> str:
    rows = []
    for step in plan:
        text = str(step.get("description") or "")
        if step.get("suggested_text"):
            text += f': "{step["suggested_text"]}"'
        rows.append([step.get("step_id"), step.get("delay_days"), step.get("action_type"), text])
    return table(["step", "day", "action", "text"], rows, indent=indent)


async def demo_command(settings: Settings, args: argparse.Namespace) -> int:
    from planbus.demo import run_demo  # the demo builds on this module's helpers

    return await run_demo(settings, args)


# -- output helpers --------------------------------------------------------------------------


def table(headers: list[str], rows: list[list[Any]], indent: str = "") -> str:
    """Left-aligned columns; the last column is free text, wrapped to the terminal's width."""
    cells = [headers, *[["-" if c is None else str(c) for c in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers) - 1)]
    left = len(indent) + sum(width + 2 for width in widths)
    room = max(30, shutil.get_terminal_size().columns - left - 1)
    lines = []
    for row in cells:
        padded = [cell.ljust(width) for cell, width in zip(row, widths, strict=False)]
        text = textwrap.wrap(row[-1], room) or [""]
        lines.append(indent + "  ".join([*padded, text[0]]).rstrip())
        lines.extend(" " * left + more for more in text[1:])
    return "\n".join(lines)


def duration(seconds: float) -> str:
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 90:
        return f"{seconds:.1f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _json_value(value: Any) -> Any:
    return value.isoformat() if isinstance(value, datetime) else str(value)


# -- the command line ------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--database-url",
        help="PostgreSQL to use (default: PLANBUS_DATABASE_URL, DATABASE_URL, else the embedded "
        "server in PLANBUS_DATA_DIR)",
    )
    common.add_argument("--log-format", choices=["text", "json"], default="text")
    common.add_argument("--log-level", default="WARNING")
    parser = argparse.ArgumentParser(
        prog="python -m planbus",
        description="Operate planbus: see the queue, retry failures, request and watch plans.",
        epilog="Exit codes: 0 done; 1 a request failed, an id was not retried or a lead does "
        "not exist; 2 bad usage or configuration; 3 timed out waiting. The worker itself is "
        "`python -m planbus.listen`.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    status = commands.add_parser(
        "status",
        parents=[common],
        help="counts by status, oldest pending, claims in progress, recent failures",
        description="Show counts by status, the oldest pending request, requests in "
        "processing with their lease and worker, and failures of the last hour.",
    )
    status.add_argument("--json", action="store_true", help="one JSON object, for machines")
    status.set_defaults(handler=status_command)

    retry = commands.add_parser(
        "retry",
        parents=[common],
        help="put failed requests back to pending",
        description="Put failed requests back to pending: due now, attempts reset, the previous "
        "error kept in last_error and result.previous_error. A running worker picks them up "
        "at once. Exits 1 when a given ID was not retried.",
    )
    retry.add_argument("ids", nargs="*", type=int, metavar="ID", help="request ids to retry")
    retry.add_argument("--failed", action="store_true", help="retry every failed request")
    retry.add_argument(
        "--since",
        type=parse_duration,
        metavar="DURATION",
        help="with --failed: only those that failed within DURATION (e.g. 30m, 2h, 1d)",
    )
    retry.set_defaults(handler=retry_command)

    request = commands.add_parser(
        "request",
        parents=[common],
        help="request a plan for a lead, as the Mini App does",
        description="Insert a plan request for a lead as the Mini App does. If the lead already "
        "has a pending or processing request, use that one. With --wait, print the plan "
        "(exit 0), the error (exit 1), or give up after --timeout (exit 3).",
    )
    request.add_argument("--lead", type=int, required=True, metavar="ID")
    request.add_argument(
        "--telegram-id", type=int, metavar="ID", help="requesting user (default: the lead's)"
    )
    request.add_argument("--wait", action="store_true", help="wait for the outcome")
    request.add_argument("--timeout", type=float, default=60.0, metavar="SECONDS")
    request.set_defaults(handler=request_command)

    demo = commands.add_parser(
        "demo",
        parents=[common],
        help="plan three sample leads on the embedded database",
        description="Start the embedded PostgreSQL (or use an explicit --database-url; the "
        "environment's is ignored), add three sample leads, request their plans, run a worker "
        "in this process until they are done, and print the plans.",
    )
    demo.add_argument("--timeout", type=float, default=120.0, metavar="SECONDS")
    demo.set_defaults(handler=demo_command)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    if args.command == "retry" and bool(args.ids) == args.failed:
        parser.error("retry: give request IDs or --failed (not both)")
    if args.command == "retry" and args.since is not None and not args.failed:
        parser.error("retry: --since goes with --failed")
    # Under a host that set up logging already (pytest, an embedding program) leave it be.
    if not logging.getLogger().handlers:
        logs.configure(args.log_format, args.log_level)
    handler: Handler = args.handler
    try:
        settings = load_settings({"database_url": args.database_url})
        return anyio.run(handler, settings, args)
    except ConfigurationError as exc:
        print(f"planbus: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except Exception as exc:
        if not _broken_pipe(exc):
            raise
        # The reader went away (`status | head`): exit as a process killed by SIGPIPE would,
        # without a traceback, and keep Python from failing again on the final flush.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_BROKEN_PIPE


def _broken_pipe(exc: BaseException) -> bool:
    if isinstance(exc, BaseExceptionGroup):  # raised inside the demo's task group
        return all(_broken_pipe(inner) for inner in exc.exceptions)
    return isinstance(exc, BrokenPipeError)
