"""The soak: minutes of steady inserts while workers are killed, the LLM fails and PostgreSQL
restarts; at the end every request is terminal, every effect applied exactly once, nothing is
left `processing`, and the long-lived worker's memory has not grown.

    python -m benchmarks.soak --minutes 10

It starts its own embedded PostgreSQL in a temporary folder (so that it can restart it), the
tests' fake LLM server in a thread, and `python -m planbus.listen` worker processes: one that
lives through the whole run (its memory is the one measured) and others that are killed with
SIGKILL at random and replaced at once, as a supervisor would. Some LLM answers are errors
(500, 503, 429, invalid JSON, too slow). Halfway through, the database restarts.

It prints a progress line every 30 s, a line per kill and per restart, then the counts, the
recovery times, the checks and the workers' RSS; it exits 1 if a check failed.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import socket
import statistics
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import psycopg
from anyio.abc import TaskGroup
from psycopg import sql
from psycopg.rows import dict_row

from planbus.ops import migrate
from planbus.ops.embedded import EmbeddedPostgres
from tests.llm_server import FakeLLM, Reply
from tests.processes import Fleet, WorkerProcess

WORKER_FLAGS = ("--lease-seconds", "2", "--sweep-seconds", "1", "--concurrency", "16")
WORKER_ENV = {
    "PLANBUS_RETRY_BASE_SECONDS": "0.2",
    "PLANBUS_RETRY_MAX_SECONDS": "2",
    "PLANBUS_LLM_TIMEOUT_SECONDS": "3",
}
SLOW = 4.0  # seconds: longer than the workers' LLM timeout


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0, help="length of the insert phase")
    parser.add_argument("--rate", type=float, default=5.0, help="requests inserted per second")
    parser.add_argument("--workers", type=int, default=3, help="worker processes (>= 2)")
    parser.add_argument("--kill-every", type=float, default=20.0, help="mean seconds between kills")
    parser.add_argument("--error-rate", type=float, default=0.05, help="LLM answers that fail")
    parser.add_argument("--llm-delay", type=float, default=1.0, help="seconds per LLM answer")
    parser.add_argument("--rerequest", type=float, default=0.1, help="inserts for an old lead")
    parser.add_argument("--restart-at", type=float, default=0.5, help="fraction of the run")
    parser.add_argument("--restart-mode", choices=["fast", "immediate"], default="fast")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--log-dir", type=Path, default=None, help="keep worker logs here")
    args = parser.parse_args(argv)
    if args.workers < 2:
        parser.error("--workers must be at least 2: one to measure, one to kill")
    return args


@dataclass
class Kill:
    at: float
    pid: int
    inflight: list[int]
    recovered: float | None = None  # seconds until no claim of the dead worker was left
    finished: float | None = None  # seconds until all its requests were terminal


@dataclass
class Soak:
    args: argparse.Namespace
    dsn: str
    llm: FakeLLM
    fleet: Fleet
    steady: WorkerProcess | None = None
    killable: list[WorkerProcess] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)
    inserted: int = 0
    rerequested: int = 0
    refused_duplicates: int = 0
    insert_failures: int = 0
    scripted: int = 0
    injected: Counter[str] = field(default_factory=Counter)
    kills: list[Kill] = field(default_factory=list)
    restart: dict[str, float] = field(default_factory=dict)
    rss: dict[str, dict[str, int]] = field(default_factory=dict)
    peaks_mb: list[float] = field(default_factory=list)  # every final worker's VmHWM
    leads: list[int] = field(default_factory=list)
    stopping: bool = False

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def say(self, line: str) -> None:
        print(f"[{self.elapsed():7.1f}s] {line}", flush=True)


async def connect(dsn: str) -> psycopg.AsyncConnection[Any]:
    """Connect, retrying while the database is away (restart in progress)."""
    with anyio.fail_after(60):
        while True:
            try:
                return await psycopg.AsyncConnection.connect(dsn, autocommit=True)
            except psycopg.OperationalError:
                await anyio.sleep(0.2)


async def insert_loop(soak: Soak, deadline: float) -> None:
    """Steady inserts: a new lead and its request, or now and then a new request for an old
    lead (refused while that lead still has one open, as the contract says)."""
    conn = await connect(soak.dsn)
    interval = 1 / soak.args.rate
    tick = time.monotonic()
    try:
        while time.monotonic() < deadline:
            tick += interval
            try:
                await insert_one(soak, conn)
            except psycopg.errors.UniqueViolation:
                soak.refused_duplicates += 1
            except psycopg.OperationalError:
                soak.insert_failures += 1
                await conn.close()
                conn = await connect(soak.dsn)
            await anyio.sleep(max(0.0, tick - time.monotonic()))  # pacing, not synchronization
    finally:
        await conn.close()


async def insert_one(soak: Soak, conn: psycopg.AsyncConnection[Any]) -> None:
    if soak.leads and random.random() < soak.args.rerequest:
        lead = random.choice(soak.leads)
        cursor = await conn.execute(
            "INSERT INTO plan_requests (lead_id, telegram_id) "
            "SELECT id, telegram_id FROM lead_registry WHERE id = %s",
            (lead,),
        )
        soak.rerequested += cursor.rowcount
        return
    number = len(soak.leads) + 1
    cursor = await conn.execute(
        "WITH lead AS (INSERT INTO lead_registry (telegram_id, prospect_name, prospect_company) "
        "VALUES (%s, %s, 'Soak Testing Ltd') RETURNING id, telegram_id) "
        "INSERT INTO plan_requests (lead_id, telegram_id) SELECT id, telegram_id FROM lead "
        "RETURNING lead_id",
        (10_000 + number, f"Soak Lead {number:06d}"),
    )
    row = await cursor.fetchone()
    assert row is not None
    soak.leads.append(row[0])
    soak.inserted += 1


def next_reply(soak: Soak) -> Reply:
    if random.random() >= soak.args.error_rate:
        return Reply(delay=random.uniform(0.5, 1.5) * soak.args.llm_delay)
    kind = random.choice(["500", "503", "429", "invalid", "slow"])
    soak.injected[kind] += 1
    if kind == "invalid":
        return Reply(content="this is not JSON")
    if kind == "slow":
        return Reply(delay=SLOW)
    return Reply(status=int(kind), headers={"retry-after": "0.5"} if kind == "429" else {})


def top_up_llm(soak: Soak) -> None:
    """Keep the fake LLM's script 50 answers ahead of its calls, errors mixed in at random."""
    ahead = soak.scripted - len(soak.llm.calls)
    replies = [next_reply(soak) for _ in range(max(0, 50 - ahead))]
    soak.llm.script(*replies)
    soak.scripted += len(replies)


