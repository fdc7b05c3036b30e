"""The fleet: which of the live workers claims a request, so that a request costs one claim.

Every worker hears every NOTIFY. Claiming on each would cost one claim statement per worker per
request, nearly all of them empty. Instead the live workers (`planbus_workers`, renewed by the
heartbeat and the sweep) take turns by request id: the worker at `id mod n` in the list of live
worker ids claims at once; the worker k places after it claims only after k fallback steps, and
only if no claim announced meanwhile (`planbus_claims`, sent by the claim statement itself) took
the request or found nothing more to take. So a healthy fleet spends about one claim per request,
and a designated claimer that is dead, frozen or full costs its request one step of latency, not
the request. A notification carries no authority: a claim announcement counts only when its
sender is the claim connection of a live worker (its backend pid, which each worker writes in
its row: `Notify.pid` cannot be forged by another session); any other NOTIFY on these channels
can at worst cost a claim statement, never a request's latency. Through a transaction pooler the
claim connection's pid is the pooler's, so announcements stop counting and each request costs a
claim per place instead: more statements, never later work.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import anyio
import psycopg
from psycopg_pool import AsyncConnectionPool

from planbus import __version__
from planbus.bus import queries
from planbus.errors import one_line

log = logging.getLogger(__name__)

# How long the worker one place after a request's designated claimer waits before it claims in
# its stead (two places: twice as long, ...). Long enough for the claim's announcement to
# arrive first on a busy machine (it takes about 1 ms on a quiet one), short beside a model
# call. At most this much latency for a request whose claimer has died or is full.
FALLBACK_STEP = 0.025
# A peer that renewed its row more than this long ago is dead to the others (the sweep renews
# an idle worker's row every PLANBUS_SWEEP_SECONDS; the heartbeat a busy one's every lease/4).
LIVE_SWEEPS = 2.5
# Rows of workers gone for this long are deleted (an operator still sees a recent death).
FORGET_SECONDS = 3600.0
# A peer's join or leave makes this worker read the list again, at most this often.
REFRESH_SECONDS = 0.5


class Fleet:
    """One worker's view of the fleet: the live peers, and the claims it may owe them."""

    def __init__(self, worker_id: str, pool: AsyncConnectionPool, sweep_seconds: float) -> None:
        self.worker_id = worker_id
        self.pool = pool
        self.live_seconds = LIVE_SWEEPS * sweep_seconds
        self.peers: list[str] = [worker_id]
        self.claim_pids: frozenset[int] = frozenset()  # live peers' claim connections
        self.claim_pid: int | None = None  # this worker's, once connected
        # request id -> (monotonic time heard, monotonic time to claim anyway)
        self._fallbacks: dict[int, tuple[float, float]] = {}
        self._refresh = anyio.Event()
        self.leaving = False  # set on a graceful stop: the row is gone and stays gone

    @property
    def announce(self) -> bool:
        """Whether claims are announced: only when someone else listens for them."""
        return len(self.peers) > 1

    def set_peers(self, peers: list[str] | None, claim_pids: list[int] | None = None) -> None:
        """The live workers' ids, as the database listed them (this worker always among them),
        and the backends of their claim connections."""
        self.claim_pids = frozenset(claim_pids or ())
        found = sorted({*(peers or ()), self.worker_id})
        if found != self.peers:
            log.info("fleet: %d live workers", len(found))
        self.peers = found
        self._place = found.index(self.worker_id)
        if len(found) == 1:
            self._fallbacks.clear()

    # -- notifications -------------------------------------------------------------------

    def heard(self, payload: str, now: float) -> bool:
        """A request was announced: True when this worker claims at once, else a fallback."""
        try:
            request_id = int(payload)
        except ValueError:
            return True  # not an id (a hand-written NOTIFY): anyone may look
        places = len(self.peers)
        rank = (self._place - request_id) % places
        if rank == 0:
            return True
        self._fallbacks.setdefault(request_id, (now, now + rank * FALLBACK_STEP))
        return False

    def claimed_elsewhere(self, payload: str, sender: int) -> None:
        """A peer's claim: `p worker ids` (it took every due request it found) or `f worker
        ids` (its limit stopped it), sent by backend `sender`. This worker's own claims were
        counted when they returned: its own `p` must not drop a fallback heard after that
        claim's snapshot. Anyone may NOTIFY: only a live peer's claim connection counts."""
        if sender not in self.claim_pids or sender == self.claim_pid:
            return
        kind, worker, ids = [*payload.split(" ", 2), "", ""][:3]
        if worker == self.worker_id:
            return
        if kind == "p":
            self._fallbacks.clear()
        elif kind == "f":
            for text in ids.split(","):
                if text.isdigit():
                    self._fallbacks.pop(int(text), None)

    def claimed_here(self, ids: list[int], took_all: bool, since: float) -> None:
        """This worker's own claim, sent at `since`: it covers what it took, and everything
        heard before it when it found no more due requests than it could take."""
        if took_all:
            self._fallbacks = {i: t for i, t in self._fallbacks.items() if t[0] > since}
        for request_id in ids:
            self._fallbacks.pop(request_id, None)

    def next_fallback(self) -> float:
        """The monotonic time of the earliest fallback claim (inf: none)."""
        return min((at for _, at in self._fallbacks.values()), default=math.inf)

    def fallback_due(self, now: float) -> bool:
        """True (and forgotten) when a fallback claim is due."""
        due = [i for i, (_, at) in self._fallbacks.items() if at <= now]
        for request_id in due:
            del self._fallbacks[request_id]
        return bool(due)

    def peer_changed(self, payload: str) -> None:
        """A peer joined or left (`planbus_workers`): read the list again soon."""
        if payload != self.worker_id:
            self._refresh.set()

    # -- the table -----------------------------------------------------------------------

    def beat_params(
        self, inflight: int, concurrency: int, llm_limit: int, held_back: str | None = None
    ) -> dict[str, Any]:
        """What this worker's row says (the heartbeat's and the sweep's parameters)."""
        return {
            "worker_id": self.worker_id,
            "inflight": inflight,
            "concurrency": concurrency,
            "llm_limit": llm_limit,
            "held_back": held_back,
            "claim_pid": self.claim_pid,
            "version": __version__,
            "live_seconds": self.live_seconds,
            "registered": not self.leaving,
        }

    async def join(self, params: dict[str, Any], *, announce: bool = True) -> None:
        """Write this worker's row, read the live workers, and (at start) tell the peers."""
        async with self.pool.connection() as conn:
            cursor = await conn.execute(
                queries.WORKER_BEAT,
                {**params, "forget_seconds": FORGET_SECONDS, "announce": announce},
            )
            row = await cursor.fetchone()
        self.set_peers(list(row[0]), list(row[1])) if row else self.set_peers(None)

    async def start(self, params: dict[str, Any]) -> None:
        """Join at start; on a database error the sweep registers it later (alone until then)."""
        try:
            await self.join(params)
        except psycopg.Error as exc:
            log.warning("could not join the fleet (%s); will retry", one_line(exc))

    async def refresh_loop(self, params: Any) -> None:
        """Read the list again after a peer joined or left; `params()` is this row's values."""
        while True:
            await self._refresh.wait()
            self._refresh = anyio.Event()
            if not self.leaving:
                try:
                    await self.join(params(), announce=False)
                except psycopg.Error as exc:
                    log.warning("could not read the live workers (%s)", one_line(exc))
            await anyio.sleep(REFRESH_SECONDS)

    async def leave(self) -> None:
        """Graceful stop: delete this worker's row and tell the peers, before draining."""
        self.leaving = True
        self.set_peers(None)
        with anyio.CancelScope(shield=True):
            try:
                async with self.pool.connection() as conn:
                    await conn.execute(queries.WORKER_LEAVE, {"worker_id": self.worker_id})
            except psycopg.Error as exc:  # its row ages out by itself
                log.warning("could not leave the fleet (%s)", one_line(exc))
