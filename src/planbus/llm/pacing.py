"""How fast one worker calls the LLM provider: a small pure object, fed by outcomes, read by claims.

Three things, each learned from the provider's answers, none from a clock of its own (every
method takes `now`, a monotonic time, from the caller):

- **The concurrency limit** (calls in flight), additive-increase / multiplicative-decrease as
  TCP and adaptive concurrency limiters do. A throttled call cuts it by a quarter; successes
  grow it by one per `limit` successes (about one per round trip), and only while the limit
  is really in use, so an idle worker does not "learn" a limit it never tried (Netflix's
  AIMDLimit grows the same way). It never exceeds `PLANBUS_CONCURRENCY` nor drops below 1.
- **The spacing** between call starts, for providers that limit requests per second rather
  than calls at once. A throttled call sets it to the provider's own wait (a token bucket that
  ran dry answers "retry after one token's time") or widens it by a third, never beyond
  `MAX_SPACING`; each success narrows it by 2 % and each minute without a refusal halves it, so
  the pace creeps back up until the provider says "slow down" again, even when calls are few.
- **The pause**: a `retry-after` stops every new call of the worker until it ends.
- **The backoff**, for refusals that name no wait (HTTP 429/503/529 without `retry-after`, a
  server that cannot be reached): from the second round of them in a row, each round pauses
  for twice as long as the one before, with jitter, up to `BACKOFF_CAP`; an answered call
  starts over. One round alone is the limit's ordinary probe (it grew one call past what the
  provider serves) and is answered by the cut, not by a pause. Without it the pause
  is empty and the refused requests come straight back: one worker made 536 calls in a 20 s
  storm for 30 requests. `refusals` is shared through PostgreSQL so that every worker backs
  off together (bus/throttling.py).

- **The queue**, for servers that queue calls instead of refusing them (llama.cpp's
  `llama-server -np 2`, Ollama, vLLM): the quickest time to first token seen is what the
  server takes when it serves a call at once. A call still without its first token after
  `queue_age()` (QUEUE_FACTOR times that, at least QUEUE_FLOOR) while other calls of the
  worker are being answered waits behind them: the limit becomes the calls being answered
  (`queued`), a Vegas-style estimate of what the server serves at once, and the waiting call
  is handed back (bus/throttling.py). So no call spends its timeout in the server's queue
  behind planbus's own calls.

A burst of refusals is one congestion signal, not many: only a call started after the last cut
can cut again (Envoy's and TCP's "once per round trip"), so 12 calls refused together cut the
limit once.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field

# The limit's cut on a throttled call. Netflix's AIMDLimit cuts to 0.9, TCP to 0.5; 0.75
# measured best against the tests' providers: at 0.5 a worker whose calls take 1 s drained
# 300 requests at 20/s in 17.6 s instead of 15.8 s, with no fewer refusals.
DECREASE = 0.75
SPACING_WIDEN = 4 / 3  # the spacing's widening on a throttled call: the pace drops by a quarter
SPACING_NARROW = 0.98  # the spacing after each success
MIN_SPACING = 0.001  # below a millisecond the spacing is dropped: calls start unpaced
# The spacing learns a per-second limit, whose bucket refills one token in at most a second (the
# slowest per-second limit is 1/s): a longer wait is a pause, already honoured by `pause_until`,
# and slower limits are what PLANBUS_LLM_REQUESTS_PER_MINUTE is for. As the spacing it would
# hold every later call of the worker that far apart for hours.
MAX_SPACING = 1.0
SPACING_HALF_LIFE = 60.0  # seconds without a refusal that halve the spacing
# The spacing a refusal that names no wait starts from once the limit is down to one call:
# widening 0 by a third stays 0, so such refusals never spaced calls at all. 10 ms is 100
# calls/s, above any per-second limit a worker meets; eight rounds of a storm widen it to 0.1 s.
FIRST_SPACING = 0.01
# The pause after the second round in a row of refusals that name no wait, doubled each round,
# capped so that recovery is quick: the first call after a storm ends waits at most
# BACKOFF_CAP (a peer, 1.5 times that), and the requests behind it then drain at the
# provider's pace. 0.25 s x 2^n reaches the cap after six rounds: a 20 s storm costs about ten.
BACKOFF_BASE = 0.25
BACKOFF_CAP = 4.0

# How long a call may wait for its first token, while the server answers others of ours,
# before it counts as queued: QUEUE_FACTOR times the quickest first token seen (a served call's
# prompt processing), and at least QUEUE_FLOOR, so that ordinary jitter never sheds a call.
QUEUE_FLOOR = 1.5
QUEUE_FACTOR = 3.0
# The quickest first token is allowed to grow 1 % per answered call, so that a server that got
# slower for good (a bigger model, a busier box) is relearned within a few hundred calls.
FIRST_TOKEN_DRIFT = 1.01

Uniform = Callable[[float, float], float]


def backoff_seconds(refusals: int, uniform: Uniform = random.uniform) -> float:
    """The pause after round `refusals` (1, 2, ...) of refusals that named no wait (none after
    the first).

    "Equal jitter": half fixed so it keeps growing, half random so that workers pausing
    together do not all resume in the same millisecond.
    """
    if refusals <= 1:
        return 0.0
    ceiling = min(BACKOFF_CAP, BACKOFF_BASE * 2 ** min(refusals - 2, 32))
    return float(ceiling / 2 + uniform(0, ceiling / 2))


@dataclass(slots=True)
class Pace:
    """The adaptive limit, spacing and pause of one worker's calls to the provider."""

    ceiling: int  # PLANBUS_CONCURRENCY
    limit: float = 0.0  # 0 means the ceiling
    spacing: float = 0.0  # seconds between call starts; 0 = unpaced
    paused_until: float = -math.inf
    paused_seconds: float = 0.0  # total time paused, for /metrics
    throttled_calls: int = 0
    refusals: int = 0  # rounds of refusals that named no wait since the last answered call
    quickest_first_token: float = math.inf  # seconds (see FIRST_TOKEN_DRIFT)
    _last_cut: float = -math.inf
    _burst_inflight: int = 0  # calls in flight when the current burst of refusals began
    _burst_refused: int = 0  # refusals of that burst so far
    _next_start: float = -math.inf
    _spacing_since: float = -math.inf  # when the spacing was last set or halved
    _successes: int = field(default=0)

    def __post_init__(self) -> None:
        self.ceiling = max(1, self.ceiling)
        self.limit = float(min(self.ceiling, self.limit or self.ceiling))

    @property
    def current_limit(self) -> int:
        """The whole number of calls allowed in flight."""
        return max(1, math.floor(self.limit))

    def allowed(self, inflight: int, now: float) -> int:
        """How many new calls may start now: 0 while paused or until the spacing has passed."""
        self._decay(now)
        if now < self.paused_until or now < self._next_start:
            return 0
        free = max(0, self.current_limit - inflight)
        return min(free, 1) if self.spacing else free

    def wait(self, now: float) -> float:
        """Seconds until a new call may start (0 if one may start now), ignoring free slots."""
        return max(0.0, self.paused_until - now, self._next_start - now)

    def started(self, now: float) -> None:
        """A call starts now: the next one waits out the spacing."""
        self._decay(now)
        if self.spacing:
            self._next_start = max(now, self._next_start) + self.spacing

    def succeeded(self, inflight: int) -> None:
        """A call answered: grow the limit by one per `limit` successes, narrow the spacing."""
        self.refusals = 0
        if self.spacing:
            self._set_spacing(self.spacing * SPACING_NARROW)
        # Only a limit in use is evidence it is not too low (`inflight` counts this call).
        if inflight < self.limit / 2:
            return
        self._successes += 1
        if self._successes >= self.limit:
            self._successes = 0
            self.limit = min(float(self.ceiling), self.limit + 1)

    def throttled(
        self,
        started: float,
        retry_after: float | None,
        now: float,
        inflight: int = 0,
        uniform: Uniform = random.uniform,
    ) -> None:
        """A call started at `started` was refused now ("slow down"): pause, and maybe cut.

        `inflight` counts this call. The calls of a burst that were not refused are what the
        provider took: the limit never stays above that count, so 32 calls against 4 slots
        bring it to 4 in one round trip, not after seven cuts.
        """
        self.throttled_calls += 1
        if retry_after:
            self.pause_until(now + retry_after, now)
        if started < self._last_cut:  # refused for the pace before the last cut: no new cut
            self._burst_refused += 1
            self._cap_to_accepted()
            return
        self._last_cut = now
        self._successes = 0
        self._burst_inflight, self._burst_refused = inflight, 1
        self.limit = max(1.0, self.limit * DECREASE)
        self._cap_to_accepted()
        if not retry_after:
            self.refusals += 1
            backoff = backoff_seconds(self.refusals, uniform)
            if backoff:
                self.pause_until(now + backoff, now)
        # A wait longer than one token's time is a pause, not the pace of later calls.
        token_time = retry_after if retry_after and retry_after <= MAX_SPACING else 0.0
        # Calls at once are cut first; only at one call in flight, still refused, does the
        # pace of starts become the lever (a 4-slot server's 503s must not space its calls).
        first = FIRST_SPACING if self.current_limit <= 1 else 0.0
        wider = self.spacing * SPACING_WIDEN if self.spacing else first
        self._set_spacing(min(MAX_SPACING, max(token_time, wider)))
        self._spacing_since = now

    def _decay(self, now: float) -> None:
        """Halve the spacing for each whole `SPACING_HALF_LIFE` passed since it was set."""
        if not self.spacing:
            return
        halvings = math.floor((now - self._spacing_since) / SPACING_HALF_LIFE)
        if halvings <= 0:
            return
        self._spacing_since += halvings * SPACING_HALF_LIFE
        self._set_spacing(self.spacing * 0.5 ** min(halvings, 64))

    def _set_spacing(self, seconds: float) -> None:
        # Below MIN_SPACING the spacing is dropped: calls start unpaced again.
        self.spacing = seconds if seconds >= MIN_SPACING else 0.0

    def _cap_to_accepted(self) -> None:
        if self._burst_inflight:
            accepted = self._burst_inflight - self._burst_refused
            self.limit = max(1.0, min(self.limit, float(accepted)))

    def pause_until(self, until: float, now: float) -> None:
        """No new call before `until` (a provider's wait, this worker's or a peer's)."""
        if until <= self.paused_until:
            return
        self.paused_seconds += until - max(now, self.paused_until)
        self.paused_until = until

    def first_token(self, seconds: float) -> None:
        """An answered call's first token came `seconds` after its start."""
        drifted = self.quickest_first_token * FIRST_TOKEN_DRIFT
        self.quickest_first_token = min(max(0.0, seconds), drifted)

    def queue_age(self) -> float:
        """How long a call may wait for its first token before it counts as queued."""
        return max(QUEUE_FLOOR, QUEUE_FACTOR * self.quickest_first_token)

    def queued(self, answered: int) -> None:
        """Calls wait in the server's queue while it answers `answered` of ours: that is what
        it serves at once, so the limit is no higher (growth then probes one more again)."""
        self._successes = 0
        self.limit = max(1.0, min(self.limit, float(answered)))

    def learn_refusals(self, refusals: int) -> None:
        """The database's count of refusal rounds (every worker's) is the truth: take it."""
        self.refusals = max(0, refusals)

    def paused(self, now: float) -> bool:
        """Whether new calls wait for a pause now."""
        return now < self.paused_until