async def llm_loop(soak: Soak) -> None:
    while not soak.stopping:
        top_up_llm(soak)
        await anyio.sleep(0.5)


async def kill_loop(soak: Soak, deadline: float, tg: TaskGroup) -> None:
    """SIGKILL a random killable worker now and then, start a replacement at once."""
    host = socket.gethostname()
    while True:
        await anyio.sleep(random.uniform(0.5, 1.5) * soak.args.kill_every)
        if time.monotonic() >= deadline:
            return
        # Kill and replace as one step: stopping the run in between must not leave a dead
        # worker in the list, or fewer workers than asked for.
        with anyio.CancelScope(shield=True):
            victim = random.choice(soak.killable)
            await victim.kill()
            at = time.monotonic()
            async with await connect(soak.dsn) as conn:
                cursor = await conn.execute(
                    "SELECT id FROM plan_requests WHERE status = 'processing' AND worker_id = %s",
                    (f"{host}:{victim.pid}",),
                )
                inflight = [row[0] for row in await cursor.fetchall()]
            kill = Kill(at, victim.pid, inflight)
            soak.kills.append(kill)
            soak.say(f"killed worker {victim.pid} with {len(inflight)} requests in flight")
            soak.killable[soak.killable.index(victim)] = await soak.fleet.start(
                *WORKER_FLAGS, env=WORKER_ENV
            )
        tg.start_soon(watch_recovery, soak, kill, f"{host}:{victim.pid}")


async def watch_recovery(soak: Soak, kill: Kill, dead: str) -> None:
    conn = await connect(soak.dsn)
    try:
        while kill.finished is None:
            try:
                cursor = await conn.execute(
                    "SELECT count(*) FILTER (WHERE status = 'processing' AND worker_id = %s), "
                    "count(*) FILTER (WHERE status IN ('pending', 'processing')) "
                    "FROM plan_requests WHERE id = ANY(%s)",
                    (dead, kill.inflight),
                )
                held, open_ = await cursor.fetchone() or (0, 0)
            except psycopg.OperationalError:
                await conn.close()
                conn = await connect(soak.dsn)
                continue
            now = time.monotonic() - kill.at
            if held == 0 and kill.recovered is None:
                kill.recovered = now
            if open_ == 0:
                kill.finished = now
            await anyio.sleep(0.1)
    finally:
        await conn.close()


