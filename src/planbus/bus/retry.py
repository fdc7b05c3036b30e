"""When to try again: a small pure backoff object, and the retry decision for a failed attempt.

Nothing here sleeps or reads a clock: the caller passes `now` and the randomness, so every rule
is a plain function of its inputs (the shape of psycopg_pool's `AttemptWithBackoff`).
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass

from planbus.errors import PermanentError, PlanningError, TransientError

Uniform = Callable[[float, float], float]


def jittered(attempt: int, *, base: float, cap: float, uniform: Uniform = random.uniform) -> float:
    """Delay before retry number `attempt` (1, 2, ...): base * 2**(attempt-1), capped.

    "Equal jitter": half the delay is fixed so it keeps growing with each attempt, half is
    random so that many requests failing together do not come back together.
    """
    ceiling = min(cap, base * 2 ** max(attempt - 1, 0))
    return float(ceiling / 2 + uniform(0, ceiling / 2))


class Backoff:
    """The failures of one retried operation so far, and the delay before its next attempt."""

    def __init__(
        self,
        *,
        base: float,
        cap: float,
        deadline: float = math.inf,
        uniform: Uniform = random.uniform,
    ) -> None:
        self.base = base
        self.cap = cap
        self.deadline = deadline
        self.uniform = uniform
        self.failures = 0
        self.retry_at = -math.inf

    def failed(self, now: float) -> float:
        """Count a failure at `now`; the delay before the next attempt."""
        self.failures += 1
        delay = jittered(self.failures, base=self.base, cap=self.cap, uniform=self.uniform)
        self.retry_at = now + delay
        return delay

    def give_up(self) -> bool:
        """True when the next attempt would start past the deadline."""
        return self.retry_at > self.deadline

    def succeeded(self) -> None:
        """Start over: the next failure waits the shortest delay again."""
        self.failures = 0


# The longest a throttled request waits when the provider named no wait (Ollama's 503 does not):
# the adaptive limit, not this delay, is what keeps such a server from being flooded.
THROTTLED_RETURN_CAP = 2.0


def throttled_delay(
    provider_wait: float | None,
    pause_left: float,
    throttled_before: int,
    uniform: Uniform = random.uniform,
) -> float:
    """When a throttled request may be claimed again: when the provider's wait (or the worker's
    pause) ends; without either, after a short jittered delay, so refusals do not return
    together."""
    delay = max(provider_wait or 0.0, pause_left)
    if delay > 0:
        return delay
    return jittered(throttled_before + 1, base=0.1, cap=THROTTLED_RETURN_CAP, uniform=uniform)


@dataclass(frozen=True, slots=True)
class RetryDecision:
    """What becomes of a failed attempt: `final` fails the request, else retry after `delay`."""

    final: bool
    delay: float


def decide(
    error: PlanningError,
    attempt: int,
    *,
    max_attempts: int,
    base: float,
    cap: float,
    uniform: Uniform = random.uniform,
) -> RetryDecision:
    """A permanent error or a spent attempt budget is final; otherwise back off, never sooner
    than the server's own `retry_after` (itself capped, so a hostile header cannot park a
    request for a year)."""
    if isinstance(error, PermanentError) or attempt >= max_attempts:
        return RetryDecision(final=True, delay=0.0)
    delay = jittered(attempt, base=base, cap=cap, uniform=uniform)
    if isinstance(error, TransientError) and error.retry_after is not None:
        delay = max(delay, min(error.retry_after, cap))
    return RetryDecision(final=False, delay=delay)
