"""`python -m planbus` (also the `planbus` command): the flags, the help, and the exit codes.

The commands themselves are in commands.py; the worker is `python -m planbus.listen`.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import anyio

from planbus import __version__, logs
from planbus.errors import ConfigurationError
from planbus.ops import actions, commands, console, dashboard_command, embedded_command
from planbus.ops.commands import EXIT_OK, EXIT_USAGE
from planbus.settings import OneLineParser, Settings, load_settings

EXIT_BROKEN_PIPE = 128 + 13  # as a shell reports a process ended by SIGPIPE
EXIT_INTERRUPTED = 128 + 2  # Ctrl-C, as a shell reports SIGINT

Handler = Callable[[Settings, argparse.Namespace], Awaitable[int]]

DATABASE_HELP = (
    "PostgreSQL to use, as a URL or conninfo string (default: PLANBUS_DATABASE_URL, else "
    "DATABASE_URL, else the embedded server in PLANBUS_DATA_DIR)"
)
EPILOG = """Every command prints the database it uses first (host:port/dbname, or the embedded
server's data folder); passwords are never shown.

Exit codes: 0 done; 1 not done (a request failed, an id was not retried or cancelled, a request
or lead does not exist); 2 bad usage or configuration (flags, URL, database unreachable or not
migrated); 3 `request --wait` timed out. The worker itself is `python -m planbus.listen`;
docs/operations.md describes every command.

examples:
  python -m planbus status --watch
  python -m planbus show 42
  python -m planbus retry --failed --since 2h
  python -m planbus migrate"""


# Every argument is checked here, so that a value the database cannot hold (an id past bigint,
# an interval past its range) is one line and exit 2 before anything is read or changed.
BIGINT_MAX = 2**63 - 1  # ids and telegram_id are bigint
MAX_DURATION_DAYS = 36500  # a century: any retention or window an operator means
MAX_SECONDS = 30 * 86400  # --watch, --timeout: a month of waiting at most


def parse_duration(text: str) -> float:
    """`90`, `90s`, `15m`, `2h`, `1d` -> seconds, at most MAX_DURATION_DAYS."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", text.lower())
    if not match:
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (try 90s, 15m, 2h or 1d)")
    unit = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[match.group(2)]
    seconds = float(match.group(1)) * unit
    if seconds > MAX_DURATION_DAYS * 86400:
        raise argparse.ArgumentTypeError(
            f"duration {text.strip()!r} is too long (at most {MAX_DURATION_DAYS}d)"
        )
    return seconds


def parse_id(text: str) -> int:
    """A request's or lead's id: a whole number from 1 to bigint's largest."""
    return _whole_number(text, "an id", 1)


def parse_telegram_id(text: str) -> int:
    """A Telegram id: any bigint (a group chat's is negative)."""
    return _whole_number(text, "a telegram id", -BIGINT_MAX - 1)


