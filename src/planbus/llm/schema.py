"""The JSON schemas sent as `response_format`: the plan's rules, as far as a grammar can hold them.

A grammar-constrained server (llama.cpp's json-schema-to-grammar, vLLM's structured outputs,
OpenAI's strict mode) can only write what the schema allows, so every rule a schema can say is
said here; `validate_plan` still checks every rule afterwards, whatever the server did, and a
plan that breaks one is rejected, never repaired.

Two shapes. The positional schema, sent first, spells the steps out by position (`prefixItems`,
one tuple per length 1..10): step k can only carry `step_id` k, and step 1 is for today
(`delay_days` 0, a nudge for the model rather than a rule). On llama.cpp's `llama-server` a 135M
model otherwise numbered its steps from anywhere between 2 and 8 in about a third of its answers
(`python -m benchmarks.run --only real_model`), which no keyword on a single item can prevent.
The item schema (`plan_json_schema`) says the same rules on every step alike, for a server that
refuses the positional one: `schema_ladder` is the order they are tried in, `after_refusal` the
step down. Neither can say that delays never decrease.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, get_args

from planbus.llm.plan import MAX_CONNECT_TEXT, MAX_DELAY_DAYS, MAX_STEPS, ActionType, Step

# Lengths the JSON schema asks for, though no rule needs them: a grammar-bound model must end
# its texts, and a small one otherwise rambles for thousands of tokens (and a step shows in
# the Mini App only once it is written). A description is a sentence or two, a timing a few
# words ("Day 0", "Week 2"), a suggested message a short note, within the 500 characters a
# reminder's draft keeps; a longer text from a server without a grammar is still valid.
SCHEMA_DESCRIPTION = 240
SCHEMA_SUGGESTED_TEXT = 480
SCHEMA_TIMING = 40
# The kinds of step, each its own branch: what a step of that kind may carry as its text.
COMMENT: list[str] = ["linkedin_comment"]
CONNECT: list[str] = ["linkedin_connect"]
OTHERS: list[str] = [a for a in get_args(ActionType) if a not in (*COMMENT, *CONNECT)]
# A step's id wherever its position is not spelled out.
ANY_STEP_ID: dict[str, Any] = {"type": "integer", "minimum": 1, "maximum": MAX_STEPS}


def plan_json_schema(text_lengths: bool = True) -> dict[str, Any]:
    """The item schema: every step bounded alike, derived from the same rules as `Step`.

    1..10 steps, `step_id` 1..10, `delay_days` 0..90, the eight action types, bounded texts,
    and one branch per kind of step so that a `linkedin_comment` can only carry
    `suggested_text: null` and a `linkedin_connect` text at most 200 characters.
    `text_lengths=False` leaves out `minLength`/`maxLength`, for a server that refuses them.
    """
    fields = {"step_id": ANY_STEP_ID} | _fields(text_lengths)
    return _root(
        {
            "type": "array",
            "minItems": 1,
            "maxItems": MAX_STEPS,
            "items": {"anyOf": _kinds(fields, _texts(text_lengths))},
        }
    )


def positional_plan_json_schema(text_lengths: bool = True) -> dict[str, Any]:
    """The positional schema: step k is one of `$defs.step_k`, whose `step_id` is the constant k.

    One tuple per length (`prefixItems` with `minItems` = `maxItems`: llama.cpp reads a tuple as
    exactly its items, a JSON Schema validator needs the bounds to say so). The fields every
    position shares are written once under `$defs` and referred to. About 21 KB as sent (the
    item schema: 2 KB), encoded once per process (`openai_body.BodyTemplates`).
    """
    shared = _fields(text_lengths)
    texts = _texts(text_lengths)
    defs: dict[str, Any] = shared | {f"{kind}_text": text for kind, text in texts.items()}
    refs = {name: {"$ref": f"#/$defs/{name}"} for name in shared}
    text_refs = {kind: {"$ref": f"#/$defs/{kind}_text"} for kind in texts}
    for position in range(1, MAX_STEPS + 1):
        fields = refs | {"step_id": {"const": position}}
        if position == 1:
            fields["delay_days"] = {"const": 0}
        defs[f"step_{position}"] = {"anyOf": _kinds(fields, text_refs)}
    tuples = [
        {
            "type": "array",
            "prefixItems": [{"$ref": f"#/$defs/step_{k}"} for k in range(1, length + 1)],
            "minItems": length,
            "maxItems": length,
        }
        for length in range(1, MAX_STEPS + 1)
    ]
    # Beside the tuples, the item schema's bounds on every step (by reference): a validator
    # applies both, llama.cpp reads `anyOf` first (checked on the real server), and a
    # converter that skips `anyOf` or `prefixItems` still bounds every step.
    steps = {
        "type": "array",
        "minItems": 1,
        "maxItems": MAX_STEPS,
        "items": {"anyOf": _kinds(refs | {"step_id": ANY_STEP_ID}, text_refs)},
        "anyOf": tuples,
    }
    return _root(steps) | {"$defs": defs}


# What a refusal names when it refuses the positional shape, or the text lengths (lower case).
POSITIONAL_WORDS = ("prefixitems", "const", "$ref", "$defs", "tuple")
LENGTH_WORDS = ("maxlength", "minlength")


@dataclass(frozen=True, slots=True, eq=False)
class SchemaStep:
    """One schema the planner may send, and what in it a server may refuse (equal only to
    itself)."""

    name: str  # for the log: "the positional schema", ...
    schema: dict[str, Any]
    positional: bool
    text_lengths: bool


def schema_ladder() -> list[SchemaStep]:
    """The schemas to send, best first: positional, then the item schema; each with text
    lengths, then without (some servers refuse `maxLength`)."""
    return [
        SchemaStep(f"the {shape} schema{suffix}", build(lengths), shape == "positional", lengths)
        for shape, build in (
            ("positional", positional_plan_json_schema),
            ("item", plan_json_schema),
        )
        for lengths, suffix in ((True, ""), (False, " without text lengths"))
    ]


def after_refusal(ladder: list[SchemaStep], refused: SchemaStep, detail: str) -> list[SchemaStep]:
    """The steps left once a server refused `refused` saying `detail`: not the refused one, and
    none that carries what the refusal names (text lengths, the positional shape), so a server
    that refuses `maxLength` costs one refused call, not one per schema that has it."""
    words = detail.lower()
    lengths = any(word in words for word in LENGTH_WORDS)
    positions = any(word in words for word in POSITIONAL_WORDS)
    return [
        step
        for step in ladder
        if step is not refused
        and not (lengths and step.text_lengths)
        and not (positions and step.positional)
    ]


def _root(steps: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": {"steps": steps},
        "required": ["steps"],
        "additionalProperties": False,
    }


def _fields(text_lengths: bool) -> dict[str, Any]:
    """A step's fields but its id and its text (`_step` sets the order the model writes them)."""
    description: dict[str, Any] = {"type": "string"}
    timing: dict[str, Any] = {"type": "string"}
    if text_lengths:
        description |= {"minLength": 1, "maxLength": SCHEMA_DESCRIPTION}
        timing |= {"maxLength": SCHEMA_TIMING}
    return {
        "description": description,
        "timing": timing,
        "delay_days": {"type": "integer", "minimum": 0, "maximum": MAX_DELAY_DAYS},
        "status": {"type": "string", "enum": ["pending"]},
        "completed_at": {"type": "null"},
    }


