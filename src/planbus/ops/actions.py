"""What `retry` and `cancel` do, for the commands and the dashboard alike: one copy of each.

Each runs its statement of `admin_queries`, logs what an operator changed, and says for every
id it did not act on why not. Printing is the caller's (commands.py, the dashboard's page).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import psycopg
from psycopg import errors

from planbus import logs
from planbus.ops import admin_queries
from planbus.ops.client import fetchall

log = logging.getLogger("planbus.cli")

CANCELLED_ERROR = "An operator cancelled this request before it was planned."
RETRY_RACE = "a lead got a new request meanwhile; nothing was retried, try again"


@dataclass
class Outcome:
    """The rows acted on (`id`, `lead_id`, and `last_error` for a retry), and why not the rest."""

    done: list[dict[str, Any]] = field(default_factory=list)
    refused: dict[int, str] = field(default_factory=dict)  # id -> reason
    race: bool = False  # retry only: a unique violation undid the whole statement


async def retry(
    conn: psycopg.AsyncConnection[Any], ids: list[int] | None, since_seconds: float | None = None
) -> Outcome:
    """Failed requests back to `pending` (the given ids, or every failed one within `since`)."""
    chosen = sorted(set(ids)) if ids else None
    try:
        done = await fetchall(
            conn, admin_queries.RETRY_FAILED, {"ids": chosen, "since_seconds": since_seconds}
        )
    except errors.UniqueViolation:
        return Outcome(refused={i: RETRY_RACE for i in chosen or []}, race=True)
    for row in done:
        _log_operator_action(row, "requeued")
    refused = await _refusals(
        conn,
        _left(chosen or [], done),
        "retried",
        "failed",
        "its lead already has a pending or processing request",
    )
    return Outcome(done, refused)


async def cancel(conn: psycopg.AsyncConnection[Any], ids: list[int]) -> Outcome:
    """Pending requests become `failed` with the operator's sentence, and send their event."""
    chosen = sorted(set(ids))
    done = await fetchall(
        conn, admin_queries.CANCEL_PENDING, {"ids": chosen, "error": CANCELLED_ERROR}
    )
    for row in done:
        _log_operator_action(row, "cancelled")
    refused = await _refusals(
        conn, _left(chosen, done), "cancelled", "pending", "a worker claimed it meanwhile"
    )
    return Outcome(done, refused)


def _left(ids: list[int], done: list[dict[str, Any]]) -> list[int]:
    acted = {row["id"] for row in done}
    return [i for i in ids if i not in acted]


async def _refusals(
    conn: psycopg.AsyncConnection[Any], left: list[int], verb: str, expected: str, otherwise: str
) -> dict[int, str]:
    """Why each id in `left` was not acted on."""
    if not left:
        return {}
    found = await fetchall(conn, admin_queries.REQUEST_STATUSES, {"ids": left})
    statuses = {row["id"]: row["status"] for row in found}
    reasons = {}
    for request_id in left:
        status = statuses.get(request_id)
        if status is None:
            reason = "no such request"
        elif status != expected:
            reason = f"it is {status}; only {expected} requests are {verb}"
        else:
            reason = otherwise
        reasons[request_id] = f"request {request_id} not {verb}: {reason}"
    return reasons


def _log_operator_action(row: dict[str, Any], outcome: str) -> None:
    log.info(
        "request %d lead %d %s by an operator",
        row["id"],
        row["lead_id"],
        outcome,
        extra=logs.request_fields(row["id"], row["lead_id"], 0, outcome, None),
    )
