"""The dashboard under load: 20 open pages while a worker plans 10 requests a second.

`python -m planbus dashboard` runs as a process of its own; 20 clients hold its event stream
open (what 20 open pages do: each page is one stream after its first GET) for `seconds`, while
the benchmark inserts 10 requests a second for a real worker whose model (`tests.llm_server`)
streams its plans, so requests are seen being planned. Reported: the dashboard's RSS and CPU,
the database's statements per second (all, and the dashboard's alone), how often each page got
an update and its longest wait between two, and the worker's pace. With `screenshot`, chromium
(Playwright) takes a picture of the page at the end, under that load.
"""

from __future__ import annotations

import http.client
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import psycopg

from benchmarks.first_step import plan_steps
from benchmarks.harness import BenchError, percentiles, reset_statements, seed, statements_sent
from benchmarks.provider import FakeProvider
from benchmarks.workloads import Bench

PAGES = 20
RATE = 10.0  # requests inserted per second
# The model writes about 1,200 characters a second, 40 a piece: a plan takes about 2 s.
TOKENS_PER_SECOND, CHUNK_CHARS = 30, 40
DASHBOARD_MARK = "json_agg(c)"  # early in the dashboard's one statement (queries.SNAPSHOT)
# The benchmark's own statements: its inserts and its stand-in worker row.
BENCH_MARKS = (
    "INSERT INTO plan_requests (lead_id, telegram_id) VALUES",
    "FILTER (WHERE worker_id NOT LIKE",
    "INSERT INTO planbus_workers (worker_id, inflight, concurrency)",
)
TICKS = os.sysconf("SC_CLK_TCK")


