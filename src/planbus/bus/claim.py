"""`Claim`: a request this process holds, from its claim to its last write."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any
from uuid import UUID

import anyio

from planbus.bus.tracing import NO_ATTEMPT, Attempt
from planbus.llm.accounting import Cost
from planbus.llm.plan import Lead, LeadId, RequestId, lead_from_row


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
    started: float = field(default_factory=time.monotonic)
    throttled: int = 0  # earlier claims the provider throttled: they spent no attempt
    call_started: float = 0.0  # monotonic time this claim's LLM call started
    cost: Cost | None = None  # what the planning call cost, stored beside the plan
    traceparent: str | None = None  # the client's W3C trace context, sent with its insert
    trace: Attempt = NO_ATTEMPT  # this attempt's spans (nothing, unless tracing is on)

    @property
    def spent_attempts(self) -> int:
        """Claims that count against PLANBUS_MAX_ATTEMPTS: every claim but the throttled ones."""
        return self.attempt - self.throttled

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> Claim:
        """Build a claim from one row of `queries.CLAIM`."""
        return cls(
            id=RequestId(row["id"]),
            lead_id=LeadId(row["lead_id"]),
            telegram_id=row["telegram_id"],
            attempt=row["attempts"],
            throttled=row["throttled_claims"],
            token=row["claim_token"],
            waited_seconds=max(0.0, row["waited_seconds"] or 0.0),
            lead=lead_from_row(row) if row["lead_found"] else None,
            traceparent=row["traceparent"],
        )
