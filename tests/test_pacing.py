"""The pace of one worker's LLM calls: AIMD limit, spacing and pause, as a pure object."""

from __future__ import annotations

import re
import time
import uuid

import pytest

from planbus.bus.claim import Claim
from planbus.bus.throttling import STALL_FLOOR, ProviderLimits
from planbus.llm.pacing import BACKOFF_CAP, MAX_SPACING, Pace, backoff_seconds
from planbus.settings import load_settings


def test_a_new_pace_allows_the_configured_concurrency() -> None:
    pace = Pace(ceiling=32)
    assert pace.current_limit == 32
    assert pace.allowed(inflight=0, now=0.0) == 32
    assert pace.allowed(inflight=30, now=0.0) == 2
    assert pace.allowed(inflight=40, now=0.0) == 0


def test_a_throttled_call_cuts_the_limit_and_a_burst_of_refusals_counts_once() -> None:
    pace = Pace(ceiling=32)
    for _ in range(12):  # twelve calls started together, refused together
        pace.throttled(started=0.0, retry_after=None, now=1.0)
    assert pace.current_limit == 24
    assert pace.throttled_calls == 12
    # A call started after the cut and refused again is new evidence: cut again.
    pace.throttled(started=1.5, retry_after=None, now=2.0)
    assert pace.current_limit == 18


def test_the_limit_never_drops_below_one() -> None:
    pace = Pace(ceiling=4)
    for second in range(20):
        pace.throttled(started=float(second), retry_after=None, now=second + 0.5)
    assert pace.current_limit == 1
    assert pace.allowed(inflight=0, now=100.0) == 1


def test_successes_grow_the_limit_by_one_per_limit_successes_up_to_the_ceiling() -> None:
    pace = Pace(ceiling=6, limit=4)
    for _ in range(3):
        pace.succeeded(inflight=4)
    assert pace.current_limit == 4
    pace.succeeded(inflight=4)
    assert pace.current_limit == 5
    for _ in range(100):
        pace.succeeded(inflight=6)
    assert pace.current_limit == 6


def test_an_unused_limit_does_not_grow() -> None:
    pace = Pace(ceiling=32, limit=8)
    for _ in range(100):
        pace.succeeded(inflight=1)  # one call at a time says nothing about eight
    assert pace.current_limit == 8


def test_retry_after_pauses_every_new_call_until_it_ends() -> None:
    pace = Pace(ceiling=8)
    pace.throttled(started=0.0, retry_after=2.0, now=1.0)
    assert pace.paused(1.5)
    assert pace.allowed(inflight=0, now=2.9) == 0
    assert pace.wait(2.0) == pytest.approx(1.0)
    assert not pace.paused(3.0)
    assert pace.allowed(inflight=0, now=3.0) >= 1
    assert pace.paused_seconds == pytest.approx(2.0)


def test_overlapping_pauses_count_their_union() -> None:
    pace = Pace(ceiling=8)
    pace.pause_until(5.0, now=1.0)
    pace.pause_until(4.0, now=2.0)  # inside the first: nothing new
    pace.pause_until(7.0, now=3.0)  # two more seconds
    assert pace.paused_until == 7.0
    assert pace.paused_seconds == pytest.approx(6.0)


def test_after_a_rate_limit_calls_start_one_spacing_apart() -> None:
    pace = Pace(ceiling=32)
    # A token bucket that ran dry: "retry after 50 ms", one token's time.
    pace.throttled(started=0.0, retry_after=0.05, now=0.0)
    assert pace.allowed(inflight=0, now=0.05) == 1
    pace.started(0.05)
    assert pace.allowed(inflight=1, now=0.07) == 0
    assert pace.wait(0.07) == pytest.approx(0.03)
    assert pace.allowed(inflight=1, now=0.1) == 1


def test_successes_narrow_the_spacing_until_calls_are_unpaced_again() -> None:
    pace = Pace(ceiling=32)
    pace.throttled(started=0.0, retry_after=0.05, now=0.0)
    for _ in range(50):
        pace.succeeded(inflight=1)
    assert 0 < pace.spacing < 0.05
    for _ in range(1000):
        pace.succeeded(inflight=1)
    assert pace.spacing == 0.0
    assert pace.allowed(inflight=0, now=10.0) > 1


def test_a_refusal_while_paced_widens_the_spacing() -> None:
    pace = Pace(ceiling=32)
    pace.throttled(started=0.0, retry_after=0.05, now=0.0)
    pace.throttled(started=1.0, retry_after=0.01, now=1.0)
    assert pace.spacing == pytest.approx(0.05 * 4 / 3)


def test_a_burst_of_refusals_brings_the_limit_down_to_the_calls_that_got_through() -> None:
    pace = Pace(ceiling=32)
    # 32 calls in flight against 4 slots: 28 are refused at once, 4 are being answered.
    for refused in range(28):
        pace.throttled(started=0.0, retry_after=None, now=0.01, inflight=32 - refused)
    assert pace.current_limit == 4


def test_a_refusal_with_nothing_else_in_flight_leaves_one_call() -> None:
    pace = Pace(ceiling=32)
    pace.throttled(started=0.0, retry_after=None, now=1.0, inflight=1)
    assert pace.current_limit == 1


