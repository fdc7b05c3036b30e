"""The writes that end a claim: complete, or give back for a retry, or fail.

Each is one statement fenced by the claim token, so it either applies in full while the claim
is still ours, or writes nothing at all. Completions that finish together share a statement.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, Literal, LiteralString

import anyio
import psycopg
import pydantic_core
from anyio.abc import TaskStatus
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream
from psycopg_pool import AsyncConnectionPool

from planbus.bus import provider_queries, queries
from planbus.bus.claim import Claim
from planbus.bus.retry import Backoff
from planbus.errors import INVALID_OUTPUT, TransientError, bounded, one_line
from planbus.llm.plan import Plan

log = logging.getLogger(__name__)


Outcome = Literal["completed", "pending", "failed", "lost"]


@dataclass(eq=False, slots=True)
class _Completion:
    """A finished plan, as the JSON its write sends, waiting for the write and its result."""

    claim: Claim
    payload: str
    deadline: float
    done: anyio.Event = field(default_factory=anyio.Event)
    written: bool = False
    error: psycopg.Error | TransientError | None = None


def _payload(claim: Claim, plan: Plan) -> str:
    """One request's part of `queries.COMPLETE`'s JSON array; a plan that cannot be written as
    JSON fails here, in its own request's task, as that request's invalid output."""
    # The stored `result`: the contract's two keys, then what the plan cost (docs/llm.md).
    # The steps go in as models: pydantic writes them with the model's own fields as given.
    result = {"plan": plan.steps, "step_count": len(plan.steps), "throttled_calls": claim.throttled}
    if claim.cost is not None:
        result.update(claim.cost.as_result())
    try:
        # pydantic's serializer: 7 us for a six-step plan where model_dump and json.dumps
        # took 29 (a busy worker writes hundreds a second). Like json.dumps it writes floats
        # as given (Infinity included, which the database then refuses), and it refuses what
        # JSON cannot hold: an unpaired surrogate, a value nested too deep.
        return pydantic_core.to_json(
            {
                "id": claim.id,
                "claim_token": str(claim.token),
                "result": result,
                "reminders": [
                    {"step_id": s.step_id, "delay_days": s.delay_days, "draft_text": s.draft_text}
                    for s in plan.steps
                ],
            }
        ).decode()
    except (ValueError, TypeError, RecursionError) as exc:
        raise _unstorable(claim, exc) from None


def refused_for_its_data(exc: psycopg.Error) -> bool:
    """True when a write failed for the values it carries (SQLSTATE class 22, a data
    exception such as a NUL in jsonb, or 23, a constraint the values break): the same write
    fails again. Anything else is the database's own trouble (a lost connection, a pooler
    that lost a prepared statement, a privilege, a trigger, a lock): worth the same write
    again, and never the model's fault."""
    return isinstance(exc, psycopg.DataError | psycopg.IntegrityError)


STORE_FAILED = "store_failed"  # the error kind of a plan the database would not store


def store_failed(claim: Claim, exc: psycopg.Error) -> TransientError:
    """The database refused a finished plan until the write's deadline: the database's error,
    never the model's. The worker gives the request back to `pending`, never `failed`."""
    log.warning("request %d: the database would not store its plan (%s)", claim.id, one_line(exc))
    return TransientError(
        f"The database could not store the plan ({type(exc).__name__}).", kind=STORE_FAILED
    )


def _unstorable(claim: Claim, exc: BaseException) -> TransientError:
    log.warning("request %d: its plan could not be stored (%s)", claim.id, one_line(exc))
    return TransientError(
        f"{INVALID_OUTPUT}: the plan could not be stored ({type(exc).__name__}).",
        kind="invalid_output",
    )


