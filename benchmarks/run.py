"""`python -m benchmarks.run [--quick]`: every workload, a table, a JSON file and the W1 chart.

It starts its own PostgreSQL (embedded, in a temporary folder, fsync on) and its own
OpenAI-compatible server (`benchmarks/llm.py`), and runs each workload against
`python -m planbus.listen` as a separate process. Benchmarks are not tests: a missed target is
reported, not raised; wrong results (a lost effect, a false takeover) fail the run.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import operator
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

from benchmarks import breakdown, dashboard, first_step, fleet, limits, real_model, workloads
from benchmarks.chart import w1_chart
from benchmarks.harness import BenchError, LLMServer, Postgres, clean_directory, machine
from benchmarks.workloads import FULL, QUICK, Bench

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
CHART = HERE.parent / "docs" / "bench-w1-latency.png"

# The order they run in; W1's baseline and W3's baseline run right after planbus's.
WORKLOADS: dict[str, Callable[[Bench], dict[str, Any]]] = {
    "w1": workloads.pickup_latency,
    "w1_baseline": lambda b: workloads.pickup_latency(b, baseline=True),
    "w1_breakdown": breakdown.breakdown,
    "w2_template": lambda b: workloads.drain(b, "template"),
    "w2_openai": lambda b: workloads.drain(b, "openai"),
    "w3": workloads.slow_model,
    "w3_baseline": lambda b: workloads.slow_model(b, baseline=True),
    "w4": lambda b: workloads.slow_model(b, fan_out=True),
    "idle": workloads.idle,
    "recovery": workloads.recovery,
    "provider_limits": limits.provider_limits,
    "first_step": first_step.time_to_first_step,
    "dashboard": dashboard.under_load,  # main() gives it --dashboard-seconds/-screenshot
    "real_model": real_model.real_model,
    "fleet": fleet.fleet,
    "fairness": fleet.fairness,
}
# Minutes of provider pacing: left out of `--quick` unless named with `--only`.
# fleet starts 1, 8 and 32 workers, dashboard holds its pages for a while: minutes again.
NOT_QUICK = ("provider_limits", "fleet", "dashboard")
# A real model on this machine's CPU (and, the first time, a 15-minute build): `--only` only.
ONLY_WHEN_NAMED = ("real_model",)


@dataclass(frozen=True)
class Row:
    """One line of the table: where to read the figure, and its target if it has one."""

    label: str
    unit: str
    path: tuple[str, ...]  # into results["w1"] etc.; the first element names the workload
    baseline: tuple[str, ...] | None = None
    compare: str | None = None  # "<=" or ">="
    target: float | None = None


def limit_rows() -> list[Row]:
    """The provider-limits rows: per scenario, its figures and the targets of issue 12."""
    scenarios = (
        ("rate_one_worker", "20/s, 1 worker", {"failed": 0, "ratio": 1.3, "refused": 0.5}),
        ("rate_three_workers", "20/s, 3 workers", {"failed": 0, "ratio": 1.3, "refused": 0.5}),
        ("slots", "4 slots", {"failed": 0, "ratio": 2.0, "refused": None}),
        ("ceiling", "20/s, ceiling set", {"failed": None, "ratio": 1.1, "refused calls": 0}),
    )
    figures = (
        ("failed or unfinished", "", "failed_or_unfinished", "<=", "failed"),
        ("drain / provider pace", "x", "ratio_to_pace", "<=", "ratio"),
        ("refused calls per request", "", "refused_per_request", "<", "refused"),
        ("refused calls", "", "calls_refused", "<=", "refused calls"),
    )
    rows = []
    for scenario, title, targets in scenarios:
        for what, unit, key, compare, name in figures:
            if name not in targets:
                continue
            goal = targets[name]
            path = ("provider_limits", scenario, key)
            label = f"Limits, {title}: {what}"
            rows.append(Row(label, unit, path, None, compare if goal is not None else None, goal))
    return rows


LIMIT_ROWS = limit_rows()


def fleet_rows() -> list[Row]:
    """Per fleet size: claims and statements per request, pickup p50/p99 (issue 25)."""
    rows = []
    for n in (1, 8, 32):
        size = ("fleet", f"workers_{n}")
        claims_target = 1.5 if n == 8 else None
        rows += [
            Row(
                f"Fleet, {n} workers: claim statements per request",
                "",
                (*size, "claims_per_request"),
                None,
                "<=" if claims_target else None,
                claims_target,
            ),
            Row(
                f"Fleet, {n} workers: all statements per request",
                "",
                (*size, "statements_per_request"),
            ),
            Row(f"Fleet, {n} workers: commit → claim, p50", "ms", (*size, "to_claim_ms", "p50")),
            Row(f"Fleet, {n} workers: commit → claim, p99", "ms", (*size, "to_claim_ms", "p99")),
            Row(f"Fleet, {n} workers: commit → LLM call, p99", "ms", (*size, "to_llm_ms", "p99")),
        ]
    return rows


FLEET_ROWS = fleet_rows()


ROWS = [
    Row(
        "W1 commit → LLM call, p50",
        "ms",
        ("w1", "to_llm_ms", "p50"),
        ("w1_baseline", "to_llm_ms", "p50"),
        "<=",
        2.0,
    ),
    Row(
        "W1 commit → LLM call, p90",
        "ms",
        ("w1", "to_llm_ms", "p90"),
        ("w1_baseline", "to_llm_ms", "p90"),
    ),
    Row(
        "W1 commit → LLM call, p99",
        "ms",
        ("w1", "to_llm_ms", "p99"),
        ("w1_baseline", "to_llm_ms", "p99"),
        "<=",
        6.0,
    ),
    Row(
        "W1 commit → LLM call, max",
        "ms",
        ("w1", "to_llm_ms", "max"),
        ("w1_baseline", "to_llm_ms", "max"),
    ),
    Row(
        "W1 commit → claim, p50",
        "ms",
        ("w1", "to_claim_ms", "p50"),
        ("w1_baseline", "to_claim_ms", "p50"),
    ),
    Row(
        "W1 commit → claim, p99",
        "ms",
        ("w1", "to_claim_ms", "p99"),
        ("w1_baseline", "to_claim_ms", "p99"),
    ),
    # W1 again with traces exported: the planner's start is its model-call span's start.
    Row("W1 traced: commit → claim, p50", "ms", ("w1_breakdown", "to_claim_ms", "p50")),
    Row(
        "W1 traced: commit → planner start, p50",
        "ms",
        ("w1_breakdown", "to_planner_ms", "p50"),
        None,
        "<=",
        2.5,
    ),
    Row("W1 traced: commit → LLM call, p50", "ms", ("w1_breakdown", "to_llm_ms", "p50")),
    Row(
        "W2 drain, template planner",
        "req/s",
        ("w2_template", "requests_per_second"),
        None,
        ">=",
        2000,
    ),
    Row("W2 drain, openai planner", "req/s", ("w2_openai", "requests_per_second"), None, ">=", 800),
    Row("W3 slow model, total", "s", ("w3", "seconds"), ("w3_baseline", "seconds")),
    Row("W3 total / ideal", "x", ("w3", "ratio_to_ideal"), None, "<=", 1.05),
    Row("W4 fan-out, total", "s", ("w4", "seconds")),
    Row("W4 total / ideal", "x", ("w4", "ratio_to_ideal"), None, "<=", 1.15),
    Row("W4 worker peak RSS", "MB", ("w4", "peak_rss_mb"), None, "<=", 200),
    Row("W4 most DB connections open", "", ("w4", "max_connections_open"), None, "<=", 10),
    Row("Idle CPU per minute", "s", ("idle", "cpu_seconds_per_minute"), None, "<=", 0.2),
    Row("Idle statements per minute", "", ("idle", "statements_per_minute")),
    Row(
        "Idle statements not from the sweep",
        "",
        ("idle", "statements_not_from_sweep"),
        None,
        "<=",
        0,
    ),
    Row(
        "Recovery after SIGKILL, slowest",
        "s",
        ("recovery", "reclaimed_after_seconds", "max"),
        None,
        "<=",
        15,
    ),
    Row("Recovery: live claims taken over", "", ("recovery", "false_takeovers"), None, "<=", 0),
    *LIMIT_ROWS,
    Row(
        "First step: model wrote it → Mini App reads it, max",
        "s",
        ("first_step", "first_step_lag_seconds", "max"),
        None,
        "<=",
        0.3,
    ),
    Row("Every step: wrote → reads, max", "s", ("first_step", "step_lag_seconds", "max")),
    Row(
        "Last step: answer end → Mini App reads the plan, max",
        "s",
        ("first_step", "last_step_lag_seconds", "max"),
        None,
        "<=",
        0.3,
    ),
    Row("Insert → first step readable, p50", "s", ("first_step", "first_step_seconds", "p50")),
    Row("Real model: requests completed (of 6)", "", ("real_model", "completed"), None, ">=", 5),
    Row(
        "Real model: insert → first step readable, earliest",
        "s",
        ("real_model", "earliest_first_step_seconds"),
        None,
        "<=",
        15,
    ),
    Row(
        "Real model: insert → first step readable, max",
        "s",
        ("real_model", "first_step_seconds", "max"),
        None,
        "<=",
        15,
    ),
    Row("Real model: calls timed out", "", ("real_model", "timeouts"), None, "<=", 0),
    Row("Real model: failed attempts", "", ("real_model", "failed_attempts")),
    Row(
        "Real model: tokens per plan, p50", "", ("real_model", "completion_tokens_per_plan", "p50")
    ),
    Row(
        "Real model: model time per plan, p50", "s", ("real_model", "model_seconds_per_plan", "p50")
    ),
    Row(
        "Real model: insert → finished, max", "s", ("real_model", "insert_to_finish_seconds", "max")
    ),
    Row("Real model: reminders written", "", ("real_model", "reminders_written")),
    Row(
        "Progress writes per request, most (8 steps)",
        "",
        ("first_step", "progress_writes_per_request"),
        None,
        "<=",
        9,
    ),
    Row("Dashboard, 20 pages: RSS, peak", "MB", ("dashboard", "dashboard_rss_mb", "peak")),
    Row("Dashboard, 20 pages: RSS, end", "MB", ("dashboard", "dashboard_rss_mb", "end")),
    Row("Dashboard: CPU per minute", "s", ("dashboard", "dashboard_cpu_seconds_per_minute")),
    Row(
        "Dashboard: its statements per second, 20 pages",
        "",
        ("dashboard", "dashboard_statements_per_second"),
        None,
        "<=",
        1.1,
    ),
    Row(
        "Dashboard: database statements per second, all", "", ("dashboard", "statements_per_second")
    ),
    Row(
        "Dashboard: longest wait between two updates of a page",
        "s",
        ("dashboard", "longest_gap_between_updates_seconds"),
        None,
        "<=",
        2.0,
    ),
    Row(
        "Dashboard: worker's completions per second meanwhile",
        "req/s",
        ("dashboard", "finished", "completed_per_second"),
    ),
    *FLEET_ROWS,
    Row(
        "Fairness: 3 users behind one user's 20, slowest",
        "s",
        ("fairness", "others_done_after_seconds", "max"),
        None,
        "<=",
        2.5,
    ),
]

COMPARE = {"<=": operator.le, ">=": operator.ge, "<": operator.lt}


def lookup(results: dict[str, Any], path: tuple[str, ...] | None) -> float | None:
    value: Any = results
    for key in path or ():
        if not isinstance(value, dict) or key not in value:
            return None
        value = value[key]
    return float(value) if isinstance(value, int | float) else None


def evaluate(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Each row's figures and whether its target was met (None: no target or not run)."""
    table = []
    for row in ROWS:
        value = lookup(results, row.path)
        base = lookup(results, row.baseline)
        if row.path[0] not in results:
            continue  # not selected (e.g. left out of --quick)
        available = results[row.path[0]].get("available", True)
        met = None
        if row.compare and row.target is not None and available:
            # A workload that ran but could not give the figure missed its target.
            met = value is not None and COMPARE[row.compare](value, row.target)
        table.append(
            {
                "metric": row.label,
                "unit": row.unit,
                "planbus": value,
                "baseline": base,
                "baseline_ratio": base / value if base is not None and value else None,
                "target": f"{row.compare} {row.target:g}" if row.compare else None,
                "met": met,
                # A workload that could not measure on this code (e.g. a missing column).
                "available": available,
            }
        )
    return table