async def restart_database(soak: Soak, server: EmbeddedPostgres, at: float) -> None:
    await anyio.sleep(max(0.0, at - time.monotonic()))
    soak.say(f"restarting PostgreSQL ({soak.args.restart_mode})")
    down = time.monotonic()

    def restart() -> None:
        server.stop(soak.args.restart_mode)
        server.start()

    await anyio.to_thread.run_sync(restart)
    soak.restart["downtime"] = time.monotonic() - down
    async with await connect(soak.dsn) as conn:
        lead = await (
            await conn.execute(
                "INSERT INTO lead_registry (telegram_id, prospect_name) "
                "VALUES (99, 'Soak Canary') RETURNING id"
            )
        ).fetchone()
        assert lead is not None
        inserted = time.monotonic()
        request = await (
            await conn.execute(
                "INSERT INTO plan_requests (lead_id, telegram_id) VALUES (%s, 99) RETURNING id",
                (lead[0],),
            )
        ).fetchone()
        assert request is not None
        with anyio.fail_after(60):
            while True:
                status = await (
                    await conn.execute(
                        "SELECT status FROM plan_requests WHERE id = %s", (request[0],)
                    )
                ).fetchone()
                if status and status[0] in ("completed", "failed"):
                    break
                await anyio.sleep(0.05)
    soak.restart["canary"] = time.monotonic() - inserted
    alive = sum(w.alive for w in [soak.steady, *soak.killable] if w is not None)
    soak.say(
        f"PostgreSQL back after {soak.restart['downtime']:.2f}s; a request inserted right after "
        f"finished in {soak.restart['canary']:.2f}s; {alive} workers alive, none restarted"
    )


async def progress_loop(soak: Soak) -> None:
    while not soak.stopping:
        await anyio.sleep(30)
        try:
            async with await connect(soak.dsn) as conn:
                rows = await (
                    await conn.execute("SELECT status, count(*) FROM plan_requests GROUP BY 1")
                ).fetchall()
        except (psycopg.OperationalError, TimeoutError):
            continue
        counts = dict(rows)
        assert soak.steady is not None
        memory = soak.steady.memory_kb()
        soak.say(
            f"inserted {soak.inserted + soak.rerequested}, "
            + ", ".join(f"{k} {counts.get(k, 0)}" for k in ("completed", "failed", "pending"))
            + f", processing {counts.get('processing', 0)}, kills {len(soak.kills)}, "
            f"steady worker RSS {memory['VmRSS'] / 1024:.1f} MB"
        )


async def wait_drained(soak: Soak, within: float = 300.0) -> float:
    started = time.monotonic()
    async with await connect(soak.dsn) as conn:
        with anyio.fail_after(within):
            while True:
                row = await (
                    await conn.execute(
                        "SELECT count(*) FROM plan_requests "
                        "WHERE status IN ('pending', 'processing')"
                    )
                ).fetchone()
                if row and row[0] == 0:
                    return time.monotonic() - started
                await anyio.sleep(0.2)


def check_effects(
    requests: list[dict[str, Any]], reminders: list[dict[str, Any]], leads: dict[int, Any]
) -> list[str]:
    """Exactly once, per lead: every completed request added its steps once, the last one's
    steps are the pending reminders and the lead's plan; nothing else wrote anything."""
    problems: list[str] = []
    by_lead: dict[int, list[dict[str, Any]]] = {}
    for request in requests:
        by_lead.setdefault(request["lead_id"], []).append(request)
        result = request["result"] or {}
        if request["status"] == "completed" and result.get("step_count") != len(result["plan"]):
            problems.append(f"request {request['id']}: step_count does not match its plan")
        if request["status"] == "failed" and "\n" in str(result.get("error", "\n")):
            problems.append(f"request {request['id']}: failed without a one-line error")
    counts = {(r["lead_id"], r["status"]): r["n"] for r in reminders}
    for lead, own in by_lead.items():
        done = sorted(
            (r for r in own if r["status"] == "completed"), key=lambda r: r["finished_at"]
        )
        total = sum(counts.get((lead, s), 0) for s in ("pending", "cancelled"))
        expected_total = sum(r["result"]["step_count"] for r in done)
        pending = counts.get((lead, "pending"), 0)
        expected_pending = done[-1]["result"]["step_count"] if done else 0
        if total != expected_total or pending != expected_pending:
            problems.append(
                f"lead {lead}: {total} reminders ({pending} pending), expected "
                f"{expected_total} ({expected_pending})"
            )
        if done and leads[lead] != done[-1]["result"]["plan"]:
            problems.append(f"lead {lead}: engagement_plan is not its last completed plan")
    return problems