def test_a_peers_pause_never_exceeds_the_patience_even_with_its_jitter() -> None:
    settings = load_settings(
        {"database_url": "postgresql:///unused", "throttle_patience_seconds": 60}
    )
    limits = ProviderLimits(settings, pool=None)  # type: ignore[arg-type]  # never touched here
    for _ in range(50):
        limits.learn(60.0, 0)
        assert limits.pace.paused_until <= time.monotonic() + 60.0


def test_a_long_retry_after_pauses_but_never_becomes_the_spacing() -> None:
    pace = Pace(ceiling=32)
    pace.throttled(started=0.0, retry_after=600.0, now=0.0)  # the patience: a pause, not a pace
    assert pace.paused(599.0)
    assert pace.spacing <= MAX_SPACING
    pace.throttled(started=1.0, retry_after=0.05, now=1.0)
    pace.throttled(started=2.0, retry_after=600.0, now=2.0)
    assert pace.spacing <= MAX_SPACING


def test_the_spacing_never_grows_past_its_cap() -> None:
    pace = Pace(ceiling=32)
    for second in range(100):
        pace.throttled(started=float(second), retry_after=0.5, now=second + 0.5)
    assert pace.spacing == MAX_SPACING


def test_the_spacing_decays_with_time_without_successes() -> None:
    pace = Pace(ceiling=32)
    pace.throttled(started=0.0, retry_after=0.5, now=0.0)
    pace.started(0.0)
    # An hour without a refusal (and without a call): calls start unpaced again.
    assert pace.allowed(inflight=0, now=3600.0) > 1
    assert pace.spacing == 0.0


def test_refusals_that_name_no_wait_back_off_exponentially_and_space_the_calls() -> None:
    pace = Pace(ceiling=32)
    pauses = []
    for round_ in range(50):  # each refused call started after the previous refusal
        now = pace.paused_until if pace.paused_until > 0 else float(round_)
        pace.throttled(started=now, retry_after=None, now=now + 0.01, uniform=lambda a, b: b)
        pauses.append(pace.paused_until - (now + 0.01))
    assert pace.current_limit == 1
    assert pace.spacing == MAX_SPACING
    assert pauses[0] <= 0  # one round alone is the limit's probe: no pause
    assert pauses[1:6] == pytest.approx([0.25, 0.5, 1.0, 2.0, BACKOFF_CAP])
    assert max(pauses) == pytest.approx(BACKOFF_CAP)


def test_an_answered_call_ends_the_backoff() -> None:
    pace = Pace(ceiling=32)
    for second in range(5):
        pace.throttled(started=float(second), retry_after=None, now=second + 0.5)
    assert pace.refusals == 5
    pace.succeeded(inflight=1)
    assert pace.refusals == 0
    assert backoff_seconds(pace.refusals + 1) == 0.0


def limits_for_tests(concurrency: int = 32) -> ProviderLimits:
    settings = load_settings({"database_url": "postgresql:///unused", "concurrency": concurrency})
    return ProviderLimits(settings, pool=None)  # type: ignore[arg-type]  # never touched here


def test_held_back_says_why_nothing_is_claimed() -> None:
    limits = limits_for_tests()
    now = time.monotonic()
    assert limits.held_back(inflight=0, now=now) is None
    limits.pace.throttled(started=now - 1, retry_after=None, now=now, inflight=1)
    assert limits.held_back(inflight=1, now=now) == (
        "at the limit of 1 LLM calls in flight (1 in flight; PLANBUS_CONCURRENCY 32)"
    )
    limits.pace.pause_until(now + 30, now)
    reason = limits.held_back(inflight=1, now=now)
    assert reason is not None
    assert re.fullmatch(r"paused until \d\d:\d\d:\d\d UTC by the provider \(30\.0s left\)", reason)


@pytest.mark.anyio  # a Claim's cancel scope needs an event loop
async def test_a_call_long_past_the_servers_answer_times_stops_holding_a_place() -> None:
    limits = limits_for_tests()
    hung = Claim.from_row(claim_row(1))
    start = time.monotonic()
    limits.started(hung, start)
    limits.pace.throttled(started=start, retry_after=None, now=start + 0.1, inflight=1)
    assert limits.allowed(inflight=1, now=start + 0.2) == 0
    assert limits.stall_wait(start + 0.2) == pytest.approx(STALL_FLOOR - 0.2)
    later = start + STALL_FLOOR + 0.1
    assert limits.allowed(inflight=1, now=later) == 1
    assert limits.held_back(inflight=1, now=later) is None
    assert limits.held_back(inflight=2, now=later) == (
        "at the limit of 1 LLM calls in flight (2 in flight, 1 of them presumed hung; "
        "PLANBUS_CONCURRENCY 32)"
    )


@pytest.mark.anyio
async def test_presumed_hung_calls_never_lift_the_configured_concurrency() -> None:
    limits = limits_for_tests(concurrency=2)
    start = time.monotonic()
    for request_id in (1, 2):
        limits.started(Claim.from_row(claim_row(request_id)), start)
    assert limits.allowed(inflight=2, now=start + 600) == 0


def claim_row(request_id: int) -> dict[str, object]:
    return {
        "id": request_id,
        "lead_id": request_id,
        "telegram_id": 42,
        "attempts": 1,
        "throttled_claims": 0,
        "claim_token": uuid.uuid4(),
        "waited_seconds": 0.0,
        "lead_found": False,
        "traceparent": None,
    }