class Completions:
    """Writes the effects of finished plans; plans that finish together share one statement.

    Each request's effects stay one fenced, all-or-nothing write: the statement is one
    transaction, and a request whose claim is gone matches nothing in it. Sharing changes only
    how many round trips and commits the database sees. A writer never waits to fill a batch:
    it takes what has queued up while the writers were busy (and what the tasks already
    running queue in the same turn of the event loop), so an idle worker writes each request
    at once and a busy one writes many per statement.
    """

    def __init__(self, pool: AsyncConnectionPool, writers: int, max_batch: int = 32) -> None:
        self.pool = pool
        self.writers = writers
        self.max_batch = max_batch
        self._send: MemoryObjectSendStream[_Completion] | None = None

    async def complete(self, claim: Claim, plan: Plan, deadline: float) -> Outcome:
        """Apply every effect of `plan`; `lost` if the claim is gone. Needs `run()` running."""
        assert self._send is not None, "Completions.run() is not running"
        item = _Completion(claim, _payload(claim, plan), deadline)
        self._send.send_nowait(item)
        await item.done.wait()
        if item.error is not None:
            raise item.error
        return "completed" if item.written else "lost"

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """The writer tasks, until cancelled."""
        send, receive = anyio.create_memory_object_stream[_Completion](math.inf)
        with send, receive:
            self._send = send
            async with anyio.create_task_group() as writers:
                for _ in range(self.writers):
                    writers.start_soon(self._write_batches, receive)
                task_status.started()

    async def _write_batches(self, receive: MemoryObjectReceiveStream[_Completion]) -> None:
        later: list[_Completion] = []  # a second request of a lead already in the batch
        while True:
            batch = [later.pop(0) if later else await receive.receive()]
            # One turn of the event loop first: request tasks that are ready to run finish
            # their plans and queue them here, instead of each waiting for a statement of its
            # own. (Without it, W2 sent 12 % more statements: writers left with one item.)
            # Not a cancellation point: `_write` must always see the items it took, to tell
            # their waiting (shielded) requests how the write ended.
            await anyio.lowlevel.cancel_shielded_checkpoint()
            leads = {batch[0].claim.lead_id}
            while len(batch) < self.max_batch:
                try:
                    item = receive.receive_nowait()
                except anyio.WouldBlock:
                    break
                if item.claim.lead_id in leads:
                    later.append(item)  # its effects must follow the other's, not share them
                else:
                    batch.append(item)
                    leads.add(item.claim.lead_id)
            await self._write(batch)

    async def _write(self, batch: list[_Completion]) -> None:
        finished = False
        try:
            # Each item was serialized by its own request; jsonb is parsed by the database.
            params = {"requests": "[" + ",".join(item.payload for item in batch) + "]"}
            deadline = min(item.deadline for item in batch)
            rows = await _fenced_write(self.pool, queries.COMPLETE, params, deadline)
            written = {row[0] for row in rows}
            for item in batch:
                item.written = item.claim.id in written
            finished = True
        except psycopg.Error as exc:
            if not refused_for_its_data(exc):  # the database's, retried until the deadline
                for item in batch:
                    item.error = exc
            elif len(batch) == 1:  # its data (a NUL, a bad escape...): the request's own failure
                batch[0].error = _unstorable(batch[0].claim, exc)
            else:  # one request's data must not fail the others: write each on its own
                for item in batch:
                    await self._write([item])
            finished = True
        finally:
            for item in batch:
                if not item.done.is_set():
                    if not finished and item.error is None:  # cancelled mid-write
                        item.error = psycopg.OperationalError("the effects writer stopped")
                    item.done.set()


async def give_back(
    pool: AsyncConnectionPool,
    claim: Claim,
    *,
    error: str,
    final: bool,
    delay_seconds: float,
    deadline: float,
) -> Outcome:
    """Put the request back to `pending` after `delay_seconds`, or fail it when `final`."""
    status: Outcome = "failed" if final else "pending"
    params = {
        "id": claim.id,
        "claim_token": claim.token,
        "status": status,
        "error": bounded(error),  # the contract: result.error is one line of plain language
        "delay_seconds": 0.0 if final else delay_seconds,
    }
    written = await _fenced_write(pool, queries.GIVE_BACK, params, deadline)
    return status if written else "lost"


async def throttle_back(
    pool: AsyncConnectionPool,
    claim: Claim,
    *,
    error: str,
    gave_up_error: str,
    patience_seconds: float,
    delay_seconds: float,
    pause_seconds: float,
    deadline: float,
    refusals: int = 0,
) -> Outcome:
    """Put a throttled request back without spending an attempt; `failed` past the patience."""
    params = {
        "id": claim.id,
        "claim_token": claim.token,
        "error": bounded(error),
        "gave_up_error": bounded(gave_up_error),
        "patience_seconds": patience_seconds,
        "delay_seconds": delay_seconds,
        "pause_seconds": pause_seconds,
        "refusals": refusals,
    }
    rows = await _fenced_write(pool, provider_queries.THROTTLE_BACK, params, deadline)
    status: Outcome = rows[0][0] if rows else "lost"
    return status


async def _fenced_write(
    pool: AsyncConnectionPool, query: LiteralString, params: dict[str, Any], deadline: float
) -> list[tuple[Any, ...]]:
    """Run one fenced statement; the rows it returns, one for each claim it matched.

    A failure that is the database's (a lost connection, or any error but one about the
    values sent) is retried until `deadline` (about when our lease would lapse): the claim is
    still ours meanwhile, and past it the sweep will hand the request on. If a commit
    succeeded but its answer was lost, the retry matches nothing and reports `lost`, which is
    still exactly once.
    """
    backoff = Backoff(base=0.1, cap=2.0, deadline=deadline)
    while True:
        try:
            async with pool.connection() as conn:
                cursor = await conn.execute(query, params)
                return await cursor.fetchall()
        except psycopg.Error as exc:
            if refused_for_its_data(exc):
                raise
            delay = backoff.failed(time.monotonic())
            if backoff.give_up():
                raise
            log.warning("database write failed (%s); retrying in %.2fs", one_line(exc), delay)
            await anyio.sleep(delay)
