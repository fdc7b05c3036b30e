"""The JSON schema sent to the model bounds its answer; the plan's rules are still checked after.

A grammar-constrained server (llama.cpp, vLLM, OpenAI's strict structured outputs) can only
write what the schema allows, so every rule a schema can say is said there. `conforms` below is
a small reader of exactly the keywords the schema uses, so these tests need no schema library.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from typing import Any, get_args

import pytest

from planbus.llm.plan import (
    MAX_CONNECT_TEXT,
    MAX_DELAY_DAYS,
    MAX_STEPS,
    ActionType,
    InvalidPlan,
    Lead,
    LeadId,
    validate_plan,
)
from planbus.llm.planner import template_steps
from planbus.llm.schema import (
    after_refusal,
    plan_json_schema,
    positional_plan_json_schema,
    schema_ladder,
)
from tests.helpers import Database, running_worker
from tests.llm_server import FakeLLM, Reply

# What both OpenAI's strict mode and llama.cpp's json-schema-to-grammar read (its README:
# grammars/README.md, "JSON Schemas -> GBNF"); anything else a grammar would skip silently.
KEYWORDS = {
    "type",
    "properties",
    "required",
    "additionalProperties",
    "items",
    "anyOf",
    "enum",
    "minItems",
    "maxItems",
    "minimum",
    "maximum",
    "minLength",
    "maxLength",
    "prefixItems",
    "const",
    "$ref",
    "$defs",
}
TYPES = {
    "object": dict,
    "array": list,
    "string": str,
    "integer": int,
    "null": type(None),
}


def conforms(schema: dict[str, Any], value: Any, root: dict[str, Any] | None = None) -> bool:
    """Does `value` match `schema`? Only the keywords in KEYWORDS, as JSON Schema defines them,
    but two: `const` also compares types (1.0 is not 1: `StrictInt`), and `prefixItems` is read
    alone (the strict-mode test below keeps `items` from ever standing beside it)."""
    root = schema if root is None else root
    if "$ref" in schema:
        return conforms(root["$defs"][schema["$ref"].removeprefix("#/$defs/")], value, root)
    if "anyOf" in schema:
        if not any(conforms(branch, value, root) for branch in schema["anyOf"]):
            return False
        if "type" not in schema:
            return True  # nothing beside the branches
    if "const" in schema:
        return type(value) is type(schema["const"]) and bool(value == schema["const"])
    kinds = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
    kind = next((k for k in kinds if isinstance(value, TYPES[k])), None)
    if kind is None or isinstance(value, bool):
        return False
    if "enum" in schema and value not in schema["enum"]:
        return False
    return conforms_as(kind, schema, value, root)


def conforms_as(kind: str, schema: dict[str, Any], value: Any, root: dict[str, Any]) -> bool:
    """The keywords of one type: properties, items and counts, lengths, ranges."""
    if kind == "object":
        properties = schema["properties"]
        return set(value) == set(properties) and all(
            conforms(properties[name], item, root) for name, item in value.items()
        )
    if kind == "array":
        sized = schema.get("minItems", 0) <= len(value) <= schema.get("maxItems", len(value))
        items = schema.get("prefixItems") or [schema["items"]] * len(value)
        return sized and all(conforms(s, item, root) for s, item in zip(items, value, strict=False))
    if kind == "string":
        return bool(schema.get("minLength", 0) <= len(value) <= schema.get("maxLength", len(value)))
    if kind == "integer":
        return bool(schema.get("minimum", value) <= value <= schema.get("maximum", value))
    return True


def walk(schema: Any) -> Iterator[dict[str, Any]]:
    """Every schema object inside `schema`, itself included."""
    if isinstance(schema, dict):
        yield schema
        for value in schema.values():
            yield from walk(value)
    elif isinstance(schema, list):
        for item in schema:
            yield from walk(item)


def plan(**changes: Any) -> dict[str, Any]:
    """The template's plan (delays 0, 2, 4, 6, 9, 12; step 2 a comment, 3 a connect), changed."""
    steps = template_steps(Lead(id=LeadId(1), telegram_id=1, prospect_name="Ada Lovelace"))
    for key, value in changes.items():
        index, field = key.split("_", 1)
        steps[int(index.removeprefix("s"))][field] = value
    return {"steps": steps}


async def one_request(database: Database, **overrides: Any) -> dict[str, Any]:
    lead = await database.insert_lead()
    async with running_worker(database.url, planner="openai", **overrides):
        return await database.wait_for(await database.insert_request(lead))


# -- the schema --------------------------------------------------------------------------------


BOTH = [plan_json_schema(), positional_plan_json_schema()]


