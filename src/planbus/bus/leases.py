"""The lease policy in one place: what a claim holds, the heartbeat, the sweep, the hand-back.

A claim is a lease of `settings.lease_seconds`, renewed four times a lease by one heartbeat
statement for every claim this process holds. A worker that dies or freezes stops renewing;
the sweep (in every worker) then hands its requests on, or fails those whose attempts are
spent. On a graceful stop the unfinished claims go straight back to `pending`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any, LiteralString

import anyio
import psycopg
from psycopg_pool import AsyncConnectionPool

from planbus.bus import queries
from planbus.bus.claim import Claim
from planbus.bus.fleet import Fleet
from planbus.bus.metrics import WorkerMetrics
from planbus.errors import one_line
from planbus.logs import request_fields
from planbus.settings import Settings

log = logging.getLogger(__name__)

WORKER_LOST = "The worker processing this request stopped responding before it finished."


class Leases:
    """Keeps the claims in `held` alive, recovers expired ones, and hands back on stop."""

    def __init__(
        self,
        settings: Settings,
        pool: AsyncConnectionPool,
        held: dict[int, Claim],
        metrics: WorkerMetrics,
        fleet: Fleet,
        row: Callable[[], dict[str, Any]],
    ) -> None:
        self.settings = settings
        self.pool = pool
        self.held = held
        self.metrics = metrics
        self.fleet = fleet
        self.row = row  # this worker's row in planbus_workers, renewed by heartbeat and sweep

    def write_deadline(self) -> float:
        """Until when a final write may keep retrying: about when the lease would lapse."""
        return time.monotonic() + self.settings.lease_seconds

    async def heartbeat_loop(self) -> None:
        """Renew every held lease; a claim found taken over is cancelled and marked lost."""
        while True:
            await anyio.sleep(self.settings.heartbeat_seconds)
            held = [c for c in self.held.values() if not c.writing]
            if not held:
                continue
            try:
                still_held = set(
                    await self._fenced(
                        queries.HEARTBEAT,
                        held,
                        lease_seconds=self.settings.lease_seconds,
                        **self.row(),
                    )
                )
            except psycopg.Error as exc:
                log.warning("heartbeat failed (%s); will retry", one_line(exc))
                continue
            for claim in held:
                if claim.id not in still_held and not claim.writing:
                    log.warning(
                        "request %d: claim lost (lease expired and was taken over)", claim.id
                    )
                    claim.lost = True
                    claim.scope.cancel()

    async def sweep_loop(self, after_sweep: Callable[[bool], None]) -> None:
        """Every `sweep_seconds`, recover expired claims and renew this worker's row, then
        call `after_sweep(due)`: whether a request is due (True when the sweep failed)."""
        while True:
            try:
                due = await self._sweep()
            except psycopg.Error as exc:
                log.warning("sweep failed (%s); will retry", one_line(exc))
                due = True
            after_sweep(due)
            await anyio.sleep(self.settings.sweep_seconds)

    async def _sweep(self) -> bool:
        async with self.pool.connection() as conn:
            cursor = await conn.execute(
                queries.RECOVER_EXPIRED,
                {
                    "max_attempts": self.settings.max_attempts,
                    "lost_error": WORKER_LOST,
                    **self.row(),
                },
            )
            rows = await cursor.fetchall()
        peers, claim_pids, due = rows[0][5], rows[0][6], rows[0][7]
        if not self.fleet.leaving:
            self.fleet.set_peers(list(peers), list(claim_pids))
        for request_id, lead_id, status, attempts, *_ in rows:
            if request_id is not None:
                log.warning(
                    "request %d recovered from an expired claim after attempt %d: now %s",
                    request_id,
                    attempts,
                    status,
                    extra=request_fields(request_id, lead_id, attempts, f"recovered_{status}"),
                )
                self.metrics.recovered(status)
        return bool(due)

    async def hand_back(self) -> None:
        """Graceful stop: every claim still held goes back to `pending`, due at once."""
        unfinished = list(self.held.values())
        if not unfinished:
            return
        with anyio.CancelScope(shield=True):
            try:
                ids = await self._fenced(queries.HAND_BACK, unfinished)
            # Any database error, not only a lost connection: the stop must still end cleanly.
            except psycopg.Error as exc:
                log.error(
                    "could not hand back %d requests (%s); the sweep will recover them",
                    len(unfinished),
                    one_line(exc),
                )
                return
        handed = set(ids)
        for claim in unfinished:
            if claim.id in handed:
                claim.trace.finished("handed_back", None)
                log.info(
                    "request %d lead %d attempt %d handed back as pending",
                    claim.id,
                    claim.lead_id,
                    claim.attempt,
                    extra=request_fields(claim.id, claim.lead_id, claim.attempt, "handed_back"),
                )
        log.info("handed back %d unfinished requests as pending: %s", len(ids), ids)
        self.held.clear()

    async def _fenced(self, query: LiteralString, claims: list[Claim], **params: Any) -> list[int]:
        """Run `query` for `claims`, each matched by id and token; the ids it matched."""
        async with self.pool.connection() as conn:
            cursor = await conn.execute(
                query,
                {"ids": [c.id for c in claims], "tokens": [c.token for c in claims], **params},
            )
            return [row[0] for row in await cursor.fetchall()]
