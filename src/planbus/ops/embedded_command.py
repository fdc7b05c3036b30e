"""`python -m planbus embedded status|psql|stop`: see, query and stop the embedded server."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path
from typing import Any

import anyio

from planbus import logs
from planbus.ops import console
from planbus.ops.embedded import EmbeddedPostgres, ServerStatus
from planbus.settings import Settings

EXIT_OK, EXIT_IN_USE = 0, 1


def add_command(commands: argparse._SubParsersAction[Any]) -> None:
    """The `embedded` subcommand, on the operator commands' parser."""
    parser = commands.add_parser(
        "embedded",
        help="see, query or stop the embedded PostgreSQL",
        description="status: whether the embedded PostgreSQL runs, on which port, and which "
        "planbus processes use it. psql: run the psql that comes with it, connected to it "
        "(arguments after -- go to psql; the server is started for the while if it was not "
        "running). stop: stop it; the last process that uses it stops it anyway, so this is for "
        "a server left behind by a process that was killed.",
        epilog="examples:\n  python -m planbus embedded status\n"
        "  python -m planbus embedded psql -- -c 'SELECT count(*) FROM plan_requests'\n"
        "  python -m planbus embedded stop",
        formatter_class=console.HelpFormatter,
    )
    parser.add_argument("action", choices=["status", "psql", "stop"], help="what to do (see above)")
    parser.add_argument("psql_args", nargs="*", metavar="PSQL_ARG", help=argparse.SUPPRESS)
    parser.add_argument(
        "--data-dir",
        type=Path,
        metavar="DIR",
        help="its data folder (default: PLANBUS_DATA_DIR, else .planbus/postgres in the "
        "checkout, else $XDG_DATA_HOME/planbus/postgres)",
    )
    parser.add_argument(
        "--force", action="store_true", help="stop: even while planbus processes use it"
    )
    logs.add_flags(parser, default_level="WARNING")
    parser.set_defaults(handler=embedded_command, database_url=None)


async def embedded_command(settings: Settings, args: argparse.Namespace) -> int:
    server = EmbeddedPostgres(args.data_dir or settings.data_dir)
    if args.action == "psql":
        return await anyio.to_thread.run_sync(psql, server, args.psql_args)
    state = await anyio.to_thread.run_sync(server.status)
    if args.action == "status":
        print(describe(state))
        return EXIT_OK
    if state.port is None:
        print(f"embedded PostgreSQL in {state.data_dir}: not running")
        return EXIT_OK
    if state.users and not args.force:
        print(
            f"embedded PostgreSQL in {state.data_dir} is in use by pid {pids(state)}; stop "
            "those processes (the last one stops the server), or pass --force",
            file=sys.stderr,
        )
        return EXIT_IN_USE
    await anyio.to_thread.run_sync(server.force_stop)
    print(f"embedded PostgreSQL in {state.data_dir}: stopped")
    return EXIT_OK


def psql(server: EmbeddedPostgres, arguments: list[str]) -> int:
    """psql on the server's DSN, with this terminal's input and output; its exit status."""
    dsn = server.start()  # joins a running server; starts (and later stops) one that is not
    try:
        return subprocess.run(
            [str(server.program("psql")), dsn, *arguments], check=False
        ).returncode
    finally:
        server.stop()


def describe(state: ServerStatus) -> str:
    where = f"embedded PostgreSQL in {state.data_dir}"
    if not state.initialised:
        return f"{where}: no data folder yet (the first worker creates it)"
    if state.port is None:
        return f"{where}: not running"
    users = (
        f"used by pid {pids(state)}; the last of them stops it"
        if state.users
        else "used by no planbus process: stop it with `python -m planbus embedded stop`"
    )
    return "\n".join(
        [
            f"{where}: running (pid {state.pid}, port {state.port})",
            f"connect with: python -m planbus embedded psql, or psql '{state.dsn}'",
            f"by TCP (the password file is yours and root's only): psql '{state.tcp_dsn}'",
            users,
        ]
    )


def pids(state: ServerStatus) -> str:
    return ", ".join(str(pid) for pid in state.users)
