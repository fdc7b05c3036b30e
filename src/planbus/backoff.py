"""Exponential backoff with jitter, as a pure function: the caller supplies the randomness."""

from __future__ import annotations

import random
from collections.abc import Callable


def backoff_delay(
    attempt: int,
    *,
    base: float,
    cap: float,
    uniform: Callable[[float, float], float] = random.uniform,
) -> float:
    """Delay before retry number `attempt` (1, 2, ...): base * 2**(attempt-1), capped.

    "Equal jitter": half the delay is fixed so it keeps growing with each attempt, half is
    random so that many requests failing together do not come back together.
    """
    ceiling = min(cap, base * 2 ** max(attempt - 1, 0))
    return float(ceiling / 2 + uniform(0, ceiling / 2))
