"""Progress writes: a streamed plan's finished steps, copied to the request row as they come.

The planner reports each newly finished step (`planbus.streaming.Progress`); this module turns
those reports into fenced `UPDATE`s of `plan_requests.progress`, following three rules:

- never more often than once per `interval` per request, nor within `interval` of the model's
  first token: steps finished within the interval share one write, so a request costs at most
  one write per step, and an answer that arrives in one burst costs none;
- never in the way of the request's outcome: once planning ends, nothing more is written (a
  write already under way finishes on its own, fenced, and the outcome's statement clears the
  column), no connection is held while the model writes, and at most one pooled connection
  per process serves progress at any moment, so completions always find the rest;
- never after the claim is lost: every write is fenced by the claim token.

An answer that arrives in one piece reports nothing, so it causes no write at all.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from uuid import UUID

import anyio
import psycopg
from anyio.abc import TaskGroup, TaskStatus
from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool

from planbus.bus import queries
from planbus.errors import one_line
from planbus.llm.openai_stream import Progress, ProgressCallback

log = logging.getLogger(__name__)


@dataclass(eq=False, slots=True)
class _Follow:
    """One request's progress: the latest report and what was written of it."""

    request_id: int
    token: UUID
    latest: Progress | None = None
    written_steps: int = 0
    last_write: float = -float("inf")  # time.monotonic() when the last write started
    scheduled: bool = False
    planning: bool = True


class ProgressWriter:
    """Writes the progress of every request this process plans; one instance per worker."""

    def __init__(self, pool: AsyncConnectionPool, interval: float) -> None:
        self.pool = pool
        self.interval = interval
        self._connection = anyio.CapacityLimiter(1)
        self._tasks: TaskGroup | None = None

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Own the write tasks until cancelled."""
        try:
            async with anyio.create_task_group() as self._tasks:
                task_status.started()
                await anyio.sleep_forever()
        finally:
            self._tasks = None  # a report after this writes nothing

    @contextmanager
    def follow(self, request_id: int, token: UUID) -> Iterator[ProgressCallback]:
        """The callback to hand the planner while it plans this request."""
        state = _Follow(request_id, token)

        def report(progress: Progress) -> None:
            if state.latest is None:
                # The answer's start counts as a write: an answer that streams in one burst
                # (a fast server, a test server without a pace) is done before any write.
                state.last_write = progress.started
            state.latest = progress
            if not state.scheduled and state.planning and self._tasks is not None:
                state.scheduled = True
                self._tasks.start_soon(self._write_when_due, state)

        try:
            yield report
        finally:
            # From here on the outcome's write owns the row: nothing queued is written.
            state.planning = False

    async def _write_when_due(self, state: _Follow) -> None:
        try:
            while state.planning and state.latest is not None:
                progress = state.latest
                if len(progress.steps) <= state.written_steps:
                    return
                await anyio.sleep(max(0.0, state.last_write + self.interval - time.monotonic()))
                async with self._connection:
                    if not state.planning:
                        return
                    progress = state.latest  # steps that finished meanwhile share this write
                    state.last_write = time.monotonic()
                    state.written_steps = len(progress.steps)
                    await self._write(state, progress)
        finally:
            state.scheduled = False

    async def _write(self, state: _Follow, progress: Progress) -> None:
        try:
            # Inside the try: a hostile step (nesting too deep to serialize, a NUL that jsonb
            # refuses) costs its preview, never the worker; the outcome judges the plan.
            params = {
                "id": state.request_id,
                "claim_token": state.token,
                "progress": Jsonb(progress.as_json()),
            }
            async with self.pool.connection() as conn:
                if not state.planning:
                    return  # the outcome is on its way: waiting for a connection cost nothing
                await conn.execute(queries.SHOW_PROGRESS, params)
        except (psycopg.Error, ValueError, RecursionError) as exc:
            # A preview is not worth a retry: the next step, or the outcome, replaces it.
            log.warning(
                "request %d: could not write its progress (%s)",
                state.request_id,
                one_line(exc)[:200],
            )
            return
        log.debug("request %d: progress written (%d steps)", state.request_id, len(progress.steps))
