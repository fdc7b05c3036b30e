"""The LLM provider's limits as one worker meets them: its pace, the shared pause, the ceiling.

`pacing.Pace` decides; this module feeds it and carries what it learns through PostgreSQL:

- A throttled request goes back to `pending` without spending an attempt (`THROTTLE_BACK`),
  due when the provider's pause ends; it fails only after `PLANBUS_THROTTLE_PATIENCE_SECONDS`
  of throttling without a break. A server that cannot be reached is throttling too.
- The provider's "retry after", or when it named none the backoff's pause and its count of
  refusal rounds, becomes the database's (`planbus_provider_limits`), announced by NOTIFY on
  `planbus_provider_limits`, so every worker stops calling, not only the refused one. The
  notification only says "read the row": its payload is never trusted (any role that may
  connect can send one), the row is read before the next claim.
- The optional ceiling `PLANBUS_LLM_REQUESTS_PER_MINUTE` is a token bucket row that every
  worker's claims draw from. With no ceiling set and nothing throttled, none of this sends a
  statement.
- A call that hangs holds only its own request (see `stall_age`).
"""

from __future__ import annotations

import datetime as dt
import logging
import math
import random
import time
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from psycopg_pool import AsyncConnectionPool

from planbus.bus import effects, provider_queries
from planbus.bus.claim import Claim
from planbus.bus.effects import Outcome
from planbus.bus.metrics import TokenCounters
from planbus.bus.retry import throttled_delay
from planbus.errors import PlanningError, Throttled
from planbus.llm.pacing import Pace
from planbus.llm.plan import RequestId
from planbus.settings import Settings

log = logging.getLogger(__name__)

PEER_PAUSE_JITTER = 1.5  # a peer's pause lasts 1 to 1.5 times what the provider said
CEILING_MARGIN = 0.97
BURST_MARGIN = 0.9

REFUSALS = {"rate_limited": "rate limited", "overloaded": "overloaded"}

# A call that hangs must hold only its own request. Without this, one hung call and one 429
# bring the adaptive limit to 1 (the 429 says only one call got through: the hung one), the
# hung call holds that slot, and nothing is claimed until its timeout (58 s, measured). So a
# call that has not started answering (no content yet) counts against the limit only while it
# is not much older than the answers the server gives: STALL_FACTOR times the slowest recent
# answer (a finished one, or the oldest still streaming: a call that streams is alive, and
# sets how long answers take), and at least STALL_FLOOR. Past that it is presumed hung or
# stuck in a queue: it keeps its request and its timeout, but no longer a place under the
# adaptive limit. PLANBUS_CONCURRENCY still bounds every call in flight, hung or not, so a
# server that hangs everything costs at most that many calls, never more.
STALL_FLOOR = 2.0
STALL_FACTOR = 4.0
ANSWER_TIME_DECAY = 0.98  # the slowest recent answer time shrinks by 2 % per answered call

HELD_BACK_REASONS = ("paused", "ceiling", "spacing", "limit")