def _texts(text_lengths: bool) -> dict[str, dict[str, Any]]:
    """What each kind of step may carry as `suggested_text`."""
    return {
        "comment": {"type": "null"},
        "connect": _text(MAX_CONNECT_TEXT, text_lengths),
        "other": _text(SCHEMA_SUGGESTED_TEXT, text_lengths),
    }


def _kinds(fields: dict[str, Any], texts: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """One branch per kind of step, so that a step's text is bound to its action type."""
    return [
        _step(fields, actions, texts[kind])
        for kind, actions in (("comment", COMMENT), ("connect", CONNECT), ("other", OTHERS))
    ]


def _step(fields: dict[str, Any], actions: list[str], text: dict[str, Any]) -> dict[str, Any]:
    properties: dict[str, Any] = {
        "step_id": fields["step_id"],
        "action_type": {"type": "string", "enum": actions},
        "description": fields["description"],
        "suggested_text": text,
        "timing": fields["timing"],
        "delay_days": fields["delay_days"],
        "status": fields["status"],
        "completed_at": fields["completed_at"],
    }
    assert set(properties) == set(Step.model_fields), "schema drifted from Step"
    return {
        "type": "object",
        "properties": properties,
        "required": list(properties),
        "additionalProperties": False,
    }


def _text(max_length: int, text_lengths: bool) -> dict[str, Any]:
    """A suggested text: a string of at most `max_length` characters, or null."""
    schema: dict[str, Any] = {"type": ["string", "null"]}
    return schema | {"maxLength": max_length} if text_lengths else schema