@pytest.mark.anyio
async def test_the_first_schema_sent_is_the_positional_one(
    database: Database, llm: FakeLLM
) -> None:
    assert (await one_request(database))["status"] == "completed"
    schema = llm.calls[0].body["response_format"]["json_schema"]["schema"]
    assert schema == positional_plan_json_schema()
    # Step k can only carry step_id k, and step 1 is for today: rules a single item can't say.
    assert not conforms(schema, plan(s1_step_id=3))
    assert not conforms(schema, plan(s0_step_id=2, s1_step_id=3, s2_step_id=4))
    assert not conforms(schema, plan(s0_delay_days=1))
    steps = plan()["steps"]
    for length in range(1, MAX_STEPS + 1):
        numbered = [step | {"step_id": k} for k, step in enumerate(steps * 2, start=1)]
        assert conforms(schema, {"steps": numbered[:length]})
    assert not conforms(schema, {"steps": []})
    assert not conforms(schema, {"steps": [s | {"step_id": k} for k, s in enumerate(steps * 2, 1)]})
    # Beside the tuples, the item schema's bounds: for a converter that reads only those.
    sent_steps = schema["properties"]["steps"]
    assert (sent_steps["minItems"], sent_steps["maxItems"]) == (1, MAX_STEPS)
    assert len(sent_steps["items"]["anyOf"]) == 3


def test_the_item_schema_bounds_counts_ranges_texts_and_each_kind_of_step() -> None:
    steps = plan_json_schema()["properties"]["steps"]
    assert (steps["minItems"], steps["maxItems"]) == (1, MAX_STEPS)
    kinds = {
        action: branch["properties"]
        for branch in steps["items"]["anyOf"]
        for action in branch["properties"]["action_type"]["enum"]
    }
    assert sorted(kinds) == sorted(get_args(ActionType))
    assert sum(len(b["properties"]["action_type"]["enum"]) for b in steps["items"]["anyOf"]) == 8
    for step in kinds.values():
        assert step["step_id"] == {"type": "integer", "minimum": 1, "maximum": MAX_STEPS}
        assert step["delay_days"] == {"type": "integer", "minimum": 0, "maximum": MAX_DELAY_DAYS}
        assert step["description"]["minLength"] == 1
        for text in ("description", "timing"):
            assert 0 < step[text]["maxLength"] <= 600
    assert kinds["linkedin_comment"]["suggested_text"] == {"type": "null"}
    assert kinds["linkedin_connect"]["suggested_text"]["maxLength"] == MAX_CONNECT_TEXT
    assert kinds["email_outreach"]["suggested_text"]["maxLength"] <= 600


@pytest.mark.parametrize(
    "schema",
    [plan_json_schema(), plan_json_schema(False), positional_plan_json_schema()],
    ids=["items", "items without lengths", "positional"],
)
def test_the_schema_keeps_to_strict_mode_and_to_what_a_grammar_reads(
    schema: dict[str, Any],
) -> None:
    assert "anyOf" not in schema  # OpenAI: the root is an object
    for node in walk(schema):
        if "type" in node or "anyOf" in node:
            assert set(node) <= KEYWORDS, set(node) - KEYWORDS
        if "properties" in node:
            # OpenAI strict: no other fields, every field required; llama.cpp: no anyOf beside.
            assert node["additionalProperties"] is False
            assert node["required"] == list(node["properties"])
            assert "anyOf" not in node
        if "prefixItems" in node:
            # llama.cpp reads a tuple as exactly its items; a validator needs the bounds.
            assert node["minItems"] == node["maxItems"] == len(node["prefixItems"])
            assert "items" not in node  # llama.cpp would read `items` and drop the tuple
    lengths = [n for n in walk(schema) if "maxLength" in n or "minLength" in n]
    assert bool(lengths) is (schema != plan_json_schema(False))


@pytest.mark.parametrize(
    "broken",
    [
        {"s1_suggested_text": "Great post!"},  # a comment with a text
        {"s2_suggested_text": "x" * (MAX_CONNECT_TEXT + 1)},
        {"s5_delay_days": MAX_DELAY_DAYS + 1},
        {"s0_delay_days": -1},
        {"s0_delay_days": 4.5},
        {"s0_step_id": 0},
        {"s0_step_id": 1234},
        {"s0_action_type": "twitter_follow"},
        {"s0_description": ""},
        {"s0_description": "x" * 2000},
        {"s0_status": "done"},
        {"s0_completed_at": "2024-05-01T00:00:00Z"},
    ],
)
@pytest.mark.parametrize("schema", BOTH, ids=["items", "positional"])
def test_what_the_schema_can_say_it_refuses_and_so_does_validation(
    broken: dict[str, Any], schema: dict[str, Any]
) -> None:
    assert conforms(schema, plan())
    data = plan(**broken)
    assert not conforms(schema, data)
    if broken != {"s0_description": "x" * 2000}:  # long is bounded for the model, not a rule
        with pytest.raises(InvalidPlan):
            validate_plan(data)


def test_the_step_count_is_bounded_by_the_schema() -> None:
    steps = plan()["steps"]
    assert not conforms(plan_json_schema(), {"steps": []})
    assert not conforms(plan_json_schema(), {"steps": [steps[0]] * (MAX_STEPS + 1)})


