"""W1 with traces on: where the time from the insert's commit to the model call goes.

The same steady inserts as W1, with the worker exporting its spans to a real OTLP/HTTP receiver
on loopback (`tests/otlp_receiver.py`). Each attempt's model-call span starts at the moment the
worker calls the planner, so per request: commit → claim (the row's `claimed_at`), commit →
planner start (that span's start), commit → the request's arrival at the LLM server (as W1).
Tracing notes only times before the model call and builds its spans after the attempt's last
write (docs/performance.md, "Traces"), so the stages are W1's; W1 itself stays untraced.
"""

from __future__ import annotations

import time
from typing import Any

from benchmarks.harness import percentiles
from benchmarks.workloads import Bench, timed_pickups
from tests.otlp_receiver import OtlpReceiver

MODEL_CALL = "chat "  # the model-call span's name: "chat {model}"


def breakdown(bench: Bench) -> dict[str, Any]:
    with OtlpReceiver() as receiver:
        env = {"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.url, "OTEL_BSP_SCHEDULE_DELAY": "100"}
        result, committed = timed_pickups(bench, env=env)
        asked = _planner_starts(receiver, set(committed), within=10.0)
    to_planner = [(asked[rid] - at) * 1000 for rid, at in committed.items() if rid in asked]
    # None from code that exports no spans (a `compare --before` copy from before traces).
    result["to_planner_ms"] = percentiles(to_planner) if to_planner else None
    result["spans_missing"] = len(committed) - len(to_planner)
    result["samples_to_planner_ms"] = [round(x, 3) for x in to_planner]
    return result


def _planner_starts(receiver: OtlpReceiver, ids: set[int], within: float) -> dict[int, float]:
    """Each request's model-call start (seconds since the epoch), once every span arrived (the
    worker exports what is left when it stops, which `timed_pickups` has waited for)."""
    deadline = time.monotonic() + within
    while True:
        found = {
            int(span.attributes["planbus.request.id"]): span.start_ns / 1e9
            for span in list(receiver.spans)
            if span.name.startswith(MODEL_CALL)
        }
        if ids <= set(found) or time.monotonic() > deadline:
            return found
        time.sleep(0.1)