class Page(threading.Thread):
    """One open page: its first GET, then its event stream, counting updates and gaps."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.address = urlsplit(url)
        self.updates = 0
        self.longest_gap = 0.0
        self.error: str | None = None
        self._connection: http.client.HTTPConnection | None = None
        self._stopping = threading.Event()

    def run(self) -> None:
        host, port = self.address.hostname or "127.0.0.1", self.address.port or 80
        try:
            first = http.client.HTTPConnection(host, port, timeout=10)
            first.request("GET", "/")
            first.getresponse().read()
            first.close()
            self._connection = http.client.HTTPConnection(host, port, timeout=10)
            self._connection.request("GET", "/events")
            self._follow(self._connection.getresponse())
        except OSError as exc:
            if not self._stopping.is_set():
                self.error = str(exc)

    def _follow(self, stream: http.client.HTTPResponse) -> None:
        last = time.monotonic()
        while not self._stopping.is_set():
            line = stream.readline()
            if not line:
                return
            if line.startswith(b"data:"):
                now = time.monotonic()
                if self.updates:
                    self.longest_gap = max(self.longest_gap, now - last)
                self.updates, last = self.updates + 1, now

    def stop(self) -> None:
        self._stopping.set()
        if self._connection is not None and self._connection.sock is not None:
            self._connection.sock.shutdown(2)
        self.join(10)


class Dashboard:
    """`python -m planbus dashboard` on a free port; its RSS and CPU from /proc."""

    def __init__(self, dsn: str, log: Path) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PLANBUS_")}
        self._log = log.open("w")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "planbus", "dashboard", "--database-url", dsn, "--port", "0"],
            stdout=subprocess.PIPE,
            stderr=self._log,
            stdin=subprocess.DEVNULL,
            env=env,
            text=True,
        )
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if "dashboard on" not in line:
            raise BenchError(f"the dashboard did not start: {line!r} (log: {log})")
        self.url = line.split()[3]

    def rss_mb(self) -> tuple[float, float]:
        """Resident memory now, and its peak so far, in MB."""
        status = Path(f"/proc/{self.process.pid}/status").read_text().splitlines()
        fields = dict(line.split(":", 1) for line in status if ":" in line)
        return _kb(fields["VmRSS"]) / 1024, _kb(fields["VmHWM"]) / 1024

    def cpu_seconds(self) -> float:
        fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / TICKS

    def stop(self) -> int:
        self.process.terminate()
        code = self.process.wait(20)
        self._log.close()
        return code


def _kb(value: str) -> int:
    return int(value.split()[0])  # "  123456 kB"


def under_load(
    bench: Bench, seconds: float | None = None, screenshot: Path | None = None
) -> dict[str, Any]:
    """`seconds` of 20 open pages and 10 requests a second (default: 60, or 10 with --quick)."""
    seconds = seconds or (10.0 if bench.sizes.w1_requests < 50 else 60.0)
    dbname, dsn = bench.database("dashboard")
    leads = seed(dsn, int(RATE * 20) + 1, pending=False)
    plan_file = bench.logs / "dashboard_plan.json"
    plan_file.write_text(json.dumps(plan_steps()))
    provider = FakeProvider(
        *("--tokens-per-second", str(TOKENS_PER_SECOND), "--chunk-chars", str(CHUNK_CHARS)),
        *("--steps-file", str(plan_file)),
    )
    worker = bench.planbus(dsn, "dashboard_worker", llm=provider)
    dashboard = Dashboard(dsn, bench.logs / "dashboard.log")
    pages = [Page(dashboard.url) for _ in range(PAGES)]
    try:
        _history(dsn, leads)
        for page in pages:
            page.start()
        time.sleep(2.0)  # every page loaded and listening
        rss_start, _ = dashboard.rss_mb()
        reset_statements(bench.pg.admin)
        cpu_before = dashboard.cpu_seconds()
        camera = Camera(dashboard.url, screenshot)
        before = [page.updates for page in pages]
        beat = _Beat(dashboard, camera, worker.pid)
        inserted, elapsed, rss_samples = _insert_at_rate(dsn, leads, seconds, beat)
        for page, seen in zip(pages, before, strict=True):
            page.updates -= seen  # within the window only
        cpu = dashboard.cpu_seconds() - cpu_before
        statements = statements_sent(bench.pg.admin, dbname)
        rss_end, rss_peak = dashboard.rss_mb()
        camera.join(30)
    finally:
        for page in pages:
            page.stop()
        dashboard_exit = dashboard.stop()
        worker.stop()
        provider.stop()
    return _summary(
        pages, statements, elapsed, inserted, cpu, (rss_start, rss_end, rss_peak, rss_samples)
    ) | {
        "dashboard_exit_code": dashboard_exit,
        "finished": _finished(dsn, elapsed),
        "worker_row_written_by_benchmark": beat.stand_in,
    }


def _history(dsn: str, leads: dict[int, int]) -> None:
    """Two failed requests, as an operator would find them (with their Retry buttons)."""
    keys = sorted(leads)[-3:]
    with psycopg.connect(dsn, autocommit=True) as conn:
        for key, error in zip(
            keys[:2],
            (
                "The model's output was not a valid plan: step 3 has delay_days 4.5.",
                "The LLM provider refused the credentials (HTTP 401); check OPENAI_API_KEY.",
            ),
            strict=True,
        ):
            conn.execute(
                "INSERT INTO plan_requests (lead_id, telegram_id, status, attempts, result, "
                "last_error, finished_at) VALUES (%s, %s, 'failed', 3, "
                "jsonb_build_object('error', %s::text), %s, now())",
                (leads[key], key, error, error),
            )


class _Beat:
    """What happens once a second of the load: the RSS sample, the camera, the worker's row."""

    def __init__(self, dashboard: Dashboard, camera: Camera, worker_pid: int) -> None:
        self.dashboard, self.camera, self.worker_pid = dashboard, camera, worker_pid
        self.rss: list[float] = []
        self.stand_in = False  # the benchmark wrote the worker's heartbeat row itself

    def __call__(self, conn: psycopg.Connection[Any], elapsed: float, seconds: float) -> None:
        self.rss.append(self.dashboard.rss_mb()[0])
        # The picture near the end, when the chart has the run's minutes.
        late = elapsed >= seconds - 30
        if self.camera.path is not None and late and not self.camera.started_once:
            self.camera.start()
        # A worker that does not write planbus_workers yet (before the fleet's heartbeat row):
        # its row as that heartbeat would write it, so the page shows the worker it has.
        row = conn.execute(
            "SELECT count(*) FILTER (WHERE worker_id NOT LIKE 'bench:%%') FROM planbus_workers"
        ).fetchone()
        if row is not None and row[0] == 0:
            self.stand_in = True
            conn.execute(WORKER_ROW, {"id": f"bench:{self.worker_pid}"})

    def busy(self) -> bool:
        return self.camera.started_once and self.camera.is_alive()


