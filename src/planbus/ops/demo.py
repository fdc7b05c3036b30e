"""`python -m planbus demo`: three sample leads planned on the embedded database, live.

The sample leads are made once and reused by every later run.
"""

from __future__ import annotations

import argparse
import sys
from contextlib import AsyncExitStack
from typing import Any

import anyio
import psycopg

from planbus import runtime
from planbus.bus.worker import Worker
from planbus.ops import admin_queries, client, console
from planbus.settings import Settings

DEMO_TELEGRAM_ID = 1000
DEMO_LEADS = [
    {
        "name": "Ada Lovelace",
        "title": "Head of Research",
        "company": "Analytical Engines",
        "analysis": "Publishes long technical notes; values precise, concrete questions.",
        "strategy": "Engage with her notes first, then propose a short technical exchange.",
    },
    {
        "name": "Grace Hopper",
        "title": "Director of Engineering",
        "company": "Compiler Works",
        "analysis": "Champions developer productivity; speaks at many meetups.",
        "strategy": "Reference her talk on tooling and offer a productivity benchmark.",
    },
    {
        "name": "Katherine Johnson",
        "title": "VP Flight Analytics",
        "company": "Orbital Data",
        "analysis": "Data-driven buyer; wants numbers before a meeting.",
        "strategy": "Lead with a relevant metric, then ask for twenty minutes.",
    },
]


async def run_demo(settings: Settings, args: argparse.Namespace) -> bool:
    """Plan the sample leads; True when every one completed."""
    # Sample leads belong on the embedded server, never on a database named by the environment:
    # only an explicit --database-url points the demo elsewhere.
    settings = settings.model_copy(update={"database_url": args.database_url})
    async with AsyncExitStack() as stack:
        dsn = await stack.enter_async_context(client.database(settings))
        conn = await stack.enter_async_context(await client.connect(dsn))
        print(f"database: {console.clean(await client.describe(conn, settings))}")
        print(f"planner: {settings.resolved_planner}")
        worker_settings = settings.model_copy(
            update={"database_url": dsn, "work_database_url": None}
        )
        worker = await stack.enter_async_context(runtime.open_worker(worker_settings))
        await client.listen_events(conn)
        async with anyio.create_task_group() as tg:
            await tg.start(worker.run)
            ids = [await _demo_request(conn, lead) for lead in DEMO_LEADS]
            await _progress(conn, worker, ids, args.timeout)
            worker.stop()
        rows = [await client.request_row(conn, i) for i in ids]
    print()
    for lead, row in zip(DEMO_LEADS, rows, strict=True):
        result = row["result"] or {}
        print(f"{lead['name']}, {lead['title']} at {lead['company']} (request {row['id']}):")
        if row["status"] == "completed":
            print(console.plan_table(result.get("plan", []), indent="  "))
        else:
            error = console.clean(result.get("error", "did not finish in time"))
            print(f"  {row['status']}: {error}")
        print()
    if args.database_url is None:
        print("Next: `python -m planbus.listen` runs a worker on this database; then")
        print(f"`python -m planbus request --lead {rows[0]['lead_id']} --wait` asks it for a plan.")
    return all(row["status"] == "completed" for row in rows)


async def _demo_request(conn: psycopg.AsyncConnection[Any], lead: dict[str, str]) -> int:
    (row,) = await client.fetchall(
        conn, admin_queries.DEMO_LEAD, {"telegram_id": DEMO_TELEGRAM_ID, **lead}
    )
    request_id, _, _ = await client.insert_request(conn, row["id"], None)
    return request_id


async def _progress(
    conn: psycopg.AsyncConnection[Any], worker: Worker, ids: list[int], within: float
) -> None:
    """A live progress line, redrawn on every finished request and every tenth of a second."""
    live = sys.stdout.isatty()
    started = anyio.current_time()
    done: set[int] = set()
    shown = ""
    while len(done) < len(ids) and anyio.current_time() - started < within:
        async for notify in conn.notifies(timeout=0.1):
            event_id = client.event_id(notify.payload)
            if event_id in ids:
                done.add(event_id)
        running = len(set(ids) & set(worker.inflight) - done)
        counts = f"{len(done)}/{len(ids)} done, {running} planning, "
        counts += f"{len(ids) - len(done) - running} waiting"
        if live:
            elapsed = anyio.current_time() - started
            print(f"\rplanning: {counts} ({elapsed:.1f} s)  ", end="", flush=True)
        elif counts != shown:
            print(f"planning: {counts}", flush=True)
        shown = counts
    if live:
        print()
