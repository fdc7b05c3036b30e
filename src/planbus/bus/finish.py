"""How an attempt ends: the plan stored, or the request given back (retry, throttled) or failed.

The worker calls `Finisher.finish` once per attempt, after the planner answered; the fenced
writes themselves are in `effects` (and `throttling` for the throttled give-back).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg_pool import AsyncConnectionPool

from planbus.bus import effects
from planbus.bus.claim import Claim
from planbus.bus.effects import Outcome
from planbus.bus.retry import RetryDecision, decide, jittered
from planbus.bus.throttling import ProviderLimits
from planbus.errors import PlanningError, Throttled, one_line
from planbus.settings import Settings

log = logging.getLogger("planbus.bus.worker")


@dataclass(slots=True)
class Finisher:
    """The end of each attempt, for one worker."""

    settings: Settings
    pool: AsyncConnectionPool
    completions: effects.Completions
    limits: ProviderLimits
    write_deadline: Callable[[], float]  # Leases.write_deadline

    def decide(self, claim: Claim, error: PlanningError) -> RetryDecision:
        if isinstance(error, Throttled):  # flow control: patience, not attempts, ends it
            return RetryDecision(final=False, delay=self.limits.return_delay(claim, error))
        if error.kind == effects.STORE_FAILED:  # the database's fault never fails a request
            delay = jittered(
                claim.spent_attempts,
                base=self.settings.retry_base_seconds,
                cap=self.settings.retry_max_seconds,
            )
            return RetryDecision(final=False, delay=delay)
        return decide(
            error,
            claim.spent_attempts,
            max_attempts=self.settings.max_attempts,
            base=self.settings.retry_base_seconds,
            cap=self.settings.retry_max_seconds,
        )

    async def finish(
        self, claim: Claim, plan: Any, error: PlanningError | None
    ) -> tuple[Outcome, PlanningError | None, RetryDecision | None]:
        """Store the plan, or give the request back for a retry or fail it; what happened."""
        deadline = self.write_deadline()
        retry = None
        try:
            if error is None:
                try:
                    return await self.completions.complete(claim, plan, deadline), None, None
                except PlanningError as exc:  # the plan cannot be stored: invalid output
                    error = exc
                except psycopg.Error as exc:  # the database's, retried until the deadline
                    error, deadline = effects.store_failed(claim, exc), time.monotonic()
            retry = self.decide(claim, error)
            if isinstance(error, Throttled):
                outcome = await self.limits.throttle_back(claim, error, retry.delay, deadline)
                return outcome, error, retry
            outcome = await effects.give_back(
                self.pool,
                claim,
                error=error.message,
                final=retry.final,
                delay_seconds=retry.delay,
                deadline=deadline,
            )
            return outcome, error, retry
        except psycopg.Error as exc:
            # The claim stays `processing`; its lease lapses and the sweep hands it on.
            log.error("request %d: could not record its outcome (%s)", claim.id, one_line(exc))
            return "lost", error, retry
