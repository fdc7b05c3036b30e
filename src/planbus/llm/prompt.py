"""What the model is told: the system prompt and the lead's message, each field cut to a budget.

Provider-neutral: any planner that talks to a chat model sends these two messages.
"""

from __future__ import annotations

from importlib import resources

from planbus.llm.plan import LEAD_TEXT_FIELDS, Lead

# Characters of each lead field sent to the model, so that a 1 MB `web_research` never exceeds
# a model's context: at most 6 x 4,000 + 12,000 = 36,000 characters (about 9,000 tokens).
FIELD_BUDGET = 4_000
WEB_RESEARCH_BUDGET = 12_000
CUT_MARK = " [...cut]"

# How the prompt heads each of the lead's fields; `plan.LEAD_TEXT_FIELDS` gives which and in
# what order (a field added there without a heading here fails at import, not in a prompt).
LEAD_HEADINGS = {
    "prospect_name": "Name",
    "prospect_title": "Title",
    "prospect_company": "Company",
    "prospect_analysis": "Analysis of the prospect",
    "closing_strategy": "Closing strategy",
    "original_context": "Original context",
    "web_research": "Web research",
}
LEAD_SECTIONS: tuple[tuple[str, str, int], ...] = tuple(
    (name, LEAD_HEADINGS[name], WEB_RESEARCH_BUDGET if name == "web_research" else FIELD_BUDGET)
    for name in LEAD_TEXT_FIELDS
)


def load_prompt() -> str:
    """The system prompt, from the package data file `prompts/engagement_plan.md`."""
    prompt = resources.files("planbus.llm").joinpath("prompts/engagement_plan.md")
    return prompt.read_text(encoding="utf-8")


def user_message(lead: Lead) -> str:
    """The lead's fields that are present, each cut to its budget."""
    sections = []
    for field, heading, budget in LEAD_SECTIONS:
        text = (getattr(lead, field) or "").strip()
        if text:
            sections.append(f"## {heading}\n{cut(text, budget)}")
    if not sections:
        sections.append("(No information about the prospect was given.)")
    return "Write the engagement plan for this prospect.\n\n" + "\n\n".join(sections)


def cut(text: str, budget: int) -> str:
    """`text` if it fits in `budget` characters, else its start and a visible mark."""
    if len(text) <= budget:
        return text
    return text[: budget - len(CUT_MARK)] + CUT_MARK
