"""The retry rules as pure functions: no clock, no sleep, the randomness passed in."""

from __future__ import annotations

import pytest

from planbus.bus.retry import Backoff, RetryDecision, decide, jittered
from planbus.errors import PermanentError, PlanningError, TransientError


def lowest(low: float, high: float) -> float:
    return low


def highest(low: float, high: float) -> float:
    return high


def test_delay_doubles_per_attempt_and_stops_at_the_cap() -> None:
    ceilings = [jittered(n, base=1.0, cap=5.0, uniform=highest) for n in range(1, 6)]
    assert ceilings == [1.0, 2.0, 4.0, 5.0, 5.0]


def test_half_of_each_delay_is_fixed_and_half_is_jitter() -> None:
    assert jittered(3, base=1.0, cap=60.0, uniform=lowest) == 2.0
    assert jittered(3, base=1.0, cap=60.0, uniform=highest) == 4.0


def test_backoff_grows_with_each_failure_and_starts_over_after_a_success() -> None:
    backoff = Backoff(base=0.1, cap=2.0, uniform=highest)
    assert [backoff.failed(now=0.0) for _ in range(3)] == [0.1, 0.2, 0.4]
    backoff.succeeded()
    assert backoff.failed(now=0.0) == 0.1


def test_backoff_gives_up_when_the_next_attempt_would_start_past_its_deadline() -> None:
    backoff = Backoff(base=1.0, cap=2.0, deadline=10.0, uniform=highest)
    assert backoff.failed(now=8.5) == 1.0
    assert not backoff.give_up()
    assert backoff.failed(now=8.5) == 2.0
    assert backoff.give_up()


def decide_attempt(error: PlanningError, attempt: int) -> RetryDecision:
    """The decision with three attempts, 2 s base delay, 300 s cap and the highest jitter."""
    return decide(error, attempt, max_attempts=3, base=2.0, cap=300.0, uniform=highest)


def test_a_permanent_error_is_final_at_once() -> None:
    assert decide_attempt(PermanentError("no"), 1).final


def test_a_transient_error_backs_off_until_the_attempts_are_spent() -> None:
    first, second, third = (decide_attempt(TransientError("busy"), n) for n in (1, 2, 3))
    assert first == RetryDecision(final=False, delay=2.0)
    assert second == RetryDecision(final=False, delay=4.0)
    assert third.final


@pytest.mark.parametrize(("retry_after", "delay"), [(0.5, 2.0), (30.0, 30.0), (10_000.0, 300.0)])
def test_retry_after_is_honoured_but_never_beyond_the_cap(retry_after: float, delay: float) -> None:
    error = TransientError("rate limited", retry_after=retry_after)
    assert decide_attempt(error, 1) == RetryDecision(final=False, delay=delay)
