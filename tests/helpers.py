"""Test helpers that read like the contract: insert leads and requests, run a worker, wait."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import anyio
import psycopg
import pytest
from psycopg import sql
from psycopg.rows import dict_row

from planbus import runtime
from planbus.bus.worker import Worker
from planbus.llm.planner import Planner
from planbus.settings import load_settings

TERMINAL = ("completed", "failed")


class Database:
    """An autocommit connection to the test's database, with the contract's vocabulary."""

    def __init__(self, conn: psycopg.AsyncConnection[Any], url: str) -> None:
        self.conn = conn
        self.url = url

    async def reconnect(self) -> None:
        """Replace the connection, e.g. after the server restarted."""
        await self.conn.close()
        self.conn = await psycopg.AsyncConnection.connect(self.url, autocommit=True)

    async def fetchall(self, query: Any, params: Any = None) -> list[dict[str, Any]]:
        cursor = self.conn.cursor(row_factory=dict_row)
        await cursor.execute(query, params)
        return await cursor.fetchall()

    async def fetchone(self, query: Any, params: Any = None) -> dict[str, Any] | None:
        rows = await self.fetchall(query, params)
        return rows[0] if rows else None

    async def value(self, query: Any, params: Any = None) -> Any:
        cursor = await self.conn.execute(query, params)
        row = await cursor.fetchone()
        return None if row is None else row[0]

    async def insert_lead(self, telegram_id: int = 42, **fields: Any) -> int:
        values = {
            "telegram_id": telegram_id,
            "prospect_name": "Ada Lovelace",
            "prospect_company": "Analytical Engines",
            **fields,
        }
        columns = ", ".join(values)
        placeholders = ", ".join(f"%({name})s" for name in values)
        return int(
            await self.value(
                f"INSERT INTO lead_registry ({columns}) VALUES ({placeholders}) RETURNING id",
                values,
            )
        )

    async def insert_request(self, lead_id: int, telegram_id: int = 42) -> int:
        return int(
            await self.value(
                "INSERT INTO plan_requests (lead_id, telegram_id) VALUES (%s, %s) RETURNING id",
                (lead_id, telegram_id),
            )
        )

    async def request(self, request_id: int) -> dict[str, Any]:
        row = await self.fetchone("SELECT * FROM plan_requests WHERE id = %s", (request_id,))
        assert row is not None, f"request {request_id} does not exist"
        return row

    async def reminders(self, lead_id: int, status: str | None = None) -> list[dict[str, Any]]:
        rows = await self.fetchall(
            "SELECT * FROM scheduled_reminders WHERE lead_id = %s ORDER BY id", (lead_id,)
        )
        return [r for r in rows if status is None or r["status"] == status]

    async def wait_for(
        self, request_id: int, statuses: tuple[str, ...] = TERMINAL, within: float = 15.0
    ) -> dict[str, Any]:
        """Poll the request until its status is one of `statuses`, or fail at the deadline."""
        row: dict[str, Any] = await wait_until(
            lambda: self.request(request_id),
            lambda row: row["status"] in statuses,
            within,
            f"request {request_id} to become {'/'.join(statuses)}",
        )
        return row

    async def wait_all(
        self, request_ids: list[int], statuses: tuple[str, ...] = TERMINAL, within: float = 30.0
    ) -> list[dict[str, Any]]:
        async def rows() -> list[dict[str, Any]]:
            return await self.fetchall(
                "SELECT * FROM plan_requests WHERE id = ANY(%s) ORDER BY id", (request_ids,)
            )

        found: list[dict[str, Any]] = await wait_until(
            rows,
            lambda rs: all(r["status"] in statuses for r in rs),
            within,
            f"{len(request_ids)} requests to become {'/'.join(statuses)}",
        )
        return found


async def wait_until(
    fetch: Callable[[], Any], done: Callable[[Any], bool], within: float, what: str
) -> Any:
    """Poll `fetch()` until `done(value)`; fail with the last value at the deadline."""
    last = None
    with anyio.move_on_after(within):
        while True:
            last = await fetch()
            if done(last):
                return last
            await anyio.sleep(0.02)
    raise AssertionError(f"timed out after {within}s waiting for {what}; last seen: {last}")


async def eventually(predicate: Callable[[], bool], within: float, what: str) -> None:
    """Poll an in-process condition (e.g. a worker's state) until true, or fail."""
    with anyio.move_on_after(within):
        while True:
            if predicate():
                return
            await anyio.sleep(0.02)
    raise AssertionError(f"timed out after {within}s waiting for {what}")


class Events:
    """Collects `plan_request_events` payloads from a LISTEN connection of its own."""

    def __init__(self) -> None:
        self.received: list[dict[str, Any]] = []
        self._arrived = anyio.Event()

    async def wait_for(self, request_id: int, within: float = 15.0) -> dict[str, Any]:
        with anyio.move_on_after(within):
            while True:
                for event in self.received:
                    if event["id"] == request_id:
                        return event
                self._arrived = anyio.Event()
                await self._arrived.wait()
        raise AssertionError(f"no plan_request_events for request {request_id} in {within}s")

    def for_request(self, request_id: int) -> list[dict[str, Any]]:
        return [e for e in self.received if e["id"] == request_id]

    async def _run(self, url: str, *, task_status: Any) -> None:
        async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
            await conn.execute("LISTEN plan_request_events")
            task_status.started()
            async for notify in conn.notifies():
                self.received.append(json.loads(notify.payload))
                self._arrived.set()


@asynccontextmanager
async def listening_events(url: str) -> AsyncIterator[Events]:
    events = Events()
    async with anyio.create_task_group() as tg:
        await tg.start(events._run, url)
        yield events
        tg.cancel_scope.cancel()


@asynccontextmanager
async def running_worker(
    url: str, planner: Planner | str | None = None, **overrides: Any
) -> AsyncIterator[Worker]:
    """Run a real Worker (its own pool and LISTEN connection) until the block ends.

    `planner` is a Planner object, or a planner name (e.g. "openai") built from the settings
    the way `python -m planbus.listen` builds it, and closed afterwards.
    """
    from tests.conftest import settings_for

    if isinstance(planner, str):
        overrides["planner"], planner = planner, None
    settings = load_settings(settings_for(url, **overrides))
    async with (
        runtime.open_worker(settings, planner=planner, worker_id="test-worker") as worker,
        anyio.create_task_group() as tg,
    ):
        await tg.start(worker.run)
        try:
            yield worker
        finally:
            worker.stop()


@asynccontextmanager
async def acting_as(
    url: str, role: str, telegram_id: int | None = None, claims: dict[str, Any] | None = None
) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
    """One transaction as PostgREST runs a request: `SET LOCAL ROLE`, then the JWT's claims.

    The transaction commits when the block ends normally and rolls back on an exception.
    """
    if claims is None and telegram_id is not None:
        claims = {"telegram_id": telegram_id, "role": role}
    async with await psycopg.AsyncConnection.connect(url) as conn, conn.transaction():
        await conn.execute(sql.SQL("SET LOCAL ROLE {}").format(sql.Identifier(role)))
        if claims is not None:
            await conn.execute(
                "SELECT set_config('request.jwt.claims', %s, true)", (json.dumps(claims),)
            )
        yield conn


def figures_reporter(capsys: pytest.CaptureFixture[str], label: str) -> Callable[[str], None]:
    """Print a scenario's line of figures past pytest's capture, tagged `[label]`."""

    def emit(line: str) -> None:
        with capsys.disabled():
            print(f"\n[{label}] {line}", flush=True)

    return emit
