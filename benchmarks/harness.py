"""What every workload needs: a PostgreSQL server, the LLM server, worker processes, samplers.

Everything runs on this machine, as separate processes: the benchmark driver (this process,
synchronous psycopg), PostgreSQL, `python -m benchmarks.llm`, and the worker under test
(`python -m planbus.listen` or `python -m benchmarks.baseline_worker`). Every wait has a
deadline.
"""

from __future__ import annotations

import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql
from psycopg.conninfo import make_conninfo

from benchmarks.llm import PROSPECT_NAME
from planbus.ops import embedded_access, migrate
from planbus.ops.embedded import EmbeddedPostgres

TEMPLATE = "bench_template"
PLANBUS_READY = "listening on channel plan_requests"
BASELINE_READY = "baseline worker polling"
TICKS = os.sysconf("SC_CLK_TCK")

# PostgreSQL's own defaults otherwise: fsync, synchronous_commit and full_page_writes stay on,
# so every completed request is a durable commit, as in production.
SERVER_SETTINGS = {
    "max_connections": "300",
    "shared_preload_libraries": "pg_stat_statements",
    "pg_stat_statements.track_utility": "on",
}


class BenchError(RuntimeError):
    """A workload could not run or its results are wrong: the run fails."""


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    cpu = "unknown"
    with open("/proc/cpuinfo") as info:
        for line in info:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    with open("/proc/meminfo") as info:
        mem_kb = int(info.readline().split()[1])
    return {
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "memory_gb": round(mem_kb / 1024 / 1024, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
    }


class Postgres:
    """One embedded PostgreSQL for the whole run, and a fresh database per workload."""

    def __init__(self, root: Path) -> None:
        self.server = EmbeddedPostgres(root / "pgdata", settings=dict(SERVER_SETTINGS))
        self.admin = ""
        self.version = ""

    def start(self) -> None:
        self.server.start()
        # By TCP, as a worker reaches a real database (and as every figure so far was taken),
        # not by the embedded server's socket; its password file makes it ours only.
        assert self.server.port is not None
        self.admin = embedded_access.tcp_dsn(self.server.data_dir, self.server.port)
        with psycopg.connect(self.admin, autocommit=True) as conn:
            conn.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
            self.version = str(conn.execute("SHOW server_version").fetchone()[0])  # type: ignore[index]
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(TEMPLATE)))
        migrate.upgrade(self.dsn(TEMPLATE))

    def stop(self) -> None:
        if self.admin:
            self.server.stop("immediate")

    def dsn(self, dbname: str) -> str:
        return make_conninfo(self.admin, dbname=dbname)

    def cpu_seconds(self) -> float:
        """CPU time of the postmaster's children (backends, WAL writer, ...) so far.

        Backends that have exited are not counted, so read it while the worker is connected.
        """
        postmaster = int((self.server.data_dir / "postmaster.pid").read_text().split()[0])
        total = 0.0
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == postmaster:
                total += (int(fields[11]) + int(fields[12])) / TICKS
        return total

    def database(self, name: str, source: Path | None = None) -> str:
        """A freshly migrated database for one workload, at the revisions of `source` if given."""
        template = TEMPLATE if source is None else self._template_for(source)
        with psycopg.connect(self.admin, autocommit=True) as conn:
            conn.execute(
                sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(
                    sql.Identifier(name), sql.Identifier(template)
                )
            )
        return self.dsn(name)

    def _template_for(self, source: Path) -> str:
        """A template migrated by another checkout's own revisions (compare.py's `--before`):
        its worker checks that the schema is at its head, which may be older than ours."""
        template = f"{TEMPLATE}_{abs(hash(str(source))) % 10**8}"
        with psycopg.connect(self.admin, autocommit=True) as conn:
            found = conn.execute(
                "SELECT 1 FROM pg_database WHERE datname = %s", (template,)
            ).fetchone()
            if found:
                return template
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(template)))
        subprocess.run(
            [
                sys.executable,
                "-c",
                # planbus.ops.migrate since the folders; planbus.migrate in a `compare --before`
                # copy from before them.
                "import sys, importlib, importlib.util as u; "
                "migrate = importlib.import_module("
                "'planbus.ops.migrate' if u.find_spec('planbus.ops') else 'planbus.migrate'); "
                "migrate.upgrade(sys.argv[1])",
                self.dsn(template),
            ],
            env={**os.environ, "PYTHONPATH": str(source / "src")},
            check=True,
        )
        return template


