"""The provider's lines of `python -m planbus status`: pause, backoff, throttled requests, pace,
why workers claim nothing, tokens."""

from __future__ import annotations

from typing import Any

import psycopg
from psycopg.rows import dict_row

from planbus.ops import admin_queries


async def status_report(conn: psycopg.AsyncConnection[Any]) -> dict[str, Any]:
    """The provider's side of the queue: pause, throttled requests, pace, last hour's tokens."""
    cursor = conn.cursor(row_factory=dict_row)
    await cursor.execute(admin_queries.STATUS_PROVIDER)
    report: dict[str, Any] = dict(await cursor.fetchone() or {})
    await cursor.execute(admin_queries.STATUS_HELD_BACK)
    report.update(await cursor.fetchone() or {})
    await cursor.execute(admin_queries.STATUS_TOKENS_LAST_HOUR)
    report["tokens_last_hour"] = await cursor.fetchall()
    return report


def status_lines(report: dict[str, Any]) -> list[str]:
    """The status command's lines about the LLM provider."""
    paused = report.get("paused_seconds") or 0.0
    pace = f"{report.get('finished_last_minute', 0)} requests finished in the last minute"
    refusals = report.get("refusals") or 0
    if paused > 0:
        why = "the provider said to wait"
        if refusals > 1:
            why = f"backing off after {refusals} rounds of refusals that named no wait"
        pace = f"paused for {paused:.1f}s more ({why}); {pace}"
    waiting = report.get("throttled_waiting", 0)
    if waiting:
        pace += f"; {waiting} throttled requests waiting"
    lines = [f"LLM provider: {pace}"]
    for worker in report.get("held_back") or []:
        lines.append(f"worker {worker['worker_id']} claims nothing: {worker['held_back']}")
    usage = report.get("tokens_last_hour") or []
    if not usage:
        lines.append("tokens in the last hour: none")
    for row in usage:
        lines.append(
            f"tokens in the last hour: {row['model']}: {row['prompt_tokens'] or 0} prompt + "
            f"{row['completion_tokens'] or 0} completion in {row['plans']} plans"
        )
    return lines
