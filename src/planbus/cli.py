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
import sys
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import anyio
from psycopg import errors

from planbus import client, console, demo, embedded_command, logs, provider_limits, queries
from planbus.client import connection, fetchall
from planbus.errors import ConfigurationError
from planbus.settings import OneLineParser, Settings, load_settings

log = logging.getLogger("planbus.cli")

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_TIMEOUT = 0, 1, 2, 3
EXIT_BROKEN_PIPE = 128 + 13  # as a shell reports a process ended by SIGPIPE
STATUSES = ("pending", "processing", "completed", "failed")
LIST_LIMIT = 50

Handler = Callable[[Settings, argparse.Namespace], Awaitable[int]]


# -- status ----------------------------------------------------------------------------------


async def status_command(settings: Settings, args: argparse.Namespace) -> int:
    async with connection(settings) as conn:
        counts = {status: 0 for status in STATUSES}
        for row in await fetchall(conn, queries.STATUS_COUNTS):
            counts[row["status"]] = row["count"]
        oldest = await fetchall(conn, queries.STATUS_OLDEST_PENDING)
        provider = await provider_limits.status_report(conn)
        report = {
            "counts": counts,
            "oldest_pending": oldest[0] if oldest else None,
            "processing": await fetchall(conn, queries.STATUS_PROCESSING, {"limit": LIST_LIMIT}),
            "failed_last_hour": await fetchall(
                conn, queries.STATUS_RECENT_FAILURES, {"limit": LIST_LIMIT}
            ),
            "provider": provider,
        }
    if args.json:
        print(json.dumps(report, indent=2, default=console.json_value))
    else:
        print(console.format_status(report))
        print("\n".join(provider_limits.status_lines(provider)))
    return EXIT_OK


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
            await client.listen_events(conn)
        try:
            request_id, status, new = await client.insert_request(conn, args.lead, args.telegram_id)
        except LookupError as exc:
            print(exc, file=sys.stderr)
            return EXIT_FAILED
        if new:
            print(f"request {request_id} created for lead {args.lead} ({status})")
        else:
            print(f"lead {args.lead} already has request {request_id} ({status}); using it")
        if not args.wait:
            return EXIT_OK
        row = await client.wait_for_request(conn, request_id, args.timeout)
    return report_outcome(row, args.timeout)


def report_outcome(row: dict[str, Any], timeout: float) -> int:
    result = row["result"] or {}
    if row["status"] == "completed":
        plan = result.get("plan", [])
        print(f"request {row['id']} completed: {len(plan)} steps")
        print(console.plan_table(plan))
        return EXIT_OK
    if row["status"] == "failed":
        print(f"request {row['id']} failed after {row['attempts']} attempts: {result.get('error')}")
        return EXIT_FAILED
    print(
        f"request {row['id']} is still {row['status']} after {console.duration(timeout)}; "
        "is a worker running? (python -m planbus.listen)",
        file=sys.stderr,
    )
    return EXIT_TIMEOUT


async def demo_command(settings: Settings, args: argparse.Namespace) -> int:
    return EXIT_OK if await demo.run_demo(settings, args) else EXIT_FAILED


# -- the command line ------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--database-url",
        help="PostgreSQL to use (default: PLANBUS_DATABASE_URL, DATABASE_URL, else the embedded "
        "server in PLANBUS_DATA_DIR)",
    )
    logs.add_flags(common, default_level="WARNING")
    parser: argparse.ArgumentParser = OneLineParser(
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
    embedded_command.add_command(commands)
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