class LLMServer:
    """`python -m benchmarks.llm` in a process of its own."""

    def __init__(self, module: str = "benchmarks.llm", *flags: str) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", module, "--port", "0", *flags],
            stdout=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            text=True,
        )
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        found = re.search(r"(?:port |127\.0\.0\.1:)(\d+)", line)
        if not found:
            raise BenchError(f"the benchmark LLM server did not start: {line!r}")
        self.port = int(found.group(1))
        self.base_url = f"http://127.0.0.1:{self.port}/v1"

    def configure(self, delay: float = 0.0, first_delay: float | None = None) -> None:
        """Set the answer delays and clear the record of calls."""
        self._request("/bench/config", {"delay": delay, "first_delay": first_delay})

    def calls(self) -> list[tuple[float, int | None]]:
        """(arrival time, lead key) of every call since the last `configure`."""
        return [(arrived, key) for arrived, key in self._request("/bench/calls")["calls"]]

    def first_arrivals(self) -> dict[int, float]:
        arrivals: dict[int, float] = {}
        for arrived, key in self.calls():
            if key is not None and key not in arrivals:
                arrivals[key] = arrived
        return arrivals

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(10)

    def _request(self, path: str, payload: dict[str, Any] | None = None) -> Any:
        data = None if payload is None else json.dumps(payload).encode()
        url = f"http://127.0.0.1:{self.port}{path}"
        with urllib.request.urlopen(url, data=data, timeout=10) as answer:
            return json.loads(answer.read())


