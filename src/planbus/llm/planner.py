"""Planners turn a lead into a validated plan: the Protocol, the offline template, the factory."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Protocol

from planbus.llm.plan import MAX_CONNECT_TEXT, Lead, Plan, validate_plan

if TYPE_CHECKING:
    from planbus.llm.openai_stream import ProgressCallback
    from planbus.settings import Settings

log = logging.getLogger(__name__)


class Planner(Protocol):
    """Lead in, validated plan out; raises `TransientError` or `PermanentError` on failure.

    A planner that sees the plan being written calls `on_progress` with the steps finished so
    far; the returned plan is the only one that counts.
    """

    name: str

    async def plan(self, lead: Lead, on_progress: ProgressCallback | None = None) -> Plan: ...

    async def aclose(self) -> None: ...


class TemplatePlanner:
    """Offline and deterministic: a warm-up-to-meeting cadence built from the lead's own fields."""

    name = "template"

    async def plan(self, lead: Lead, on_progress: ProgressCallback | None = None) -> Plan:
        return validate_plan({"steps": template_steps(lead)})  # all at once: no progress

    async def aclose(self) -> None:
        return None


def template_steps(lead: Lead) -> list[dict[str, Any]]:
    """Six steps over twelve days, from likes to a meeting request."""
    first_name = _first_name(lead.prospect_name)
    company = _clean(lead.prospect_company)
    at_company = f" at {company}" if company else ""
    about = f"what {company} is working on" if company else "your recent work"
    connect_text = (
        f"Hi {first_name}, I have been following {about} and would value being connected."
    )
    if len(connect_text) > MAX_CONNECT_TEXT:
        connect_text = f"Hi {first_name}, I would value being connected."[:MAX_CONNECT_TEXT]
    steps = [
        ("linkedin_like", "Like two or three of their recent LinkedIn posts", None, 0),
        (
            "linkedin_comment",
            "Leave a thoughtful comment on their most relevant recent post",
            None,
            2,
        ),
        (
            "linkedin_connect",
            f"Send a connection request to {first_name}{at_company}",
            connect_text,
            4,
        ),
        (
            "linkedin_dm",
            "Thank them for connecting and open a conversation",
            f"Thanks for connecting, {first_name}. Curious how you are approaching {about} "
            "this quarter.",
            6,
        ),
        (
            "followup_message",
            "Follow up with something useful tied to their priorities",
            f"Hi {first_name}, following up with a thought that may help with {about}.",
            9,
        ),
        (
            "meeting_request",
            "Propose a short call",
            f"{first_name}, would a 20-minute call next week be useful to compare notes?",
            12,
        ),
    ]
    return [
        {
            "step_id": number,
            "action_type": action,
            "description": description,
            "suggested_text": text,
            "timing": f"Day {delay}",
            "delay_days": delay,
            "status": "pending",
            "completed_at": None,
        }
        for number, (action, description, text, delay) in enumerate(steps, start=1)
    ]


def make_planner(settings: Settings, environ: Mapping[str, str] | None = None) -> Planner:
    """The planner the settings ask for (`auto`: openai when an API key is set)."""
    environ = os.environ if environ is None else environ
    base_url = environ.get("OPENAI_BASE_URL", "").strip()
    if settings.resolved_planner == "openai":
        from planbus.llm.openai_planner import OpenAIPlanner

        return OpenAIPlanner(settings, keyless=bool(base_url))
    if base_url and settings.planner == "auto":
        # `auto` keys on OPENAI_API_KEY (the contract), so a self-hosted server named without
        # a key would otherwise be ignored without a word.
        log.warning(
            "OPENAI_BASE_URL is set but OPENAI_API_KEY is not, so PLANBUS_PLANNER=auto uses "
            "the offline template planner and never calls %s; to use that server set "
            "OPENAI_API_KEY (any value if it needs no key) or PLANBUS_PLANNER=openai",
            base_url,
        )
    return TemplatePlanner()


def _first_name(name: str | None) -> str:
    cleaned = _clean(name)
    return cleaned.split()[0][:40] if cleaned else "there"


def _clean(text: str | None) -> str:
    # Leads are typed by people: collapse whitespace and keep names short enough for a DM.
    return " ".join((text or "").split())[:80]