async def final_checks(soak: Soak) -> tuple[list[str], dict[str, Any]]:
    async with await connect(soak.dsn) as conn:
        cursor = conn.cursor(row_factory=dict_row)
        await cursor.execute(
            "SELECT id, lead_id, status, attempts, result, finished_at FROM plan_requests"
        )
        requests = await cursor.fetchall()
        await cursor.execute(
            "SELECT lead_id, status, count(*) AS n FROM scheduled_reminders GROUP BY 1, 2"
        )
        reminders = await cursor.fetchall()
        await cursor.execute("SELECT id, engagement_plan FROM lead_registry")
        leads = {row["id"]: row["engagement_plan"] for row in await cursor.fetchall()}
    problems = check_effects(requests, reminders, leads)
    # An insert whose answer was lost to the restart may or may not have committed.
    acknowledged = soak.inserted + soak.rerequested + (1 if soak.restart else 0)  # + the canary
    if not acknowledged <= len(requests) <= acknowledged + soak.insert_failures:
        problems.append(f"{acknowledged} inserts acknowledged, {len(requests)} requests stored")
    statuses = Counter(r["status"] for r in requests)
    open_ = statuses["pending"] + statuses["processing"]
    if open_:
        problems.append(f"{open_} requests not terminal")
    attempts = sum(r["attempts"] for r in requests)
    calls = len(soak.llm.calls)
    if not statuses["completed"] <= calls <= attempts:
        problems.append(
            f"{calls} LLM calls for {attempts} claims and {statuses['completed']} plans"
        )
    errors = Counter(
        (r["result"] or {}).get("error", "?").split(":")[0].split("(")[0].strip()
        for r in requests
        if r["status"] == "failed"
    )
    figures = {
        "requests": len(requests),
        "statuses": dict(statuses),
        "attempts": dict(Counter(r["attempts"] for r in requests)),
        "calls": calls,
        "failed_because": dict(errors),
    }
    return problems, figures


def memory_grew(start: dict[str, int], end: dict[str, int]) -> bool:
    # Allow allocator noise: a few MB or 15 %, whichever is larger.
    return end["VmRSS"] - start["VmRSS"] > max(4 * 1024, 0.15 * start["VmRSS"])


def summarize(soak: Soak, drain: float, problems: list[str], figures: dict[str, Any]) -> None:
    recovered = [k.recovered for k in soak.kills if k.recovered is not None and k.inflight]
    finished = [k.finished for k in soak.kills if k.finished is not None and k.inflight]
    start, end = soak.rss["start"], soak.rss["end"]
    print("\n== soak summary", flush=True)
    print(
        f"run {soak.args.minutes:g} min at {soak.args.rate:g}/s with {soak.args.workers} workers; "
        f"drained {drain:.1f}s after the last insert"
    )
    print(
        f"requests {figures['requests']}: {figures['statuses']}; new leads {soak.inserted}, "
        f"re-requests {soak.rerequested} (+{soak.refused_duplicates} refused while one was open)"
        f", inserts lost to the restart {soak.insert_failures}"
    )
    print(f"claims per request: {dict(sorted(figures['attempts'].items()))}")
    print(f"failed because: {figures['failed_because']}")
    print(f"LLM calls {figures['calls']}; injected errors {dict(soak.injected)}")
    print(
        f"kills {len(soak.kills)} ({sum(len(k.inflight) for k in soak.kills)} requests in flight);"
        f" claims recovered in median {_median(recovered)}, max {_max(recovered)}; those "
        f"requests finished in median {_median(finished)}, max {_max(finished)}"
    )
    if soak.restart:
        print(
            f"database restart ({soak.args.restart_mode}): down {soak.restart['downtime']:.2f}s, "
            f"next request finished {soak.restart['canary']:.2f}s after its insert"
        )
    print(
        f"steady worker RSS: start {start['VmRSS'] / 1024:.1f} MB (peak {start['VmHWM'] / 1024:.1f}"
        f" MB), end {end['VmRSS'] / 1024:.1f} MB (peak {end['VmHWM'] / 1024:.1f} MB): "
        + ("GREW" if memory_grew(start, end) else "stable")
    )
    print("all workers' peak RSS at the end: " + ", ".join(f"{mb:.1f} MB" for mb in soak.peaks_mb))
    print("checks: " + ("all passed" if not problems else f"{len(problems)} FAILED"))
    for problem in problems[:20]:
        print(f"  - {problem}")


