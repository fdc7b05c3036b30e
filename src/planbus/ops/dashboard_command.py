"""`python -m planbus dashboard`: its flags, and its handler, which imports the dashboard.

The dashboard itself is `planbus.ops.dashboard`; its packages (Starlette, uvicorn, Jinja2) are
the optional `dashboard` extra, imported only when the command runs.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

from planbus.errors import ConfigurationError
from planbus.settings import Settings


def port_number(text: str) -> int:
    """A TCP port, 0 to 65535 (0: any free port)."""
    if not text.strip().isdigit() or int(text) > 65535:
        raise argparse.ArgumentTypeError(f"not a port: {text!r} (0 to 65535)")
    return int(text)


def add_command(add: Callable[..., argparse.ArgumentParser]) -> None:
    """The `dashboard` subcommand; `add` is the operator commands' (cli.Subcommands.add)."""
    dashboard = add(
        "dashboard",
        "a live web page: the queue, the provider, the workers, Retry and Cancel",
        "Serve a web page for operators, refreshed about every second without a reload: "
        "requests by status, recent requests, the steps of a request being planned, the LLM "
        "provider's state, live workers, completed and failed per minute over the last hour, "
        "and Retry and Cancel buttons that do what those commands do. It listens on loopback "
        "unless PLANBUS_DASHBOARD_TOKEN is set; with the token every page and action needs "
        "it. Needs the optional packages: pip install 'planbus[dashboard]'.",
        "dashboard",
        "dashboard --port 8080",
        "dashboard --host 0.0.0.0   # with PLANBUS_DASHBOARD_TOKEN set",
    )
    dashboard.add_argument(
        "--host",
        metavar="ADDRESS",
        help="address to listen on (default: 127.0.0.1; env: PLANBUS_DASHBOARD_HOST); any "
        "other than loopback needs PLANBUS_DASHBOARD_TOKEN",
    )
    dashboard.add_argument(
        "--port",
        type=port_number,
        metavar="PORT",
        help="port to listen on (default: 8787; env: PLANBUS_DASHBOARD_PORT; 0: any free port)",
    )
    dashboard.set_defaults(handler=dashboard_command)


async def dashboard_command(settings: Settings, args: argparse.Namespace) -> int:
    """The web page (ops/dashboard/); its packages are an optional extra, imported only here."""
    try:
        from planbus.ops.dashboard import server
    except ImportError as exc:
        raise ConfigurationError(
            f"the dashboard needs its optional packages ({exc.name} is not installed): "
            "pip install 'planbus[dashboard]'"
        ) from None
    return await server.run(settings)