class WorkerProcess:
    """The worker under test, as operators run it; its log goes to a file."""

    def __init__(
        self, command: Sequence[str], ready_line: str, log_path: Path, env: dict[str, str]
    ):
        self.log_path = log_path
        self.ready_line = ready_line
        clean = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("PLANBUS_", "OPENAI_")) and k != "DATABASE_URL"
        }
        self._log = log_path.open("wb")
        self.process = subprocess.Popen(
            list(command),
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**clean, **env},
        )
        self.pid = self.process.pid
        self._profiler: subprocess.Popen[bytes] | None = None

    @classmethod
    def planbus(
        cls,
        dsn: str,
        llm: LLMServer,
        log_path: Path,
        planner: str = "openai",
        *flags: str,
        source: Path | None = None,
        env: dict[str, str] | None = None,
    ) -> WorkerProcess:
        command = [sys.executable, "-m", "planbus.listen", "--database-url", dsn]
        command += ["--planner", planner, *flags]
        env = {"OPENAI_BASE_URL": llm.base_url, "OPENAI_API_KEY": "bench", **(env or {})}
        if source is not None:  # another copy of planbus, e.g. the code before a change
            env["PYTHONPATH"] = str(source / "src")
        return cls(command, PLANBUS_READY, log_path, env)

    @classmethod
    def baseline(cls, dsn: str, llm: LLMServer, log_path: Path) -> WorkerProcess:
        command = [sys.executable, "-m", "benchmarks.baseline_worker", "--database-url", dsn]
        env = {"OPENAI_BASE_URL": llm.base_url, "OPENAI_API_KEY": "bench"}
        return cls(command, BASELINE_READY, log_path, env)

    def wait_ready(self, within: float = 60.0) -> None:
        wait_until(
            lambda: self._ready_or_dead(),
            within,
            f"worker {self.pid} to log {self.ready_line!r}",
        )

    def _ready_or_dead(self) -> bool:
        if self.ready_line in self.log_path.read_text(errors="replace"):
            return True
        if self.process.poll() is not None:
            raise BenchError(f"worker exited with {self.process.returncode}:\n{self.log_tail()}")
        return False

    def profile(self, path: Path) -> None:
        """Sample this process with py-spy (collapsed stacks) until it exits."""
        self._profiler = subprocess.Popen(
            [
                "py-spy",
                "record",
                "--pid",
                str(self.pid),
                "--format",
                "raw",
                "--rate",
                os.environ.get("BENCH_PYSPY_RATE", "250"),
                "--nonblocking",
                "--output",
                str(path),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            stdin=subprocess.DEVNULL,
        )

    def cpu_seconds(self) -> float:
        """User plus system CPU time so far, from /proc/<pid>/stat."""
        with open(f"/proc/{self.pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / TICKS

    def peak_rss_mb(self) -> float:
        """The resident set's high-water mark (VmHWM) from /proc/<pid>/status."""
        with open(f"/proc/{self.pid}/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
        raise BenchError("no VmHWM in /proc status")

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(10)
        self._log.close()

    def stop(self) -> int:
        """SIGTERM, as an operator stops it; SIGKILL if it has not exited within 30 s."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        self._log.close()
        if self._profiler is not None:
            self._profiler.wait(30)
        return self.process.returncode

    def log_tail(self, lines: int = 20) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


def wait_until(check: Callable[[], Any], within: float, what: str, every: float = 0.02) -> Any:
    """Poll `check()` until it returns something true; fail at the deadline."""
    deadline = time.monotonic() + within
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise BenchError(f"timed out after {within:g}s waiting for {what}")
        time.sleep(every)


def seed(dsn: str, count: int, *, pending: bool, old_reminders: bool = True) -> dict[int, int]:
    """`count` leads keyed 1..count (key = telegram_id, name "Bench Prospect <key>"), each
    with one old pending reminder (to be cancelled), and a pending request each if `pending`.
    Returns key -> lead id."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        rows = conn.execute(
            """
            INSERT INTO lead_registry (telegram_id, prospect_name, prospect_title,
                                       prospect_company, prospect_analysis, closing_strategy)
            SELECT k, replace(%(name)s, '{key}', k::text), 'Head of Platform', 'Company ' || k,
                   'Runs a team of forty engineers; posts weekly about reliability.',
                   'Lead with the on-call pain, then offer a short call.'
              FROM generate_series(1, %(count)s) AS k
            RETURNING telegram_id, id
            """,
            {"name": PROSPECT_NAME, "count": count},
        ).fetchall()
        if old_reminders:
            conn.execute(
                "INSERT INTO scheduled_reminders (lead_id, telegram_id, step_id, due_at, status) "
                "SELECT id, telegram_id, 1, now(), 'pending' FROM lead_registry"
            )
        if pending:
            conn.execute(
                "INSERT INTO plan_requests (lead_id, telegram_id) "
                "SELECT id, telegram_id FROM lead_registry ORDER BY id"
            )
        # Fresh statistics, so the first claims plan as they would on a table in use.
        conn.execute("VACUUM ANALYZE")
    return {key: lead_id for key, lead_id in rows}


def finished_count(dsn: str) -> int:
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute(
            "SELECT count(*) FROM plan_requests WHERE status IN ('completed', 'failed')"
        ).fetchone()
    return int(row[0]) if row else 0


def wait_finished(dsn: str, count: int, within: float) -> None:
    """Until `count` requests are completed or failed (polled every 50 ms)."""
    wait_until(lambda: finished_count(dsn) >= count, within, f"{count} requests", every=0.05)


def drain_window(dsn: str) -> tuple[float, float]:
    """Server clock: the first claim and the last finish, as epoch seconds."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute(
            "SELECT extract(epoch FROM min(claimed_at))::float8, "
            "extract(epoch FROM max(finished_at))::float8 FROM plan_requests"
        ).fetchone()
    assert row is not None
    return float(row[0]), float(row[1])


def verify_effects(dsn: str, count: int, events: int | None) -> dict[str, Any]:
    """Every effect of the contract was written, once, for every request."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        requests = conn.execute(
            """
            SELECT count(*) FILTER (WHERE r.status = 'completed'),
                   count(*) FILTER (WHERE r.attempts = 1),
                   count(*) FILTER (WHERE l.engagement_plan = r.result -> 'plan'
                                      AND (r.result ->> 'step_count')::int
                                          = jsonb_array_length(r.result -> 'plan')
                                      AND l.next_followup IS NOT NULL),
                   coalesce(sum(jsonb_array_length(r.result -> 'plan')), 0)
              FROM plan_requests AS r JOIN lead_registry AS l ON l.id = r.lead_id
            """
        ).fetchone()
        reminders = conn.execute(
            "SELECT count(*) FILTER (WHERE status = 'pending' AND draft_text IS NOT NULL), "
            "count(*) FILTER (WHERE status = 'cancelled') FROM scheduled_reminders"
        ).fetchone()
    assert requests is not None and reminders is not None
    completed, first_attempt, plans, steps = (int(x) for x in requests)
    new_reminders, cancelled = (int(x) for x in reminders)
    found = {
        "completed": completed,
        "first_attempt": first_attempt,
        "plans_stored": plans,
        "new_reminders": new_reminders,
        "steps": steps,
        "old_reminders_cancelled": cancelled,
        "events": events,
    }
    problems = [
        name
        for name, ok in (
            ("completed", completed == count),
            ("plans_stored", plans == count),
            ("new_reminders", new_reminders == steps),
            ("old_reminders_cancelled", cancelled == count),
            ("events", events is None or events == count),
        )
        if not ok
    ]
    if problems:
        raise BenchError(f"effects missing for {count} requests ({', '.join(problems)}): {found}")
    return found


# The worker's statements, told apart by a phrase of each (see planbus/queries.py).
STATEMENT_KINDS = {
    "sweep": "expired AS (",
    "claim": "WITH claimed AS",
    "next due": "min(run_after)",
    "complete": "WITH input AS",
    "give back": "WITH given AS",
    "heartbeat": "SET lease_expires_at = now()",
    "progress": "SET progress = $",
}


def reset_statements(admin_dsn: str) -> None:
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        conn.execute("SELECT pg_stat_statements_reset()")


def statements_sent(admin_dsn: str, dbname: str) -> list[dict[str, Any]]:
    """What pg_stat_statements saw in one database since the last reset, by kind."""
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT query, calls, total_exec_time / calls FROM pg_stat_statements "
            "WHERE dbid = (SELECT oid FROM pg_database WHERE datname = %s) "
            "ORDER BY calls DESC",
            (dbname,),
        ).fetchall()
    found = []
    for query, calls, mean_ms in rows:
        kind = next((k for k, mark in STATEMENT_KINDS.items() if mark in query), "other")
        found.append(
            {
                "kind": kind,
                "calls": int(calls),
                "mean_ms": round(mean_ms, 4),
                "query": " ".join(query.split())[:200],
            }
        )
    return found