class ProviderLimits:
    """One worker's side of the provider's limits."""

    def __init__(self, settings: Settings, pool: AsyncConnectionPool) -> None:
        self.settings = settings
        self.pool = pool
        self.pace = Pace(ceiling=settings.concurrency)
        per_minute = settings.llm_requests_per_minute
        # A little under the ceiling: a call reaches the provider some milliseconds after its
        # claim (more for the first call on a new connection), and that jitter must not make
        # two calls look closer together than the ceiling allows. The burst is 90 % of one
        # second's calls: a provider's own bucket holds at least that much.
        self.per_second = per_minute / 60 * CEILING_MARGIN if per_minute else None
        self.burst = max(1.0, math.floor(per_minute / 60 * BURST_MARGIN)) if per_minute else 1.0
        self._ceiling_until = -math.inf
        self.tokens: TokenCounters | None = None  # set when /metrics serves this worker
        self.stale = True  # read the database's pause and refusals before the next claim
        self._reset_refusals = False  # an answered call ended the backoff: tell the database
        self._calls: dict[RequestId, Claim] = {}  # calls in flight, by request
        self._shed: dict[RequestId, float] = {}  # calls handed back from a queue: seconds waited
        self.answer_seconds = 0.0  # the slowest recent answer, decaying

    # -- the claim loop ----------------------------------------------------------------------

    def allowed(self, inflight: int, now: float) -> int:
        """How many requests may be claimed now (each claim is one call to the provider)."""
        if now < self._ceiling_until:
            return 0
        free = max(0, self.settings.concurrency - inflight)
        # Below PLANBUS_CONCURRENCY only a cut limit can hold a claim back: while it is not
        # cut, presumed-hung calls change nothing and are not even looked for.
        if self.pace.current_limit < self.settings.concurrency:
            inflight -= self.stalled(now)
        return min(free, self.pace.allowed(inflight, now))

    def slots(self, inflight: int) -> int:
        """Free places under the adaptive limit, whether or not a pause holds them back."""
        counted = inflight - self.stalled(time.monotonic())
        free = max(0, self.settings.concurrency - inflight)
        return min(free, max(0, self.pace.current_limit - counted))

    def stall_age(self, now: float) -> float:
        """How long a call without an answer yet counts against the limit (see STALL_FLOOR)."""
        streaming = [
            now - claim.call_started for claim in self._calls.values() if _answering(claim)
        ]
        slowest = max([self.answer_seconds, *streaming])
        return max(STALL_FLOOR, STALL_FACTOR * slowest)

    def stalled(self, now: float) -> int:
        """Calls in flight presumed hung: they no longer count against the adaptive limit."""
        if not self._calls:
            return 0
        oldest = now - self.stall_age(now)
        return sum(1 for c in self._waiting() if c.call_started < oldest)

    def stall_wait(self, now: float) -> float:
        """Seconds until the next waiting call is presumed hung or queued (inf when none)."""
        starts = [claim.call_started for claim in self._waiting()]
        if not starts:
            return math.inf
        age = self.stall_age(now)
        if any(_answering(claim) for claim in self._calls.values()):
            age = min(age, self.pace.queue_age())
        upcoming = [start + age - now for start in starts if start + age >= now]
        return min(upcoming, default=math.inf)

    def shed_queued(self, now: float) -> int:
        """Hand back calls that wait in the server's queue behind calls of ours it answers.

        A server that queues instead of refusing (llama-server, Ollama, vLLM) answers a call
        at once or makes it wait: a call still without its first token long after the quickest
        first token seen (`Pace.queue_age`), while the server streams others of ours, waits
        behind planbus's own calls. Left there it would spend its timeout in that queue (6 of
        6 requests failed so against a 2-slot llama-server). It is cancelled (the server drops
        a call whose client left) and goes back as throttled, spending no attempt; the limit
        becomes the calls being answered.
        """
        if not self._calls:
            return 0
        answering = [claim for claim in self._calls.values() if _answering(claim)]
        if not answering:
            return 0
        # A call answering now is a sample too: the first round needs no finished answer.
        for claim in answering:
            assert claim.cost is not None and claim.cost.first_token_at is not None
            self.pace.first_token(claim.cost.first_token_at - claim.call_started)
        oldest = now - self.pace.queue_age()
        queued = [c for c in self._waiting() if c.call_started < oldest and c.id not in self._shed]
        if not queued:
            return 0
        self.pace.queued(len(answering))
        for claim in queued:
            self._shed[claim.id] = now - claim.call_started
            claim.scope.cancel()
        log.warning(
            "the LLM server queues calls: %d waited %.1fs+ for a first token while it answered "
            "%d; handing them back, limit %d calls in flight",
            len(queued),
            self.pace.queue_age(),
            len(answering),
            self.pace.current_limit,
        )
        return len(queued)

    def shed_error(
        self, claim: Claim, error: PlanningError | None, answered: bool
    ) -> PlanningError | None:
        """The error of a call `shed_queued` handed back (flow control), else `error`."""
        waited = self._shed.pop(claim.id, None)
        if waited is None or answered:  # answered before the cancel landed: keep the plan
            return error
        return Throttled(
            f"The LLM server kept the call waiting {waited:.1f}s in its queue behind other "
            "calls; handed back.",
            kind="queued",
        )

    def _waiting(self) -> Iterator[Claim]:
        return (claim for claim in self._calls.values() if not _answering(claim))

    def held_back(self, inflight: int, now: float) -> str | None:
        """Why nothing more is claimed now, in one line; None when a claim may go ahead."""
        if self.pace.paused(now):
            until = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=self.pace.paused_until - now)
            return (
                f"paused until {until:%H:%M:%S} UTC by the provider "
                f"({self.pace.paused_until - now:.1f}s left)"
            )
        if now < self._ceiling_until:
            return "at the ceiling PLANBUS_LLM_REQUESTS_PER_MINUTE"
        stalled = self.stalled(now)
        counted = inflight - stalled
        if inflight >= self.settings.concurrency or counted >= self.pace.current_limit:
            hung = f", {stalled} of them presumed hung" if stalled else ""
            return (
                f"at the limit of {self.pace.current_limit} LLM calls in flight "
                f"({inflight} in flight{hung}; PLANBUS_CONCURRENCY {self.settings.concurrency})"
            )
        if self.pace.wait(now) > 0:
            return f"spacing LLM calls {self.pace.spacing:.2f}s apart"
        return None

    def wait(self, now: float) -> float:
        """Seconds until a call may start again (0 when one may start now)."""
        return max(self.pace.wait(now), self._ceiling_until - now)

    async def reserve(self, conn: psycopg.AsyncConnection[Any], wanted: int) -> int:
        """Calls granted by the shared ceiling (all of `wanted` when none is set)."""
        if self.per_second is None:
            return wanted
        cursor = await conn.execute(
            provider_queries.RESERVE_CALLS,
            {"burst": self.burst, "per_second": self.per_second, "wanted": wanted},
        )
        row = await cursor.fetchone()
        granted, wait = (int(row[0]), float(row[1])) if row else (0, 1.0)
        if granted < wanted:
            self._ceiling_until = time.monotonic() + wait
        return granted

    async def refund(self, conn: psycopg.AsyncConnection[Any], unused: int) -> None:
        """Give back to the ceiling the calls granted for requests that were not there."""
        if self.per_second is not None and unused > 0:
            await conn.execute(
                provider_queries.REFUND_CALLS, {"burst": self.burst, "calls": unused}
            )

    def started(self, claim: Claim, now: float) -> None:
        """`claim`'s call to the provider starts now."""
        claim.call_started = now
        self._calls[claim.id] = claim
        self.pace.started(now)

    @property
    def ending_backoff(self) -> bool:
        """An answered call ended the backoff and the database does not know yet."""
        return self._reset_refusals

    async def sync(self, conn: psycopg.AsyncConnection[Any]) -> None:
        """Before a claim: end the shared backoff after an answer, read the shared pause."""
        if self._reset_refusals:
            self._reset_refusals = False
            await conn.execute(provider_queries.RESET_REFUSALS)
        if self.stale:
            # Cleared first: a notification arriving during the read asks for another one.
            self.stale = False
            cursor = await conn.execute(provider_queries.PAUSE_LEFT)
            row = await cursor.fetchone()
            if row:
                self.learn(float(row[0] or 0.0), int(row[1] or 0))

    # -- outcomes ----------------------------------------------------------------------------

    def answered(self, claim: Claim, error: PlanningError | None, inflight: int) -> None:
        """Feed the pace (a throttled call cuts it, an answered one grows it); count the cost."""
        now = time.monotonic()
        # Counted before this call leaves: calls presumed hung did not get through either.
        inflight -= self.stalled(now)
        self._calls.pop(claim.id, None)
        if claim.cost is not None:
            claim.cost.model_seconds = now - claim.call_started
            if self.tokens is not None:
                self.tokens.count(claim.cost)
        if isinstance(error, Throttled) and error.kind == "queued":
            return  # `shed_queued` already set the limit; the server refused nothing
        if isinstance(error, Throttled):
            was_paused = self.pace.paused(now)
            pause = self._pause_seconds(error)
            self.pace.throttled(claim.call_started, pause, now, max(1, inflight))
            if not was_paused and self.pace.paused(now):
                log.warning(
                    "LLM provider throttled request %d (%s): pausing new calls for %.2fs, "
                    "limit %d calls in flight",
                    claim.id,
                    error.kind,
                    self.pace.wait(now),
                    self.pace.current_limit,
                )
        elif error is None:
            if claim.cost is not None and claim.cost.first_token_at is not None:
                self.pace.first_token(claim.cost.first_token_at - claim.call_started)
            self._reset_refusals = self._reset_refusals or self.pace.refusals > 0
            self.answer_seconds = max(
                now - claim.call_started, self.answer_seconds * ANSWER_TIME_DECAY
            )
            self.pace.succeeded(inflight)

    def return_delay(self, claim: Claim, error: Throttled) -> float:
        """When the throttled `claim` may be claimed again (see `retry.throttled_delay`)."""
        pause_left = self.wait(time.monotonic())
        return throttled_delay(self._pause_seconds(error), pause_left, claim.throttled)

    async def throttle_back(
        self, claim: Claim, error: Throttled, delay: float, deadline: float
    ) -> Outcome:
        """Back to `pending` after `delay`, spending no attempt; `failed` past the patience.

        The database's pause becomes the provider's wait, or else this worker's backoff.
        """
        pause = self._pause_seconds(error)
        if pause is None:
            backoff = self.pace.paused_until - time.monotonic()
            pause = min(max(0.0, backoff), self.settings.throttle_patience_seconds)
        return await effects.throttle_back(
            self.pool,
            claim,
            error=error.message,
            gave_up_error=self.gave_up_error(error),
            patience_seconds=self.settings.throttle_patience_seconds,
            delay_seconds=delay,
            pause_seconds=pause,
            deadline=deadline,
            refusals=self.pace.refusals,
        )

    def gave_up_error(self, error: Throttled) -> str:
        """The sentence of a request the provider refused for longer than the patience."""
        patience = self.settings.throttle_patience_seconds
        if patience >= 120 and patience % 60 == 0:
            span = f"{patience / 60:g} minutes"
        else:
            span = f"{patience:g} second" + ("" if patience == 1 else "s")
        if error.kind == "unreachable":  # the sentence names the server (without secrets)
            return f"{error.message.removesuffix('.')} for {span}; giving up."
        refusal = REFUSALS.get(error.kind, "throttled")
        return f"The LLM provider kept refusing ({refusal}) for {span}; giving up."

    def _pause_seconds(self, error: Throttled) -> float | None:
        if error.retry_after is None:
            return None
        # A hostile or mistaken header must not stop every worker for a day: a wait longer than
        # the patience would fail the requests anyway.
        return min(error.retry_after, self.settings.throttle_patience_seconds)

    # -- what other workers learned ----------------------------------------------------------

    def learn(self, pause_left: float, refusals: int) -> None:
        """The database's pause has `pause_left` seconds left after `refusals` rounds."""
        self.pace.learn_refusals(refusals)
        if math.isfinite(pause_left) and pause_left > 0:
            # Each worker ends the shared pause at a moment of its own: resuming together, they
            # would spend the provider's one new token three times over. The patience caps the
            # jittered wait, not the announced one, so no peer pauses longer than the patience.
            seconds = pause_left * random.uniform(1.0, PEER_PAUSE_JITTER)
            seconds = min(seconds, self.settings.throttle_patience_seconds)
            now = time.monotonic()
            self.pace.pause_until(now + seconds, now)


