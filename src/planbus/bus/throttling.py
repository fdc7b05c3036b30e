"""The LLM provider's limits as one worker meets them: its pace, the shared pause, the ceiling.

`pacing.Pace` decides; this module feeds it and carries what it learns through PostgreSQL:

- A throttled request goes back to `pending` without spending an attempt (`THROTTLE_BACK`),
  due when the provider's pause ends; it fails only after `PLANBUS_THROTTLE_PATIENCE_SECONDS`
  of throttling without a break.
- The provider's "retry after" becomes the database's pause, announced by NOTIFY on
  `planbus_provider_limits`, so every worker stops calling, not only the refused one. A worker
  reads the pause itself only when its LISTEN connection (re)connects.
- The optional ceiling `PLANBUS_LLM_REQUESTS_PER_MINUTE` is a token bucket row that every
  worker's claims draw from. With no ceiling set and nothing throttled, none of this sends a
  statement.
"""

from __future__ import annotations

import logging
import math
import random
import time
from typing import Any

import psycopg
from psycopg_pool import AsyncConnectionPool

from planbus.bus import effects, queries
from planbus.bus.claim import Claim
from planbus.bus.effects import Outcome
from planbus.bus.metrics import TokenCounters
from planbus.bus.retry import throttled_delay
from planbus.errors import PlanningError, Throttled
from planbus.llm.pacing import Pace
from planbus.settings import Settings

log = logging.getLogger(__name__)

PEER_PAUSE_JITTER = 1.5  # a peer's pause lasts 1 to 1.5 times what the provider said
CEILING_MARGIN = 0.97
BURST_MARGIN = 0.9

REFUSALS = {"rate_limited": "rate limited", "overloaded": "overloaded"}


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

    # -- the claim loop ----------------------------------------------------------------------

    def allowed(self, inflight: int, now: float) -> int:
        """How many requests may be claimed now (each claim is one call to the provider)."""
        if now < self._ceiling_until:
            return 0
        return self.pace.allowed(inflight, now)

    def slots(self, inflight: int) -> int:
        """Free places under the adaptive limit, whether or not a pause holds them back."""
        return max(0, self.pace.current_limit - inflight)

    def wait(self, now: float) -> float:
        """Seconds until a call may start again (0 when one may start now)."""
        return max(self.pace.wait(now), self._ceiling_until - now)

    async def reserve(self, conn: psycopg.AsyncConnection[Any], wanted: int) -> int:
        """Calls granted by the shared ceiling (all of `wanted` when none is set)."""
        if self.per_second is None:
            return wanted
        cursor = await conn.execute(
            queries.RESERVE_CALLS,
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
            await conn.execute(queries.REFUND_CALLS, {"burst": self.burst, "calls": unused})

    def started(self, claim: Claim, now: float) -> None:
        """`claim`'s call to the provider starts now."""
        claim.call_started = now
        self.pace.started(now)

    # -- outcomes ----------------------------------------------------------------------------

    def answered(self, claim: Claim, error: PlanningError | None, inflight: int) -> None:
        """Feed the pace (a throttled call cuts it, an answered one grows it); count the cost."""
        now = time.monotonic()
        if claim.cost is not None:
            claim.cost.model_seconds = now - claim.call_started
            if self.tokens is not None:
                self.tokens.count(claim.cost)
        if isinstance(error, Throttled):
            was_paused = self.pace.paused(now)
            pause = self._pause_seconds(error)
            self.pace.throttled(claim.call_started, pause, now, inflight)
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
            self.pace.succeeded(inflight)

    def return_delay(self, claim: Claim, error: Throttled) -> float:
        """When the throttled `claim` may be claimed again (see `retry.throttled_delay`)."""
        pause_left = self.wait(time.monotonic())
        return throttled_delay(self._pause_seconds(error), pause_left, claim.throttled)

    async def throttle_back(
        self, claim: Claim, error: Throttled, delay: float, deadline: float
    ) -> Outcome:
        """Back to `pending` after `delay`, spending no attempt; `failed` past the patience."""
        return await effects.throttle_back(
            self.pool,
            claim,
            error=error.message,
            gave_up_error=self.gave_up_error(error),
            patience_seconds=self.settings.throttle_patience_seconds,
            delay_seconds=delay,
            pause_seconds=self._pause_seconds(error) or 0.0,
            deadline=deadline,
        )

    def gave_up_error(self, error: Throttled) -> str:
        """The sentence of a request the provider refused for longer than the patience."""
        patience = self.settings.throttle_patience_seconds
        if patience >= 120 and patience % 60 == 0:
            span = f"{patience / 60:g} minutes"
        else:
            span = f"{patience:g} second" + ("" if patience == 1 else "s")
        refusal = REFUSALS.get(error.kind, "throttled")
        return f"The LLM provider kept refusing ({refusal}) for {span}; giving up."

    def _pause_seconds(self, error: Throttled) -> float | None:
        if error.retry_after is None:
            return None
        # A hostile or mistaken header must not stop every worker for a day: a wait longer than
        # the patience would fail the requests anyway.
        return min(error.retry_after, self.settings.throttle_patience_seconds)

    # -- what other workers learned ----------------------------------------------------------

    def paused_elsewhere(self, payload: str) -> None:
        """A peer's NOTIFY: the database's pause has `payload` seconds left."""
        try:
            seconds = float(payload)
        except ValueError:
            log.warning("ignored a provider pause notification with payload %r", payload[:40])
            return
        if math.isfinite(seconds) and seconds > 0:
            # Each worker ends the shared pause at a moment of its own: resuming together, they
            # would spend the provider's one new token three times over. The patience caps the
            # jittered wait, not the announced one, so no peer pauses longer than the patience.
            seconds *= random.uniform(1.0, PEER_PAUSE_JITTER)
            seconds = min(seconds, self.settings.throttle_patience_seconds)
            now = time.monotonic()
            self.pace.pause_until(now + seconds, now)

    async def catch_up(self, conn: psycopg.AsyncConnection[Any]) -> None:
        """Read the database's pause (after LISTEN (re)connects, when notices may be missed)."""
        cursor = await conn.execute(queries.PAUSE_LEFT)
        row = await cursor.fetchone()
        if row and row[0]:
            self.paused_elsewhere(str(row[0]))