# The stand-in heartbeat: in flight = the worker's claims now; its LLM limit is not known.
WORKER_ROW = """
INSERT INTO planbus_workers (worker_id, inflight, concurrency)
VALUES (%(id)s, (SELECT count(*) FROM plan_requests WHERE status = 'processing'), 32)
ON CONFLICT (worker_id) DO UPDATE
   SET inflight = excluded.inflight, heartbeat_at = now()
"""


def _insert_at_rate(
    dsn: str, leads: dict[int, int], seconds: float, beat: _Beat
) -> tuple[int, float, list[float]]:
    """One request every 1/RATE s for `seconds`, and on while the camera works (leads taken
    in turn); `beat` once a second."""
    keys = sorted(leads)[:-3]
    inserted = 0
    started = time.monotonic()
    with psycopg.connect(dsn, autocommit=True) as conn:
        while (due := started + inserted / RATE) < started + seconds or beat.busy():
            time.sleep(max(0.0, due - time.monotonic()))
            key = keys[inserted % len(keys)]
            try:
                conn.execute(
                    "INSERT INTO plan_requests (lead_id, telegram_id) VALUES (%s, %s)",
                    (leads[key], key),
                )
            except psycopg.errors.UniqueViolation:
                pass  # that lead's previous request is still being planned: the next lead
            inserted += 1
            if inserted % int(RATE) == 1:
                beat(conn, due - started, seconds)
    return inserted, time.monotonic() - started, beat.rss


def _finished(dsn: str, elapsed: float) -> dict[str, float]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute(
            "SELECT count(*) FILTER (WHERE status = 'completed'), "
            "count(*) FILTER (WHERE status = 'failed') FROM plan_requests"
        ).fetchone()
    assert row is not None
    return {"completed": row[0], "failed": row[1], "completed_per_second": row[0] / elapsed}


def _summary(
    pages: list[Page],
    statements: list[dict[str, Any]],
    elapsed: float,
    inserted: int,
    cpu: float,
    rss: tuple[float, float, float, list[float]],
) -> dict[str, Any]:
    rss_start, rss_end, rss_peak, samples = rss
    total = sum(s["calls"] for s in statements)
    own = sum(s["calls"] for s in statements if DASHBOARD_MARK in s["query"])
    ours = sum(s["calls"] for s in statements if any(m in s["query"] for m in BENCH_MARKS))
    errors = [p.error for p in pages if p.error]
    if errors:
        raise BenchError(f"{len(errors)} pages lost their stream: {errors[0]}")
    return {
        "pages": len(pages),
        "seconds": round(elapsed, 1),
        "requests_inserted": inserted,
        "dashboard_rss_mb": {
            "start": round(rss_start, 1),
            "end": round(rss_end, 1),
            "peak": round(rss_peak, 1),
            "max_sampled": round(max(samples or [rss_end]), 1),
        },
        "dashboard_cpu_seconds_per_minute": round(cpu * 60 / elapsed, 2),
        "statements_per_second": round(total / elapsed, 1),
        "dashboard_statements_per_second": round(own / elapsed, 2),
        "worker_statements_per_second": round((total - own - ours) / elapsed, 1),
        "updates_per_page": percentiles([float(p.updates) for p in pages]),
        "longest_gap_between_updates_seconds": round(max(p.longest_gap for p in pages), 2),
    }


class Camera(threading.Thread):
    """Chromium's picture of the page (Playwright driving Debian's chromium package)."""

    def __init__(self, url: str, path: Path | None) -> None:
        super().__init__(daemon=True)
        self.url, self.path = url, path
        self.started_once = False

    def start(self) -> None:
        self.started_once = True
        super().start()

    def join(self, timeout: float | None = None) -> None:
        if self.started_once:
            super().join(timeout)

    def run(self) -> None:
        from playwright.sync_api import sync_playwright

        from tests.browser import ARGS, CHROMIUM

        assert self.path is not None
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=ARGS)
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto(self.url)
            try:
                page.locator("#planning li.step").first.wait_for(timeout=10_000)
            except Exception:
                print(page.locator("main").inner_text()[:2000], file=sys.stderr)
                raise
            time.sleep(1.5)  # ages filled in, a few more steps written
            self.path.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(self.path), full_page=True)
            browser.close()
