"""The "provider limits" workload: a burst of requests against a provider that says "slow down".

Four scenarios, each on a fresh database with its own provider (`benchmarks/provider.py`) and
real `python -m planbus.listen` processes with default settings, started before the burst:

- `rate_one_worker`: `limits_requests` (300) requests inserted at once, an account allowing
  `limits_rate` (20) requests/s with a burst of `limits_burst` (20), one worker;
- `rate_three_workers`: the same with three workers sharing the account;
- `slots`: `limits_slot_requests` (100) requests against a server answering `limits_slots` (4)
  calls at once, each taking `limits_slot_delay` (0.2 s), HTTP 503 with no `retry-after` beyond
  (as Ollama with a full queue);
- `ceiling`: as `rate_one_worker`, with `PLANBUS_LLM_REQUESTS_PER_MINUTE` at the account's limit
  (60 x 20 = 1,200).

Each reports failed and unfinished requests, the drain (insert commit to the last finish) against
the provider's own pace (rate: (requests - burst) / rate, 14 s; slots: requests / slots x call
time, 5 s), and the provider's refused calls (429 + 503) per request.
"""

from __future__ import annotations

import math
import time
from typing import Any

from benchmarks.harness import WorkerProcess, seed
from benchmarks.provider import FakeProvider, insert_all, outcome, settle
from benchmarks.workloads import Bench


def provider_limits(bench: Bench) -> dict[str, Any]:
    sizes = bench.sizes
    rate_flags = (
        "--requests-per-second",
        f"{sizes.limits_rate:g}",
        "--burst",
        str(sizes.limits_burst),
    )
    rate_pace = max(sizes.limits_requests - sizes.limits_burst, 0) / sizes.limits_rate
    slot_flags = ("--slots", str(sizes.limits_slots), "--delay", f"{sizes.limits_slot_delay:g}")
    slot_pace = math.ceil(sizes.limits_slot_requests / sizes.limits_slots) * sizes.limits_slot_delay
    per_minute = str(round(sizes.limits_rate * 60))
    return {
        "rate_one_worker": _scenario(
            bench, "limits_rate_1", rate_flags, sizes.limits_requests, rate_pace, workers=1
        ),
        "rate_three_workers": _scenario(
            bench, "limits_rate_3", rate_flags, sizes.limits_requests, rate_pace, workers=3
        ),
        "slots": _scenario(
            bench, "limits_slots", slot_flags, sizes.limits_slot_requests, slot_pace, workers=1
        ),
        "ceiling": _scenario(
            bench,
            "limits_ceiling",
            rate_flags,
            sizes.limits_requests,
            rate_pace,
            workers=1,
            env={"PLANBUS_LLM_REQUESTS_PER_MINUTE": per_minute},
        ),
    }


def _scenario(
    bench: Bench,
    label: str,
    provider_flags: tuple[str, ...],
    count: int,
    pace: float,
    *,
    workers: int,
    env: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Start the provider and the workers, insert `count` requests at once, wait, count."""
    _, dsn = bench.database(label)
    seed(dsn, count, pending=False)
    provider = FakeProvider(*provider_flags)
    running: list[WorkerProcess] = []
    try:
        for n in range(workers):
            running.append(bench.planbus(dsn, f"{label}_{n}", llm=provider, env=env))
        inserted = insert_all(dsn)
        # Generous: a worker that honours the limits needs `pace`; one that fails fast, less.
        within = max(60.0, pace * 4)
        settled = settle(dsn, count, within)
        waited = time.time() - inserted
        stats = provider.stats()
    finally:
        for worker in running:
            worker.stop()
        provider.stop()
    found = outcome(dsn)
    by_status = found["by_status"]
    completed = by_status.get("completed", 0)
    finished = by_status.get("completed", 0) + by_status.get("failed", 0)
    last = found["last_finish"]
    drain = (last - inserted) if settled and last is not None else waited
    return {
        "requests": count,
        "workers": workers,
        "provider": " ".join(provider_flags),
        "environment": env or {},
        "completed": completed,
        "failed": by_status.get("failed", 0),
        "unfinished": count - finished,
        "failed_or_unfinished": count - completed,
        "drain_seconds": round(drain, 3),
        "pace_seconds": pace,
        # Only a drain that completed every request says anything about the pace.
        "ratio_to_pace": round(drain / pace, 3) if pace and completed == count else None,
        "calls_accepted": stats["accepted"],
        "calls_refused": stats["refused"],
        "refused_per_request": round(stats["refused"] / count, 3),
        "refused_by_kind": {"rate_limited": stats["rate_limited"], "busy": stats["busy"]},
        "max_calls_in_flight": stats["max_in_flight"],
        "claims_per_request": round(found["claims"] / count, 3),
    }
