"""The plan step, the lead, and the one set of rules every plan must pass before it is stored."""

from __future__ import annotations

import math
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any, Literal, NewType

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictInt,
    StrictStr,
    ValidationError,
    field_validator,
    model_validator,
)

from planbus.errors import bounded

RequestId = NewType("RequestId", int)
LeadId = NewType("LeadId", int)

ActionType = Literal[
    "linkedin_like",
    "linkedin_comment",
    "linkedin_connect",
    "linkedin_dm",
    "email_outreach",
    "mutual_intro",
    "followup_message",
    "meeting_request",
]

MAX_STEPS = 10
MAX_CONNECT_TEXT = 200
MAX_DELAY_DAYS = 90
MAX_DRAFT_TEXT = 500
# How deep a field of the model's own may nest: a plan is stored as JSON in jsonb, and a
# 256-level value breaks its serialization (it once took the worker down).
MAX_EXTRA_DEPTH = 8
# How much of each part of an error's location is shown: a key of the model's own is its text.
MAX_LOCATION_PART = 40
# What shows nothing on its own: ASCII controls and space; and beyond ASCII every separator
# (Z*), control, format (Cf: zero-width space/joiners U+200B..U+200D, word joiner U+2060,
# BOM U+FEFF, soft hyphen) and private or unassigned code point (C*), combining marks (M*),
# and the letters and symbols fonts draw as blanks.
INVISIBLE_ASCII = "".join(map(chr, range(0x21))) + "\x7f"
INVISIBLE_CATEGORIES = ("Z", "C", "M")
BLANK_CHARACTERS = frozenset("\u115f\u1160\u2800\u3164\uffa0")


class Step(BaseModel):
    """One step of an engagement plan, exactly as the contract defines it."""

    # Strict types: "4.5" or 4.5 for delay_days is a broken rule, not something to coerce.
    model_config = ConfigDict(extra="allow", strict=True, frozen=True)

    step_id: StrictInt
    action_type: ActionType
    description: StrictStr
    suggested_text: StrictStr | None
    timing: StrictStr
    delay_days: StrictInt = Field(ge=0, le=MAX_DELAY_DAYS)
    status: Literal["pending"]
    completed_at: None

    @field_validator("description")
    @classmethod
    def _description_not_empty(cls, value: str) -> str:
        if not visible(value):
            raise ValueError("description must not be empty: it has no visible character")
        return value

    @model_validator(mode="after")
    def _text_rules(self) -> Step:
        if self.action_type == "linkedin_connect" and self.suggested_text is not None:
            if len(self.suggested_text) > MAX_CONNECT_TEXT:
                raise ValueError(
                    f"a linkedin_connect text must be at most {MAX_CONNECT_TEXT} characters"
                )
        if self.action_type == "linkedin_comment" and self.suggested_text is not None:
            raise ValueError("a linkedin_comment must have suggested_text null")
        return self

    @property
    def draft_text(self) -> str:
        """The reminder's draft: the suggested text, else the description, cut to 500."""
        return (self.suggested_text or self.description)[:MAX_DRAFT_TEXT]


class Plan(BaseModel):
    """`{"steps": [...]}`: 1..10 steps, numbered 1..N, delays never decreasing."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    steps: list[Step] = Field(min_length=1, max_length=MAX_STEPS)

    @model_validator(mode="after")
    def _sequence_rules(self) -> Plan:
        for index, step in enumerate(self.steps, start=1):
            if step.step_id != index:
                raise ValueError(f"step_id must run 1..N in order; step {index} has {step.step_id}")
        for earlier, later in zip(self.steps, self.steps[1:], strict=False):
            if later.delay_days < earlier.delay_days:
                raise ValueError(
                    f"delay_days must never decrease, but step {later.step_id} has "
                    f"{later.delay_days} after {earlier.delay_days} in step {earlier.step_id}"
                )
        return self

    def as_json(self) -> list[dict[str, Any]]:
        """The steps with the model's fields as given, for `result.plan` and `engagement_plan`."""
        return [step.model_dump(mode="json") for step in self.steps]


class InvalidPlan(ValueError):
    """A plan broke a step rule; the message names the rule in one sentence."""


def validate_plan(data: Any) -> Plan:
    """Validate a decoded `{"steps": [...]}` object; reject, never repair.

    What cannot be stored is named before any other broken rule. The walk that finds it runs
    only when needed: a plan that passed the schema with none of the model's own fields holds
    only the step fields' texts, and one look at them clears it.
    """
    try:
        plan = Plan.model_validate(data)
    except ValidationError as exc:
        raise InvalidPlan(unstorable(data) or describe_validation_error(exc)) from None
    if not _only_clean_texts(plan):
        problem = unstorable(data)
        if problem is not None:
            raise InvalidPlan(problem)
    return plan


