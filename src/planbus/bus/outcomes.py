"""How an attempt ended, as the logs and the metrics name it."""

from __future__ import annotations

import logging
import time

from planbus.bus.claim import Claim
from planbus.bus.effects import Outcome
from planbus.bus.metrics import WorkerMetrics
from planbus.bus.retry import RetryDecision
from planbus.errors import PermanentError, PlanningError, Throttled
from planbus.logs import request_fields

# These are the worker's own lines: operators filter on this logger name.
log = logging.getLogger("planbus.worker")

# The outcome of an attempt as logs and metrics name it; `pending` means a retry is scheduled.
OUTCOME_LABELS = {"completed": "completed", "pending": "retry", "failed": "failed", "lost": "lost"}


def report_outcome(
    claim: Claim,
    outcome: Outcome,
    error: PlanningError | None,
    retry: RetryDecision | None,
    metrics: WorkerMetrics,
) -> None:
    """Log how an attempt ended, with the request's fields, and count it."""
    elapsed_ms = (time.monotonic() - claim.started) * 1000
    label = OUTCOME_LABELS[outcome]
    metrics.finished(label, elapsed_ms / 1000, error)
    fields = request_fields(claim.id, claim.lead_id, claim.attempt, label, elapsed_ms)
    if error is not None:
        fields["error"] = error.message
    where = f"request {claim.id} lead {claim.lead_id} attempt {claim.attempt}"
    if outcome == "completed":
        log.info("%s completed in %.0f ms", where, elapsed_ms, extra=fields)
    elif outcome == "pending" and isinstance(error, Throttled):
        # Flow control, not a failure: one line per refusal, at INFO.
        log.info(
            "%s throttled by the LLM provider, back in %.2fs: %s",
            where,
            retry.delay if retry else 0.0,
            error.message,
            extra=fields,
        )
    elif outcome == "pending":
        log.warning(
            "%s failed, retrying in %.1fs: %s",
            where,
            retry.delay if retry else 0.0,
            error.message if error else "",
            extra=fields,
        )
    elif outcome == "failed":
        level = logging.ERROR if isinstance(error, PermanentError) else logging.WARNING
        log.log(
            level, "%s failed for good: %s", where, error.message if error else "", extra=fields
        )
    else:
        log.warning("%s: claim was taken over; wrote nothing", where, extra=fields)
