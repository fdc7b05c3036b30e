"""A real browser for the dashboard's tests: Debian's chromium driven by Playwright.

`playwright install` downloads a browser from the internet; these tests use the system's
chromium package instead (`.ci/run` installs it with apt-get). Where it is missing the tests
skip with a reason, except under CI (the `CI` variable set), where they fail.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

import anyio
import pytest

from planbus.ops.dashboard import server
from planbus.settings import load_settings

CHROMIUM = os.environ.get("CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
# No sandbox (the tests may run as root, in a container); nothing fetched in the background.
ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-sync",
]


def require_chromium() -> None:
    if os.path.exists(CHROMIUM):
        return
    message = f"no chromium at {CHROMIUM} (apt-get install chromium)"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


@asynccontextmanager
async def chromium() -> AsyncIterator[Any]:
    """A headless chromium, closed afterwards."""
    require_chromium()
    from playwright.async_api import async_playwright

    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            yield browser
        finally:
            await browser.close()


@asynccontextmanager
async def running_dashboard(database_url: str, **overrides: Any) -> AsyncIterator[server.Running]:
    """`python -m planbus dashboard` in this process, on a free port, until the block ends."""
    settings = load_settings(
        {"database_url": database_url, "dashboard_port": 0, **overrides}, environ={}
    )
    async with anyio.create_task_group() as tg:
        running: server.Running = await tg.start(partial(server.serve, settings))
        try:
            yield running
        finally:
            running.stop()