def _only_clean_texts(plan: Plan) -> bool:
    """No field of the model's own, and no NUL or unpaired surrogate in any step text."""
    texts: list[str] = []
    for step in plan.steps:
        if step.model_extra:
            return False
        texts += (step.description, step.suggested_text or "", step.timing)
    return _storable("".join(texts))


def _storable(text: str) -> bool:
    """No NUL (which jsonb refuses) and no surrogate: a str decoded from JSON holds one only
    when the answer had an unpaired `\\ud800`-style escape, which no UTF-8 encoder accepts."""
    if "\x00" in text:
        return False
    if text.isascii():  # the common case, and ASCII holds no surrogate
        return True
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


def unstorable(data: Any) -> str | None:
    """What in the steps could not be stored as text or jsonb, as one sentence; else None.

    Every field, the model's own included, is walked without recursion: NUL characters,
    unpaired surrogates and values nested deeper than MAX_EXTRA_DEPTH are refused here, so a
    hostile answer fails as that request's invalid output, not later in the write.
    """
    steps = data.get("steps") if isinstance(data, dict) else None
    if not isinstance(steps, list):
        return None  # the schema says what is wrong with it
    for number, step in enumerate(steps, start=1):
        if not isinstance(step, dict):
            continue
        for name, value in step.items():
            problem = _field_problem(name, value)
            if problem is not None:
                return f"step {number} {problem}"
    return None


def _field_problem(name: Any, value: Any) -> str | None:
    shown = repr(name[:40]) if isinstance(name, str) else repr(name)
    if isinstance(name, str) and not _storable(name):
        return f"has a field name with {_what(name)}: {shown}"
    pending = [(value, 0)]
    while pending:
        item, depth = pending.pop()
        if isinstance(item, str):
            if not _storable(item):
                return f"field {shown} contains {_what(item)}"
        elif isinstance(item, float) and not math.isfinite(item):
            # `1e400` decodes to inf, `NaN` to nan: JSON has no such number, and storing one
            # would turn it into null.
            return f"field {shown} holds a number JSON cannot keep ({item})"
        elif isinstance(item, dict | list):
            if depth >= MAX_EXTRA_DEPTH:
                return f"field {shown} is nested more than {MAX_EXTRA_DEPTH} levels deep"
            children = item.items() if isinstance(item, dict) else enumerate(item)
            for key, child in children:
                if isinstance(key, str) and not _storable(key):
                    return f"field {shown} holds a key with {_what(key)}"
                pending.append((child, depth + 1))
    return None


def visible(text: str) -> bool:
    """Whether `text` shows anything: not only spaces, controls and zero-width characters."""
    if "!" <= text[:1] <= "~":  # the common case: it starts with a printable ASCII character
        return True
    if text.isascii():
        return bool(text.strip(INVISIBLE_ASCII))
    for char in text.strip():  # a plain loop: it ends at the first visible character
        if char not in BLANK_CHARACTERS and not unicodedata.category(char).startswith(
            INVISIBLE_CATEGORIES
        ):
            return True
    return False


def _what(text: str) -> str:
    return "a NUL character" if "\x00" in text else "an unpaired surrogate (invalid Unicode)"


def describe_validation_error(exc: ValidationError) -> str:
    """The first broken rule as one line, e.g. `steps.2.delay_days: Input should be ...`."""
    first = exc.errors(include_url=False)[0]
    # The location may hold the model's own keys: one line, each part cut, whatever they are.
    where = ".".join(bounded(str(part), MAX_LOCATION_PART) for part in first["loc"]) or "plan"
    message = str(first["msg"]).removeprefix("Value error, ")
    if first["type"] == "missing":
        message = "required field is missing"
    elif first["type"] == "model_type":
        message = "expected a JSON object"
    return f"{where}: {message}"


@dataclass(frozen=True, slots=True)
class Lead:
    """The lead fields a planner may use; every text field may be missing."""

    id: LeadId
    telegram_id: int
    prospect_name: str | None = None
    prospect_title: str | None = None
    prospect_company: str | None = None
    prospect_analysis: str | None = None
    closing_strategy: str | None = None
    original_context: str | None = None
    web_research: str | None = None


# The lead's text fields, in the contract's order: the one list the claim and the prompt read.
# `queries.CLAIM` selects these columns by name; a column it missed fails every claim at once.
LEAD_TEXT_FIELDS: tuple[str, ...] = tuple(f.name for f in fields(Lead))[2:]


def lead_from_row(row: Mapping[str, Any]) -> Lead:
    """The lead from a claim row: `lead_id`, `lead_telegram_id` and the text fields."""
    return Lead(
        id=LeadId(row["lead_id"]),
        telegram_id=row["lead_telegram_id"],
        **{name: row[name] for name in LEAD_TEXT_FIELDS},
    )