@pytest.mark.parametrize(
    ("unsayable", "schemas"),
    [
        ({"s3_delay_days": 1}, BOTH),  # delays decrease: 0, 2, 4, 1, ...
        ({"s1_step_id": 3}, BOTH[:1]),  # ids skip: 1, 3, 3, ... (the positional one says it)
        ({"s0_description": "   "}, BOTH),  # blank
    ],
)
def test_a_plan_that_fits_the_schema_but_breaks_a_rule_is_still_rejected(
    unsayable: dict[str, Any], schemas: list[dict[str, Any]]
) -> None:
    data = plan(**unsayable)
    assert all(conforms(schema, data) for schema in schemas)
    with pytest.raises(InvalidPlan):
        validate_plan(data)


@pytest.mark.anyio
async def test_a_plan_with_decreasing_delays_from_the_server_is_never_stored(
    database: Database, llm: FakeLLM
) -> None:
    llm.default = Reply(content=json.dumps(plan(s3_delay_days=1)))
    request = await one_request(database, max_attempts=1)
    assert request["status"] == "failed"
    assert "delay_days must never decrease" in request["result"]["error"]


# -- a server that refuses part of the schema --------------------------------------------------


def openai_refusal(context: str, keyword: str) -> dict[str, Any]:
    """OpenAI's strict mode refusing a keyword of the schema (HTTP 400)."""
    return {
        "error": {
            "message": "Invalid schema for response_format 'engagement_plan': In context=("
            f"{context}), '{keyword}' is not permitted.",
            "type": "invalid_request_error",
            "param": "response_format",
        }
    }


LLAMA_REFUSES_REF = {
    "error": {
        "code": 400,
        "message": "Unable to generate parser for this template. Automatic parser generation "
        "failed: JSON schema error at #/properties/steps/anyOf/0/prefixItems/0: cannot resolve "
        "$ref #/$defs/step_1, $defs not found",
        "type": "invalid_request_error",
    }
}


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("refusal", "then", "sending"),
    [
        # The refusal names maxLength: every schema with text lengths is skipped, the positional
        # one kept (one refused call, not one per schema that has lengths).
        (
            openai_refusal("'properties', 'description'", "maxLength"),
            positional_plan_json_schema(text_lengths=False),
            "the positional schema without text lengths",
        ),
        (
            openai_refusal("'properties', 'steps', 'anyOf', '0'", "prefixItems"),
            plan_json_schema(),
            "the item schema",
        ),
        # llama-server's own words for a schema its converter cannot read (measured).
        (LLAMA_REFUSES_REF, plan_json_schema(), "the item schema"),
    ],
    ids=["maxLength", "prefixItems", "llama-server"],
)
async def test_a_server_that_refuses_a_keyword_gets_a_schema_without_it_from_then_on(
    database: Database,
    llm: FakeLLM,
    caplog: pytest.LogCaptureFixture,
    refusal: dict[str, Any],
    then: dict[str, Any],
    sending: str,
) -> None:
    llm.script(Reply(status=400, body=refusal))
    lead = await database.insert_lead()
    async with running_worker(database.url, planner="openai"):
        first = await database.wait_for(await database.insert_request(lead))
        second = await database.wait_for(await database.insert_request(lead))

    assert first["status"] == second["status"] == "completed"
    assert first["attempts"] == 1
    schemas = [call.body["response_format"]["json_schema"]["schema"] for call in llm.calls]
    assert schemas == [positional_plan_json_schema(), then, then]
    (warning,) = [r for r in caplog.records if "rejected the positional schema" in r.getMessage()]
    assert warning.levelno == logging.WARNING
    assert f"sending {sending} from now on" in warning.getMessage()


def test_the_schemas_without_text_lengths_have_none() -> None:
    for schema in (plan_json_schema(False), positional_plan_json_schema(False)):
        assert not [n for n in walk(schema) if "maxLength" in n or "minLength" in n]


POSITIONAL, ITEM = "the positional schema", "the item schema"
UNBOUNDED = " without text lengths"


@pytest.mark.parametrize(
    ("detail", "left"),
    [
        ("'maxLength' is not permitted", [POSITIONAL + UNBOUNDED, ITEM + UNBOUNDED]),
        ("'prefixItems' is not permitted", [ITEM, ITEM + UNBOUNDED]),
        ("'const' and 'minLength' are not permitted", [ITEM + UNBOUNDED]),
        ("invalid schema", [POSITIONAL + UNBOUNDED, ITEM, ITEM + UNBOUNDED]),
    ],
)
def test_a_refusal_skips_every_schema_that_carries_what_it_names(
    detail: str, left: list[str]
) -> None:
    ladder = schema_ladder()
    assert [step.name for step in ladder] == [
        POSITIONAL,
        POSITIONAL + UNBOUNDED,
        ITEM,
        ITEM + UNBOUNDED,
    ]
    assert [step.name for step in after_refusal(ladder, ladder[0], detail)] == left
