"""The writes that end a claim: complete, give back for a retry, fail, or hand back on stop.

Each is one statement fenced by the claim token, so it either applies in full while the claim
is still ours, or writes nothing at all.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Literal, LiteralString
from uuid import UUID

import anyio
import psycopg
from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool

from planbus import queries
from planbus.backoff import backoff_delay
from planbus.plan import Lead, LeadId, Plan, RequestId

log = logging.getLogger(__name__)


@dataclass(eq=False, slots=True)
class Claim:
    """A request this process holds, from claim to its last write."""

    id: RequestId
    lead_id: LeadId
    telegram_id: int
    attempt: int
    token: UUID
    waited_seconds: float
    lead: Lead | None
    # Cancelled when the heartbeat finds the claim taken over; wraps only the planning.
    scope: anyio.CancelScope = field(default_factory=anyio.CancelScope)
    lost: bool = False
    writing: bool = False
    retry_delay: float = 0.0
    started: float = field(default_factory=time.monotonic)

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> Claim:
        """Build a claim from one row of `queries.CLAIM`."""
        lead = None
        if row["lead_found"]:
            lead = Lead(
                id=LeadId(row["lead_id"]),
                telegram_id=row["lead_telegram_id"],
                prospect_name=row["prospect_name"],
                prospect_title=row["prospect_title"],
                prospect_company=row["prospect_company"],
                prospect_analysis=row["prospect_analysis"],
                closing_strategy=row["closing_strategy"],
                original_context=row["original_context"],
                web_research=row["web_research"],
            )
        return cls(
            id=RequestId(row["id"]),
            lead_id=LeadId(row["lead_id"]),
            telegram_id=row["telegram_id"],
            attempt=row["attempts"],
            token=row["claim_token"],
            waited_seconds=max(0.0, row["waited_seconds"] or 0.0),
            lead=lead,
        )


Outcome = Literal["completed", "pending", "failed", "lost"]


async def complete(pool: AsyncConnectionPool, claim: Claim, plan: Plan, deadline: float) -> Outcome:
    """Apply every effect of a finished plan in one statement; `lost` if the claim is gone."""
    steps = plan.as_json()
    reminders = [
        {"step_id": step.step_id, "delay_days": step.delay_days, "draft_text": step.draft_text}
        for step in plan.steps
    ]
    params = {
        "id": claim.id,
        "claim_token": claim.token,
        "plan": Jsonb(steps),
        "step_count": len(steps),
        "reminders": Jsonb(reminders),
    }
    written = await _fenced_write(pool, queries.COMPLETE, params, deadline)
    return "completed" if written else "lost"


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
        "error": error,
        "delay_seconds": 0.0 if final else delay_seconds,
    }
    written = await _fenced_write(pool, queries.GIVE_BACK, params, deadline)
    return status if written else "lost"


async def hand_back(pool: AsyncConnectionPool, claims: list[Claim]) -> list[int]:
    """Return unfinished claims to `pending` at once (graceful stop); the ids handed back."""
    if not claims:
        return []
    async with pool.connection() as conn:
        cursor = await conn.execute(
            queries.HAND_BACK,
            {"ids": [c.id for c in claims], "tokens": [c.token for c in claims]},
        )
        return [row[0] for row in await cursor.fetchall()]


async def _fenced_write(
    pool: AsyncConnectionPool, query: LiteralString, params: dict[str, Any], deadline: float
) -> bool:
    """Run one fenced statement; True when it matched our claim.

    A connection failure is retried until `deadline` (about when our lease would lapse):
    the claim is still ours meanwhile, and past it the sweep will hand the request on.
    If a commit succeeded but its answer was lost, the retry matches nothing and reports
    `lost`, which is still exactly once.
    """
    failures = 0
    while True:
        try:
            async with pool.connection() as conn:
                cursor = await conn.execute(query, params)
                return cursor.rowcount > 0
        except psycopg.OperationalError as exc:
            failures += 1
            delay = backoff_delay(failures, base=0.1, cap=2.0)
            if time.monotonic() + delay > deadline:
                raise
            log.warning("database write failed (%s); retrying in %.2fs", _one_line(exc), delay)
            await anyio.sleep(delay)


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__
