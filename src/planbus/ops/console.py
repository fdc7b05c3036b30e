"""Rendering for the terminal: tables, durations, plans, the status report, a request's story.

Every text that comes from the database (a plan, an error, a name) goes through `clean()`: an
escape sequence in a model's answer must not repaint the operator's terminal.
"""

from __future__ import annotations

import argparse
import shutil
import textwrap
from datetime import datetime
from typing import Any

# C0 and C1 controls and DEL shown as visible escapes; line breaks and tabs become spaces (a
# cell is one line); bidirectional overrides shown too, so text cannot reorder what follows it.
_CONTROLS = {
    **{code: f"\\x{code:02x}" for code in (*range(0x20), *range(0x7F, 0xA0))},
    **{code: " " for code in (0x09, 0x0A, 0x0D)},
    **{code: f"\\u{code:04x}" for code in (*range(0x202A, 0x202F), *range(0x2066, 0x206A))},
}


def clean(value: object) -> str:
    """The text of `value` safe to print: no control character reaches the terminal."""
    return str(value).translate(_CONTROLS)


def plural(count: int, noun: str) -> str:
    """`1 attempt`, `2 attempts`."""
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def format_status(report: dict[str, Any]) -> str:
    counts = report["counts"]
    lines = [
        f"database: {clean(report['database'])}",
        "requests: " + ", ".join(f"{counts[s]} {s}" for s in counts),
    ]
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


def format_story(row: dict[str, Any], reminders: list[dict[str, Any]]) -> str:
    """`show ID`: status, attempts, errors, worker, timings, plan and reminders of one request."""
    result = row["result"] if isinstance(row["result"], dict) else {}
    lead = ", ".join(clean(v) for v in (row["prospect_name"], row["prospect_company"]) if v)
    lines = [
        f"request {row['id']}: {row['status']}",
        f"  lead:           {row['lead_id']}" + (f" ({lead})" if lead else ""),
        f"  telegram user:  {row['telegram_id']}",
        f"  attempts:       {row['attempts']}",
        f"  worker:         {clean(row['worker_id'] or '-')}",
        f"  created:        {timestamp(row['created_at'])}",
        f"  run after:      {timestamp(row['run_after'])}{_due(row)}",
        f"  claimed:        {timestamp(row['claimed_at'])}",
        f"  finished:       {timestamp(row['finished_at'])}"
        + (f" (ran {duration(row['ran_seconds'])})" if row["ran_seconds"] is not None else ""),
        f"  updated:        {timestamp(row['updated_at'])}",
    ]
    if row["lease_expires_at"] is not None:
        lines.append(f"  lease expires:  {timestamp(row['lease_expires_at'])}")
    for label, error in (
        ("error", result.get("error")),
        ("last error", row["last_error"]),
        ("previous error", result.get("previous_error")),
    ):
        lines.append(f"  {label + ':':<15} {clean(error) if error else '-'}")
    if result.get("model"):
        lines.append(f"  {'model:':<15} {clean(result['model'])}{_usage(result)}")
    plan = result.get("plan")
    progress = _mapping(row.get("progress"))
    if isinstance(plan, list):
        lines.append(f"plan: {plural(len(plan), 'step')}")
        lines.append(plan_table(plan, indent="  "))
    elif isinstance(progress.get("steps"), list) and progress["steps"]:
        lines.append(f"plan so far: {plural(len(progress['steps']), 'step')} (still planning)")
        lines.append(plan_table(progress["steps"], indent="  "))
    lines.append(f"reminders: {len(reminders) if reminders else 'none'}")
    if reminders:
        rows = [
            [r["step_id"], timestamp(r["due_at"]), r["status"], r["draft_text"]] for r in reminders
        ]
        lines.append(table(["step", "due", "status", "text"], rows, indent="  "))
    return "\n".join(lines)


def _mapping(value: object) -> dict[str, Any]:
    """A JSON object read from the database, or an empty one for anything else."""
    return value if isinstance(value, dict) else {}


def _usage(result: dict[str, Any]) -> str:
    usage = _mapping(result.get("usage"))
    seconds = result.get("model_seconds")
    parts = [f"{usage[k]} {k.split('_')[0]} tokens" for k in usage if isinstance(usage[k], int)]
    if isinstance(seconds, int | float):
        parts.append(f"{duration(seconds)} in the model")
    return f" ({', '.join(parts)})" if parts else ""


def progress_line(row: dict[str, Any]) -> str:
    """`request --wait`: one line per change of status or attempt."""
    head = f"request {row['id']} is {row['status']}"
    if row["status"] == "processing":
        return f"{head}: attempt {row['attempts']}, worker {clean(row['worker_id'] or '-')}"
    if row["status"] == "pending" and row["attempts"]:
        error = clean(row["last_error"] or "no error recorded")
        return f"{head} again after attempt {row['attempts']} ({error}){_due(row)}"
    return head


def _due(row: dict[str, Any]) -> str:
    due = row["due_in_seconds"]
    if row["status"] != "pending" or due is None:
        return ""
    return f", next attempt in {duration(due)}" if due > 0 else ", due now"


def timestamp(value: datetime | None) -> str:
    return "-" if value is None else f"{value:%Y-%m-%d %H:%M:%S %Z}"


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
    cells = [headers, *[["-" if c is None else clean(c) for c in row] for row in rows]]
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
    if seconds < 172_800:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


def json_value(value: Any) -> Any:
    """For json.dumps: timestamps as ISO 8601, anything else as its text."""
    return value.isoformat() if isinstance(value, datetime) else str(value)


class HelpFormatter(argparse.HelpFormatter):
    """Fills prose paragraphs to the terminal; keeps examples (indented lines) as written."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        paragraphs = []
        for paragraph in text.split("\n\n"):
            if paragraph.startswith(("  ", "examples:")):
                paragraphs.append(textwrap.indent(paragraph, indent))
            else:
                flat = " ".join(paragraph.split())
                paragraphs.append(
                    textwrap.fill(flat, width, initial_indent=indent, subsequent_indent=indent)
                )
        return "\n\n".join(paragraphs)
