"""The page and its live sections as HTML, from templates/ with autoescape on.

Every text that comes from the database or a model (a lead's name, an error, a step's
description, a worker's id) reaches the page through Jinja2's escaping; nothing here builds
HTML by hand. The chart is an inline SVG drawn here from numbers only.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import jinja2
from markupsafe import Markup

from planbus.ops.client import STATUSES

# The page's live sections, in page order; each is a template macro of sections.html.
SECTIONS = ("counts", "provider", "workers", "planning", "chart", "requests")
CHART_MINUTES = 60
CHART_WIDTH, CHART_HEIGHT, BAR_STEP = 600, 120, 10
STEP_FIELDS = ("step_id", "action_type", "timing", "description", "suggested_text")


@dataclass(frozen=True)
class Bar:
    """One minute of the chart: where its two stacked rectangles go, and what it counts."""

    x: int
    completed: int
    failed: int
    completed_height: float
    failed_height: float
    label: str


class Renderer:
    """Templates from the package, autoescaped; `sections()` once per reading."""

    def __init__(self, csrf: str, where: str) -> None:
        self.env = jinja2.Environment(
            loader=jinja2.PackageLoader("planbus.ops.dashboard", "templates"),
            autoescape=True,
            undefined=jinja2.StrictUndefined,
            trim_blocks=True,
            lstrip_blocks=True,
        )
        self.csrf = csrf
        self.where = where
        self.macros = self.env.get_template("sections.html").make_module()

    def sections(self, data: dict[str, Any]) -> dict[str, str]:
        """Each live section's HTML for one reading of the database."""
        view = prepare(data)
        view["csrf"] = self.csrf
        return {name: str(getattr(self.macros, name)(view)) for name in SECTIONS}

    def page(self, sections: dict[str, str], now: float | None, error: str | None) -> str:
        """The whole page, its sections as the latest reading rendered them."""
        return self.env.get_template("page.html").render(
            sections={name: Markup(sections.get(name, "")) for name in SECTIONS},
            now=now or time.time(),
            error=error,
            where=self.where,
        )

    def refusal(self, title: str, text: str) -> str:
        """A small page saying why a request was refused (401, 403, 404)."""
        return self.env.get_template("refusal.html").render(title=title, text=text)


def prepare(data: dict[str, Any]) -> dict[str, Any]:
    """What the templates show, from the snapshot's rows."""
    counts = dict.fromkeys(STATUSES, 0)
    for row in data.get("counts") or []:
        counts[str(row["status"])] = int(row["count"])
    workers = data.get("workers") or []
    limits = [w["llm_limit"] for w in workers if w.get("llm_limit") is not None]
    return {
        "now": data.get("now") or time.time(),
        "counts": counts,
        "provider": data.get("provider") or {},
        "tokens": data.get("tokens") or [],
        "workers": workers,
        "calls_at_once": sum(limits) if limits else None,
        "held_back": [w for w in workers if w.get("held_back")],
        "planning": [{**row, "steps": steps(row["steps"])} for row in data.get("planning") or []],
        "recent": data.get("recent") or [],
        "chart": chart(data.get("minutes") or [], data.get("now") or time.time()),
    }


def steps(value: Any) -> list[dict[str, str]]:
    """The steps written so far as texts; whatever is not a step object is left out."""
    if not isinstance(value, list):
        return []
    shown = []
    for step in value:
        if isinstance(step, dict):
            shown.append({key: _text(step.get(key)) for key in STEP_FIELDS})
    return shown


def _text(value: Any) -> str:
    return "" if value is None else str(value)


def chart(rows: list[dict[str, Any]], now: float) -> dict[str, Any]:
    """Sixty stacked bars, completed under failed, one per clock minute up to this one."""
    this_minute = int(now // 60 * 60)
    first = this_minute - (CHART_MINUTES - 1) * 60
    per_minute = {int(row["minute"]): row for row in rows}
    empty = {"completed": 0, "failed": 0}
    counts = [
        (int(per_minute.get(m, empty)["completed"]), int(per_minute.get(m, empty)["failed"]))
        for m in range(first, this_minute + 1, 60)
    ]
    top = max([c + f for c, f in counts] + [1])
    scale = (CHART_HEIGHT - 10) / top
    bars = [
        Bar(
            x=i * BAR_STEP,
            completed=c,
            failed=f,
            completed_height=round(c * scale, 2),
            failed_height=round(f * scale, 2),
            label=time.strftime("%H:%M UTC", time.gmtime(first + i * 60)),
        )
        for i, (c, f) in enumerate(counts)
    ]
    return {
        "bars": bars,
        "top": top,
        "width": CHART_WIDTH,
        "height": CHART_HEIGHT,
        "bar_width": BAR_STEP - 2,
        "completed": sum(c for c, _ in counts),
        "failed": sum(f for _, f in counts),
    }
