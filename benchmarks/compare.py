"""`python -m benchmarks.compare --before DIR`: the same workloads, old code against new.

Measurements on a shared machine are noisy, so a change is judged side by side: each round
runs every selected workload once with planbus from DIR (a copy of the repository's `src/`
and `alembic/` taken before the change) and once with this checkout, alternating which goes
first, and the table shows the median of each figure, the ratio of the medians new / old, and
the paired ratio: the median of each round's new / old.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

from benchmarks.harness import LLMServer, Postgres, clean_directory, machine
from benchmarks.run import RESULTS, WORKLOADS, lookup
from benchmarks.workloads import FULL, QUICK, Bench

# The figures worth comparing, by workload.
FIGURES: dict[str, list[tuple[str, ...]]] = {
    "w1": [("to_llm_ms", "p50"), ("to_llm_ms", "p99"), ("to_claim_ms", "p50")],
    "w1_breakdown": [
        ("to_claim_ms", "p50"),
        ("to_planner_ms", "p50"),
        ("to_llm_ms", "p50"),
        ("to_llm_ms", "p99"),
    ],
    "w2_template": [
        ("requests_per_second",),
        ("worker_cpu_ms_per_request",),
        ("postgres_cpu_ms_per_request",),
    ],
    "w2_openai": [
        ("requests_per_second",),
        ("worker_cpu_ms_per_request",),
        ("postgres_cpu_ms_per_request",),
    ],
    "w3": [("seconds",), ("ratio_to_ideal",)],
    "w4": [("seconds",), ("ratio_to_ideal",), ("peak_rss_mb",), ("max_connections_open",)],
    "idle": [("cpu_seconds_per_minute",), ("statements_per_minute",)],
    "fleet": [
        (f"workers_{n}", *figure)
        for n in (1, 8, 32)
        for figure in (
            ("claims_per_request",),
            ("statements_per_request",),
            ("to_claim_ms", "p50"),
            ("to_claim_ms", "p99"),
            ("to_llm_ms", "p50"),
            ("to_llm_ms", "p99"),
        )
    ],
    "fairness": [("others_done_after_seconds", "max")],
    "real_model": [
        ("completed",),
        ("failed_attempts",),
        ("timeouts",),
        ("first_step_seconds", "p50"),
        ("first_step_seconds", "max"),
        ("earliest_first_step_seconds",),
        ("completion_tokens_per_plan", "p50"),
        ("model_seconds_per_plan", "p50"),
        ("insert_to_finish_seconds", "max"),
    ],
}


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.compare", description=__doc__)
    parser.add_argument("--before", type=Path, required=True, help="folder with src/, alembic/")
    parser.add_argument("--only", default="w2_template,w2_openai")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    selected = [name.strip() for name in args.only.split(",") if name.strip() in FIGURES]
    root = Path(tempfile.mkdtemp(prefix="planbus-compare-"))
    root.chmod(0o755)  # under root the server's system user must enter it (mkdtemp: 0700)
    (root / "logs").mkdir()
    pg = Postgres(root)
    llm: LLMServer | None = None
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {
        name: {"before": [], "after": []} for name in selected
    }
    try:
        pg.start()
        llm = LLMServer()
        bench = Bench(QUICK if args.quick else FULL, pg, llm, root / "logs")
        for round_number in range(args.repeat):
            order = ["before", "after"] if round_number % 2 == 0 else ["after", "before"]
            for name in selected:
                for which in order:
                    bench.source = args.before.resolve() if which == "before" else None
                    print(f"-- round {round_number + 1}: {name} {which}", file=sys.stderr)
                    runs[name][which].append(WORKLOADS[name](bench))
    finally:
        if llm is not None:
            llm.stop()
        pg.stop()
        clean_directory(root)

    lines = [
        "| figure | before (median) | after (median) | after / before | paired |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for name in selected:
        for path in FIGURES[name]:
            before = [lookup(r, path) for r in runs[name]["before"]]
            after = [lookup(r, path) for r in runs[name]["after"]]
            if all(v is None for v in before) or all(v is None for v in after):
                continue  # not measured on one side (e.g. a fleet size --quick leaves out)
            medians = [
                statistics.median(v for v in side if v is not None) for side in (before, after)
            ]
            ratio = medians[1] / medians[0] if medians[0] else float("nan")
            label = f"{name} {'.'.join(path)}"
            lines.append(
                f"| {label} | {medians[0]:.4g} | {medians[1]:.4g} | {ratio:.2f} "
                f"| {paired_ratio(before, after):.2f} |"
            )
    host = machine()
    print(f"Machine: {host['nproc']} x {host['cpu']}; rounds: {args.repeat}")
    print("\n".join(lines))
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / "compare-latest.json"
    out.write_text(json.dumps({"machine": host, "runs": runs}, indent=1) + "\n")
    print(f"Results: {out}")
    return 0


def paired_ratio(before: list[Any], after: list[Any]) -> float:
    """The median of each round's after / before. The two runs of a round are seconds apart,
    so they share the machine's mood of the moment, which moves a figure by 20 % between
    rounds on a shared machine: the paired ratio is the steadier judge of a small change."""
    ratios = [a / b for b, a in zip(before, after, strict=True) if a is not None and b]
    return statistics.median(ratios) if ratios else float("nan")


if __name__ == "__main__":
    sys.exit(main())