def _median(values: list[float]) -> str:
    return f"{statistics.median(values):.2f}s" if values else "-"


def _max(values: list[float]) -> str:
    return f"{max(values):.2f}s" if values else "-"


async def run(args: argparse.Namespace, server: EmbeddedPostgres, log_dir: Path) -> int:
    admin = server.start()
    name = "planbus_soak"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    dsn = f"postgresql://postgres@127.0.0.1:{server.port}/{name}"
    await anyio.to_thread.run_sync(migrate.upgrade, dsn)
    with FakeLLM() as llm:
        async with Fleet(dsn, log_dir, llm.base_url) as fleet:
            soak = Soak(args, dsn, llm, fleet)
            top_up_llm(soak)
            soak.steady = await fleet.start(*WORKER_FLAGS, env=WORKER_ENV)
            for _ in range(args.workers - 1):
                soak.killable.append(await fleet.start(*WORKER_FLAGS, env=WORKER_ENV))
            soak.say(f"{args.workers} workers ready; inserting for {args.minutes:g} min")
            soak.started = time.monotonic()
            deadline = soak.started + args.minutes * 60
            warm_up = soak.started + min(60.0, args.minutes * 6)
            async with anyio.create_task_group() as tg:
                tg.start_soon(llm_loop, soak)
                tg.start_soon(progress_loop, soak)
                tg.start_soon(measure_start, soak, warm_up)
                restart_at = soak.started + args.restart_at * args.minutes * 60
                tg.start_soon(restart_database, soak, server, restart_at)
                async with anyio.create_task_group() as watchers:
                    async with anyio.create_task_group() as faults:
                        faults.start_soon(kill_loop, soak, deadline, watchers)
                        await insert_loop(soak, deadline)
                        faults.cancel_scope.cancel()
                    soak.say("inserts stopped; waiting for every request to finish")
                    drain = await wait_drained(soak)
                    # The recovery watchers see the end too, within a few polls.
                    watchers.cancel_scope.deadline = anyio.current_time() + 10
                soak.stopping = True
                tg.cancel_scope.cancel()
            soak.rss["end"] = soak.steady.memory_kb()
            workers = [soak.steady, *soak.killable]
            soak.peaks_mb = [w.memory_kb()["VmHWM"] / 1024 for w in workers]
            problems, figures = await final_checks(soak)
            for worker in workers:
                code, _ = await worker.terminate()
                if code != 0:
                    problems.append(f"worker {worker.pid} exited {code} on SIGTERM")
            if memory_grew(soak.rss["start"], soak.rss["end"]):
                problems.append("the steady worker's memory grew")
            summarize(soak, drain, problems, figures)
            (log_dir / "summary.json").write_text(
                json.dumps({"figures": figures, "problems": problems}, indent=2, default=str)
            )
            return 1 if problems else 0


async def measure_start(soak: Soak, at: float) -> None:
    await anyio.sleep(max(0.0, at - time.monotonic()))
    assert soak.steady is not None
    soak.rss["start"] = soak.steady.memory_kb()
    soak.say(
        f"steady worker RSS after warm-up: {soak.rss['start']['VmRSS'] / 1024:.1f} MB "
        f"(peak {soak.rss['start']['VmHWM'] / 1024:.1f} MB)"
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    random.seed(args.seed)
    folder = Path(tempfile.mkdtemp(prefix="planbus-soak-"))
    folder.chmod(0o755)  # under root the server's system user must enter it (mkdtemp: 0700)
    log_dir = args.log_dir or folder / "logs"
    server = EmbeddedPostgres(
        # fsync off survives a server crash (only an OS crash loses data); synchronous_commit
        # off would not: an immediate restart could lose acknowledged commits.
        folder / "pgdata",
        settings={"fsync": "off"},
    )
    print(
        f"soak: database and worker logs in {log_dir.parent if args.log_dir is None else log_dir}"
    )
    code = 1
    try:
        code = anyio.run(run, args, server, log_dir)
    finally:
        server.stop("immediate")
        if code == 0 and args.log_dir is None:
            shutil.rmtree(folder, ignore_errors=True)
        elif code != 0:
            print(f"soak: kept {folder} for inspection")
    return code


if __name__ == "__main__":
    sys.exit(main())
