"""One reading of the database per refresh, rendered once, shared by every open page.

The feed runs `queries.SNAPSHOT` every `interval` seconds while at least one page listens (and
once more whenever a page loads on a stale reading or an action changed a row), renders the
sections once, and hands the same bytes to every event stream. Twenty open pages cost the
database what one does; no page open, nothing is read at all.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import anyio
import psycopg
from anyio.abc import TaskStatus
from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool

from planbus.errors import one_line
from planbus.ops.dashboard import queries

log = logging.getLogger(__name__)


class Stopping(Exception):
    """The feed closed while a page waited for it."""


Render = Callable[[dict[str, Any]], dict[str, str]]


@dataclass(frozen=True)
class Snapshot:
    """The page's sections at one moment, and the event that carries them."""

    version: int
    taken: float  # anyio.current_time() when the reading ended
    data: dict[str, Any]
    sections: dict[str, str]  # section id -> its HTML
    error: str | None = None
    message: bytes = field(default=b"", repr=False)  # the server-sent event, built once


async def read(pool: AsyncConnectionPool) -> dict[str, Any]:
    """Every section's rows, in one statement."""
    async with pool.connection() as conn:
        cursor = conn.cursor(row_factory=dict_row)
        await cursor.execute(queries.SNAPSHOT)
        row = await cursor.fetchone()
    assert row is not None, "SNAPSHOT returns one row"
    return dict(row)


class Feed:
    """The shared refresher; `run()` in a task, then `current()` and `updates()` per page."""

    def __init__(self, pool: AsyncConnectionPool, render: Render, interval: float) -> None:
        self.pool = pool
        self.render = render
        self.interval = interval
        self.latest: Snapshot | None = None
        self.readings = 0  # statements sent, for the benchmark and the tests
        self._listeners = 0  # open event streams
        self._waiting = 0  # page loads waiting for a fresh reading
        self._wake = anyio.Event()  # set: read now
        self._published = anyio.Event()  # set (and replaced) at each new snapshot
        self._closed = False

    @property
    def listeners(self) -> int:
        """Event streams open now."""
        return self._listeners

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Read while someone listens or waits, every `interval`, sooner when poked."""
        task_status.started()
        while not self._closed:
            if not (self._listeners or self._waiting):
                await self._wake.wait()
            self._wake = anyio.Event()
            # One reading per `interval`, counted from its start: a slow reading (a busy
            # database) shortens the wait instead of adding to the page's age.
            next_reading = anyio.current_time() + self.interval
            self._publish(await self._take())
            with anyio.move_on_after(max(0.0, next_reading - anyio.current_time())):
                await self._wake.wait()

    def poke(self) -> None:
        """Read again now (an action changed a row)."""
        self._wake.set()

    def close(self) -> None:
        """End every event stream (the server is stopping)."""
        self._closed = True
        self._wake.set()
        self._published.set()

    async def current(self, max_age: float) -> Snapshot:
        """The latest snapshot if younger than `max_age`, else a new one."""
        latest = self.latest
        if latest is not None and anyio.current_time() - latest.taken < max_age:
            return latest
        self._waiting += 1
        try:
            self._wake.set()
            snapshot = await self._after(latest.version if latest else 0)
        finally:
            self._waiting -= 1
        if snapshot is None:
            raise Stopping("the dashboard is stopping")
        return snapshot

    async def updates(self) -> AsyncIterator[Snapshot]:
        """Each new snapshot from now on, until the feed closes."""
        self._listeners += 1
        if self._listeners == 1:
            self._wake.set()  # the first page: start reading (the others share its readings)
        seen = self.latest.version if self.latest else 0
        try:
            while True:
                snapshot = await self._after(seen)
                if snapshot is None:
                    return
                seen = snapshot.version
                yield snapshot
        finally:
            self._listeners -= 1

    async def _after(self, version: int) -> Snapshot | None:
        """The first snapshot newer than `version`; None once the feed is closed."""
        while not self._closed:
            published = self._published  # taken before the check: no wake-up slips between
            if self.latest is not None and self.latest.version > version:
                return self.latest
            await published.wait()
        return None

    async def _take(self) -> Snapshot:
        version = (self.latest.version if self.latest else 0) + 1
        self.readings += 1
        try:
            data = await read(self.pool)
        except (psycopg.Error, OSError) as exc:
            # Keep what the page shows and say why it is not moving; read again next time.
            error = f"cannot read the database: {one_line(exc)}"
            log.warning("dashboard: %s", error)
            data = self.latest.data if self.latest else {}
            sections = self.latest.sections if self.latest else {}
            return _snapshot(version, data, sections, error)
        return _snapshot(version, data, self.render(data), None)

    def _publish(self, snapshot: Snapshot) -> None:
        self.latest = snapshot
        published, self._published = self._published, anyio.Event()
        published.set()


def _snapshot(
    version: int, data: dict[str, Any], sections: dict[str, str], error: str | None
) -> Snapshot:
    payload = {"now": data.get("now"), "sections": sections, "error": error}
    # json.dumps escapes every line break, so the event is one `data:` line.
    message = b"data: " + json.dumps(payload).encode() + b"\n\n"
    return Snapshot(version, anyio.current_time(), data, sections, error, message)
