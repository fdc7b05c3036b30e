"""Rendering for the terminal: tables, durations, plans and the status report."""

from __future__ import annotations

import shutil
import textwrap
from datetime import datetime
from typing import Any


def format_status(report: dict[str, Any]) -> str:
    counts = report["counts"]
    lines = ["requests: " + ", ".join(f"{counts[s]} {s}" for s in counts)]
    oldest = report["oldest_pending"]
    if oldest is None:
        lines.append("oldest pending: none")
    else:
        due = oldest["due_in_seconds"]
        lines.append(
            f"oldest pending: request {oldest['id']} (lead {oldest['lead_id']}), waiting "
            f"{duration(oldest['age_seconds'])}, "
            + (f"retry due in {duration(due)}" if due > 0 else "due now")
        )
    processing = report["processing"]
    lines.append(f"processing: {len(processing) if processing else 'none'}")
    if processing:
        rows = [
            [
                *(r["id"], r["lead_id"], r["attempts"], r["worker_id"] or "-"),
                *(_lease(r["lease_expires_in_seconds"]), duration(r["running_seconds"])),
            ]
            for r in processing
        ]
        headers = ["request", "lead", "attempt", "worker", "lease", "running for"]
        lines.append(table(headers, rows, indent="  "))
    failures = report["failed_last_hour"]
    lines.append(f"failed in the last hour: {len(failures) if failures else 'none'}")
    if failures:
        rows = [
            [
                r["id"],
                r["lead_id"],
                r["attempts"],
                f"{r['failed_at']:%H:%M:%S %Z}",
                r["error"] or "",
            ]
            for r in failures
        ]
        lines.append(table(["request", "lead", "attempts", "at", "error"], rows, indent="  "))
    return "\n".join(lines)


def _lease(seconds: float | None) -> str:
    if seconds is None:
        return "none (the sweep recovers it)"
    return (
        f"expires in {duration(seconds)}" if seconds >= 0 else f"expired {duration(-seconds)} ago"
    )


def plan_table(plan: list[dict[str, Any]], indent: str = "") -> str:
    rows = []
    for step in plan:
        text = str(step.get("description") or "")
        if step.get("suggested_text"):
            text += f': "{step["suggested_text"]}"'
        rows.append([step.get("step_id"), step.get("delay_days"), step.get("action_type"), text])
    return table(["step", "day", "action", "text"], rows, indent=indent)


def table(headers: list[str], rows: list[list[Any]], indent: str = "") -> str:
    """Left-aligned columns; the last column is free text, wrapped to the terminal's width."""
    cells = [headers, *[["-" if c is None else str(c) for c in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers) - 1)]
    left = len(indent) + sum(width + 2 for width in widths)
    room = max(30, shutil.get_terminal_size().columns - left - 1)
    lines = []
    for row in cells:
        padded = [cell.ljust(width) for cell, width in zip(row, widths, strict=False)]
        text = textwrap.wrap(row[-1], room) or [""]
        lines.append(indent + "  ".join([*padded, text[0]]).rstrip())
        lines.extend(" " * left + more for more in text[1:])
    return "\n".join(lines)


def duration(seconds: float) -> str:
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 90:
        return f"{seconds:.1f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def json_value(value: Any) -> Any:
    """For json.dumps: timestamps as ISO 8601, anything else as its text."""
    return value.isoformat() if isinstance(value, datetime) else str(value)