def _whole_number(text: str, what: str, lowest: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not {what}: {text!r} (a whole number)") from None
    if not lowest <= value <= BIGINT_MAX:
        raise argparse.ArgumentTypeError(
            f"{what} out of range: {text.strip()} (from {lowest} to {BIGINT_MAX})"
        )
    return value


def parse_seconds(text: str) -> float:
    """A wait in seconds: more than 0, at most MAX_SECONDS (no nan, no inf)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not 0 < value <= MAX_SECONDS:  # false for nan too
        raise argparse.ArgumentTypeError(
            f"seconds out of range: {text.strip()} (more than 0, at most {MAX_SECONDS})"
        )
    return value


class Subcommands:
    """Adds one subcommand with its description, examples and the flags every command takes."""

    def __init__(self, parser: argparse.ArgumentParser) -> None:
        self.actions = parser.add_subparsers(dest="command", metavar="COMMAND")
        self.common = argparse.ArgumentParser(add_help=False)
        logs.add_flags(self.common, default_level="WARNING")

    def add(
        self,
        name: str,
        summary: str,
        description: str,
        *examples: str,
        database_help: str = DATABASE_HELP,
    ) -> argparse.ArgumentParser:
        sub: argparse.ArgumentParser = self.actions.add_parser(
            name,
            parents=[self.common],
            help=summary,
            description=description,
            epilog="examples:\n" + "\n".join(f"  python -m planbus {e}" for e in examples),
            formatter_class=console.HelpFormatter,
        )
        sub.add_argument("--database-url", metavar="URL", help=database_help)
        return sub


def build_parser() -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = OneLineParser(
        prog="python -m planbus",
        description="Operate planbus: see the queue and one request's story, retry, cancel and "
        "purge requests, request and watch plans, migrate the database, try a demo.",
        epilog=EPILOG,
        formatter_class=console.HelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"planbus {__version__}")
    subcommands = Subcommands(parser)
    for add in (_status, _show, _retry, _cancel, _purge, _request, _migrate, _demo):
        add(subcommands)
    dashboard_command.add_command(subcommands.add)
    embedded_command.add_command(subcommands.actions)
    return parser


def _status(subcommands: Subcommands) -> None:
    status = subcommands.add(
        "status",
        "counts by status, oldest pending, claims in progress, recent failures",
        "Show the database used, counts by status, the oldest pending request, requests in "
        "processing with their lease and worker, and failures of the last hour.",
        "status",
        "status --json | jq .counts",
        "status --watch 5",
    )
    status.add_argument("--json", action="store_true", help="one JSON object, for machines")
    status.add_argument(
        "--watch",
        type=parse_seconds,
        nargs="?",
        const=2.0,
        metavar="SECONDS",
        help="show it again every SECONDS (default: 2) until Ctrl-C",
    )
    status.set_defaults(handler=commands.status_command)


def _show(subcommands: Subcommands) -> None:
    show = subcommands.add(
        "show",
        "one request's whole story",
        "Show one request: status, attempts, errors (result.error, last_error, and the "
        "previous error of a retried request), worker, timings (created, run after, claimed, "
        "finished), its plan and the reminders it scheduled. Exits 1 when there is no such "
        "request.",
        "show 42",
        "show 42 --json",
    )
    show.add_argument("id", type=parse_id, metavar="ID", help="the request's id")
    show.add_argument("--json", action="store_true", help="one JSON object, for machines")
    show.set_defaults(handler=commands.show_command)


def _retry(subcommands: Subcommands) -> None:
    retry = subcommands.add(
        "retry",
        "put failed requests back to pending",
        "Put failed requests back to pending: due now, attempts reset, the previous error "
        "kept in last_error and result.previous_error (and still shown by `show` after the "
        "retry succeeds). A running worker picks them up at once. Exits 1 when a given ID was "
        "not retried.",
        "retry 17 18",
        "retry --failed",
        "retry --failed --since 2h",
    )
    retry.add_argument("ids", nargs="*", type=parse_id, metavar="ID", help="request ids to retry")
    retry.add_argument("--failed", action="store_true", help="retry every failed request")
    retry.add_argument(
        "--since",
        type=parse_duration,
        metavar="DURATION",
        help="with --failed: only those that failed within DURATION, e.g. 30m, 2h, 1d "
        "(default: all)",
    )
    retry.set_defaults(handler=commands.retry_command)


def _cancel(subcommands: Subcommands) -> None:
    cancel = subcommands.add(
        "cancel",
        "fail pending requests on purpose",
        "Mark pending requests failed, with the error "
        f'"{actions.CANCELLED_ERROR}", and send the plan_request_events event as for any '
        "failure. A request a worker has already claimed is left to it. Exits 1 when a given "
        "ID was not cancelled.",
        "cancel 42",
        "cancel 42 43 44",
    )
    cancel.add_argument("ids", nargs="+", type=parse_id, metavar="ID", help="request ids to cancel")
    cancel.set_defaults(handler=commands.cancel_command)


def _purge(subcommands: Subcommands) -> None:
    purge = subcommands.add(
        "purge",
        "delete finished requests older than a retention",
        "Delete completed and failed requests that finished more than DURATION ago, in "
        "batches. Pending and processing requests, leads and reminders are never touched. Run "
        "it from cron to keep plan_requests small, e.g. daily with --older-than 30d.",
        "purge --older-than 30d",
        "purge --older-than 12h --dry-run",
    )
    purge.add_argument(
        "--older-than",
        type=parse_duration,
        required=True,
        metavar="DURATION",
        help="retention: requests finished before now minus DURATION go (e.g. 30d, 12h); "
        "required, there is no default",
    )
    purge.add_argument("--dry-run", action="store_true", help="only count what would be deleted")
    purge.set_defaults(handler=commands.purge_command)


def _request(subcommands: Subcommands) -> None:
    request = subcommands.add(
        "request",
        "request a plan for a lead, as the Mini App does",
        "Insert a plan request for a lead as the Mini App does. If the lead already has a "
        "pending or processing request, use that one. With --wait, show each change of status "
        "(pending, processing, pending again after a failed attempt) and then the plan (exit "
        "0), the error (exit 1), or give up after --timeout (exit 3).",
        "request --lead 7",
        "request --lead 7 --wait",
        "request --lead 7 --telegram-id 123456 --wait --timeout 300",
    )
    request.add_argument("--lead", type=parse_id, required=True, metavar="ID", help="the lead's id")
    request.add_argument(
        "--telegram-id",
        type=parse_telegram_id,
        metavar="ID",
        help="requesting user (default: the lead's)",
    )
    request.add_argument("--wait", action="store_true", help="follow the request to its end")
    request.add_argument(
        "--timeout",
        type=parse_seconds,
        default=60.0,
        metavar="SECONDS",
        help="with --wait: how long to wait (default: 60)",
    )
    request.set_defaults(handler=commands.request_command)


def _migrate(subcommands: Subcommands) -> None:
    migrate = subcommands.add(
        "migrate",
        "apply the database migrations (alembic upgrade), from any folder",
        "Apply the same alembic revisions as `alembic upgrade head` from the checkout, from "
        "any folder and from an installed wheel (the revisions ship inside the package), and "
        "say which were applied. A revision behind the database's is refused: downgrades are "
        "`alembic downgrade` from the checkout.",
        "migrate",
        "migrate --to 0003_event_payload",
        "migrate --database-url postgresql://planbus@db.internal:5432/app",
    )
    migrate.add_argument(
        "--to", default="head", metavar="REV", help="the revision to reach (default: head)"
    )
    migrate.set_defaults(handler=commands.migrate_command)


def _demo(subcommands: Subcommands) -> None:
    demo = subcommands.add(
        "demo",
        "plan three sample leads on the embedded database",
        "Run on the embedded PostgreSQL in PLANBUS_DATA_DIR (default .planbus/postgres), "
        "never on the database PLANBUS_DATABASE_URL or DATABASE_URL names: sample leads do "
        "not belong in a real database. Only an explicit --database-url points it elsewhere. "
        "It adds three sample leads (once: later runs reuse them), requests their plans, runs "
        "a worker in this process until they are done, and prints the plans.",
        "demo",
        "demo --timeout 300",
        database_help="PostgreSQL to use instead of the embedded server (the environment's "
        "database URL is ignored)",
    )
    demo.add_argument(
        "--timeout",
        type=parse_seconds,
        default=120.0,
        metavar="SECONDS",
        help="how long the plans may take (default: 120)",
    )
    demo.set_defaults(handler=commands.demo_command)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    if args.command == "retry" and args.since is not None and not args.failed:
        parser.error(
            "retry: --since chooses among all failed requests, so it needs --failed "
            "(e.g. retry --failed --since 2h); IDs are retried whenever they failed"
        )
    if args.command == "retry" and bool(args.ids) == args.failed:
        parser.error("retry: give request IDs or --failed (not both)")
    # Under a host that set up logging already (pytest, an embedding program) leave it be.
    if not logging.getLogger().handlers:
        logs.configure(args.log_format, args.log_level)
    handler: Handler = args.handler
    try:
        settings = load_settings(_overrides(args))
        return anyio.run(handler, settings, args)
    except ConfigurationError as exc:
        print(f"planbus: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        # Ctrl-C is how `status --watch` ends: a normal stop, not a failure.
        watching = args.command == "status" and args.watch is not None
        return EXIT_OK if watching else EXIT_INTERRUPTED
    except Exception as exc:
        if not _broken_pipe(exc):
            raise
        # The reader went away (`status | head`): exit as a process killed by SIGPIPE would,
        # without a traceback, and keep Python from failing again on the final flush.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_BROKEN_PIPE


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The settings the command's flags give; a flag not given leaves its variable in charge."""
    overrides: dict[str, Any] = {"database_url": args.database_url}
    if args.command == "dashboard":
        given = {"dashboard_host": args.host, "dashboard_port": args.port}
        overrides.update({name: value for name, value in given.items() if value is not None})
    return overrides


def _broken_pipe(exc: BaseException) -> bool:
    if isinstance(exc, BaseExceptionGroup):  # raised inside the demo's task group
        return all(_broken_pipe(inner) for inner in exc.exceptions)
    return isinstance(exc, BrokenPipeError)