def _answering(claim: Claim) -> bool:
    return claim.cost is not None and claim.cost.first_token_at is not None


class HeldBackCollector(Collector):
    """/metrics: why this worker claims nothing now, and the calls presumed hung."""

    def __init__(self, limits: ProviderLimits, inflight: Callable[[], int]) -> None:
        self.limits = limits
        self.inflight = inflight

    def collect(self) -> Iterator[GaugeMetricFamily]:
        now = time.monotonic()
        reason = self.limits.held_back(self.inflight(), now) or ""
        held = GaugeMetricFamily(
            "planbus_llm_held_back",
            "1 for what holds new LLM calls back now: a provider's pause, the ceiling, the "
            "spacing, or the limit on calls in flight (see `python -m planbus status`).",
            labels=["reason"],
        )
        for name in HELD_BACK_REASONS:
            held.add_metric([name], float(reason.startswith(_REASON_START[name])))
        yield held
        yield GaugeMetricFamily(
            "planbus_llm_calls_presumed_hung",
            "LLM calls in flight long past the server's answer times: not counted against "
            "the adaptive limit.",
            value=self.limits.stalled(now),
        )


_REASON_START = {
    "paused": "paused",
    "ceiling": "at the ceiling",
    "spacing": "spacing",
    "limit": "at the limit",
}