class EventCounter(threading.Thread):
    """Counts `plan_request_events` notifications on a LISTEN connection of its own."""

    def __init__(self, dsn: str) -> None:
        super().__init__(daemon=True)
        self.dsn = dsn
        self.count = 0
        self._stop_event = threading.Event()
        self._listening = threading.Event()

    def __enter__(self) -> EventCounter:
        self.start()
        if not self._listening.wait(10):
            raise BenchError("event listener did not start")
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop_event.set()
        self.join(10)

    def run(self) -> None:
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            conn.execute("LISTEN plan_request_events")
            self._listening.set()
            while not self._stop_event.is_set():
                for _ in conn.notifies(timeout=0.2):
                    self.count += 1


class ConnectionSampler(threading.Thread):
    """Samples pg_stat_activity every 10 ms: the worker's open and busy connections."""

    QUERY = """
    SELECT count(*), count(*) FILTER (WHERE state IS DISTINCT FROM 'idle')
      FROM pg_stat_activity
     WHERE datname = %s AND application_name LIKE 'planbus%%'
    """

    def __init__(self, admin_dsn: str, dbname: str) -> None:
        super().__init__(daemon=True)
        self.admin_dsn = admin_dsn
        self.dbname = dbname
        self.max_open = 0
        self.max_busy = 0
        self.samples = 0
        self._stop_event = threading.Event()

    def __enter__(self) -> ConnectionSampler:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop_event.set()
        self.join(10)

    def run(self) -> None:
        with psycopg.connect(self.admin_dsn, autocommit=True) as conn:
            while not self._stop_event.wait(0.01):
                row = conn.execute(self.QUERY, (self.dbname,)).fetchone()
                assert row is not None
                self.max_open = max(self.max_open, int(row[0]))
                self.max_busy = max(self.max_busy, int(row[1]))
                self.samples += 1


def percentiles(values: Sequence[float]) -> dict[str, float]:
    """p50, p90, p99 (linear interpolation) and max."""
    ordered = sorted(values)
    if not ordered:
        raise BenchError("no samples")

    def at(p: float) -> float:
        position = (len(ordered) - 1) * p
        low = int(position)
        high = min(low + 1, len(ordered) - 1)
        return ordered[low] + (ordered[high] - ordered[low]) * (position - low)

    return {"p50": at(0.5), "p90": at(0.9), "p99": at(0.99), "max": ordered[-1]}


def clean_directory(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