def number(value: float | None) -> str:
    if value is None:
        return "-"
    if value == int(value) and abs(value) >= 10:
        return f"{value:,.0f}"
    return f"{value:,.3g}" if abs(value) < 100 else f"{value:,.0f}"


def render(table: list[dict[str, Any]]) -> str:
    """A Markdown table, for the terminal and the README alike."""
    lines = [
        "| metric | planbus | baseline | baseline / planbus | target | met |",
        "| --- | ---: | ---: | ---: | --- | :---: |",
    ]
    for entry in table:
        unit = f" {entry['unit']}" if entry["unit"] else ""
        missing = "n/a" if entry.get("available", True) else "not available"
        planbus = number(entry["planbus"]) + unit if entry["planbus"] is not None else missing
        baseline = number(entry["baseline"]) + unit if entry["baseline"] is not None else ""
        ratio = f"{entry['baseline_ratio']:,.0f}x" if entry["baseline_ratio"] else ""
        target = f"{entry['target']}{unit}" if entry["target"] else ""
        met = {True: "yes", False: "**no**", None: ""}[entry["met"]]
        lines.append(f"| {entry['metric']} | {planbus} | {baseline} | {ratio} | {target} | {met} |")
    return "\n".join(lines)


def run(
    selected: list[str], quick: bool, keep: bool, profile: bool
) -> tuple[dict[str, Any], dict[str, Any]]:
    sizes = QUICK if quick else FULL
    root = Path(tempfile.mkdtemp(prefix="planbus-bench-"))
    root.chmod(0o755)  # under root the server's system user must enter it (mkdtemp: 0700)
    logs = root / "logs"
    logs.mkdir()
    pg = Postgres(root)
    llm: LLMServer | None = None
    results: dict[str, Any] = {}
    info: dict[str, Any] = {}
    try:
        pg.start()
        llm = LLMServer()
        info = {
            "postgres": pg.version,
            "postgres_settings": "defaults, fsync on; "
            "max_connections 300; pg_stat_statements loaded",
            "logs": str(logs),
        }
        bench = Bench(sizes, pg, llm, logs, profile)
        for name in selected:
            started = time.monotonic()
            print(f"-- {name} ...", file=sys.stderr, flush=True)
            results[name] = WORKLOADS[name](bench)
            results[name]["wall_seconds"] = round(time.monotonic() - started, 2)
            print(f"   {name} done in {results[name]['wall_seconds']:.1f}s", file=sys.stderr)
    finally:
        if llm is not None:
            llm.stop()
        pg.stop()
        if not keep and not profile:
            clean_directory(root)
    info["sizes"] = asdict(sizes)
    return results, info


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__)
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"small sizes: a smoke run (~1 min), without {', '.join(NOT_QUICK)} unless --only",
    )
    parser.add_argument(
        "--only",
        help=f"comma-separated workloads, from: {', '.join(WORKLOADS)} "
        f"({', '.join(ONLY_WHEN_NAMED)} only when named here)",
    )
    parser.add_argument("--output", type=Path, help="JSON file (default: benchmarks/results/)")
    parser.add_argument("--chart", type=Path, help="W1 chart (default: docs/ for a full run)")
    parser.add_argument("--keep", action="store_true", help="keep the data folder and logs")
    parser.add_argument(
        "--profile",
        action="store_true",
        help="sample each planbus worker with py-spy (pip install py-spy); implies --keep",
    )
    parser.add_argument(
        "--dashboard-seconds",
        type=float,
        help="how long the dashboard workload holds its 20 pages (default: 60; 10 with --quick)",
    )
    parser.add_argument(
        "--dashboard-screenshot",
        type=Path,
        help="the dashboard workload also saves chromium's picture of the page here",
    )
    args = parser.parse_args(argv)
    WORKLOADS["dashboard"] = partial(
        dashboard.under_load, seconds=args.dashboard_seconds, screenshot=args.dashboard_screenshot
    )
    selected = [
        name
        for name in WORKLOADS
        if name not in ONLY_WHEN_NAMED and not (args.quick and name in NOT_QUICK)
    ]
    if args.only:
        selected = [name.strip() for name in args.only.split(",")]
        unknown = set(selected) - set(WORKLOADS)
        if unknown:
            parser.error(f"unknown workloads: {', '.join(sorted(unknown))}")

    host = machine()
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    try:
        results, info = run(selected, args.quick, args.keep, args.profile)
    except BenchError as exc:
        print(f"benchmark failed: {exc}", file=sys.stderr)
        return 1
    except Exception:
        traceback.print_exc()
        return 1
    table = evaluate(results)
    output = args.output or RESULTS / f"{stamp}{'-quick' if args.quick else ''}.json"
    chart = args.chart or (output.with_suffix(".png") if args.quick or args.only else CHART)
    described = f"{host['nproc']} x {host['cpu']}, PostgreSQL {info.get('postgres', '?')}"
    print(w1_chart(results, chart, described), file=sys.stderr)
    report = {
        "when": stamp,
        "mode": "quick" if args.quick else "full",
        "machine": host,
        "setup": info,
        "table": table,
        "results": results,
    }
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, indent=1) + "\n")
    print(f"\nMachine: {described}; load average at start {host['load_average_at_start']}")
    print(render(table))
    missed = [entry["metric"] for entry in table if entry["met"] is False]
    print(f"\nResults: {output}")
    print(f"Targets missed: {', '.join(missed)}" if missed else "Every target that ran was met.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
