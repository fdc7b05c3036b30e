"""The streamed answer: server-sent events parsed, and each finished step published in order."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Iterable
from typing import Any

import pytest

from planbus.errors import TransientError
from planbus.llm.openai_body import MAX_TOKENS
from planbus.llm.openai_planner import (
    EMPTY_STREAMS_IN_A_ROW,
    MAX_ANSWER_BYTES,
    OpenAIPlanner,
    parse_plan,
)
from planbus.llm.openai_stream import (
    AnswerTooLarge,
    NoContentDeltas,
    Progress,
    StepCollector,
    StreamBroken,
    read_body,
    read_stream,
)
from planbus.llm.plan import Lead, LeadId
from planbus.llm.planner import template_steps
from planbus.settings import load_settings
from tests.llm_server import FakeLLM, Reply

pytestmark = pytest.mark.anyio

STEPS = template_steps(Lead(id=LeadId(1), telegram_id=1, prospect_name="Ada Lovelace"))
ANSWER = json.dumps({"steps": STEPS}, indent=2)


def pieces(text: str, size: int = 3) -> list[str]:
    """The answer as a model streams it: a few characters at a time."""
    return [text[i : i + size] for i in range(0, len(text), size)]


def collect(text: str, size: int = 3) -> tuple[StepCollector, list[Progress]]:
    seen: list[Progress] = []
    collector = StepCollector(seen.append)
    for piece in pieces(text, size):
        collector.feed(piece)
    return collector, seen


def sse(deltas: Iterable[str], *, usage: bool = True, done: bool = True) -> bytes:
    """A Chat Completions stream as OpenAI sends it: one event per delta, usage, [DONE]."""
    events: list[dict[str, Any]] = [
        {"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}
    ]
    events += [{"choices": [{"index": 0, "delta": {"content": d}}]} for d in deltas]
    events.append({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
    if usage:
        events.append({"choices": [], "usage": {"prompt_tokens": 9, "completion_tokens": 99}})
    body = "".join(f"data: {json.dumps(e)}\n\n" for e in events)
    return (body + ("data: [DONE]\n\n" if done else "")).encode()


async def chunked(data: bytes, size: int) -> AsyncIterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i : i + size]


def test_each_step_is_published_once_the_next_one_starts() -> None:
    collector, seen = collect(ANSWER)
    # Steps 1..5 are published while the model writes; the last one only ends with the answer.
    assert [len(p.steps) for p in seen] == [1, 2, 3, 4, 5]
    assert [s.model_dump(mode="json") for s in seen[-1].steps] == STEPS[:5]
    assert all(p.started_at == seen[0].started_at for p in seen)
    assert collector.text == ANSWER
    assert parse_plan(collector.text).as_json() == STEPS


def test_a_step_split_anywhere_is_never_published_half_written() -> None:
    for size in (1, 2, 7, 50):
        _, seen = collect(ANSWER, size)
        for progress in seen:
            assert [s.model_dump(mode="json") for s in progress.steps] == STEPS[
                : len(progress.steps)
            ]


def test_an_answer_in_one_piece_publishes_nothing() -> None:
    _, seen = collect(ANSWER, size=len(ANSWER))
    assert seen == []


def test_a_step_that_breaks_its_own_rule_stops_publishing() -> None:
    broken = [dict(step) for step in STEPS]
    broken[2]["description"] = "   "
    _, seen = collect(json.dumps({"steps": broken}))
    assert [len(p.steps) for p in seen] == [1, 2]


def test_the_whole_plan_rules_fail_at_the_end_though_first_steps_were_shown() -> None:
    decreasing = [dict(step) for step in STEPS]
    decreasing[-1]["delay_days"] = 1  # after 9: the plan's delays decrease at its last step
    collector, seen = collect(json.dumps({"steps": decreasing}))
    assert [len(p.steps) for p in seen] == [1, 2, 3, 4, 5]
    with pytest.raises(Exception, match="delay_days must never decrease"):
        parse_plan(collector.text)


def test_steps_out_of_order_are_not_shown() -> None:
    renumbered = [dict(step) for step in STEPS]
    renumbered[1]["step_id"] = 3
    _, seen = collect(json.dumps({"steps": renumbered}))
    assert [len(p.steps) for p in seen] == [1]


def test_text_that_is_not_json_publishes_nothing() -> None:
    _, seen = collect("Sure! Here is your plan: {steps: [{}, {}]}")
    assert seen == []


async def test_a_stream_is_read_to_its_end_with_usage() -> None:
    seen: list[Progress] = []
    collector = StepCollector(seen.append)
    answer = await read_stream(chunked(sse(pieces(ANSWER)), 17), 10_000_000, collector)
    assert answer.content == ANSWER
    assert answer.finish_reason == "stop"
    assert answer.usage == {"prompt_tokens": 9, "completion_tokens": 99}
    assert [len(p.steps) for p in seen] == [1, 2, 3, 4, 5]


async def test_a_stream_with_crlf_lines_and_comments_is_read() -> None:
    body = sse(pieces(ANSWER)).replace(b"\n", b"\r\n")
    answer = await read_stream(chunked(b": keep-alive\r\n\r\n" + body, 5), 10**7, StepCollector())
    assert answer.content == ANSWER


async def test_a_stream_cut_in_the_middle_is_broken() -> None:
    body = sse(pieces(ANSWER))
    with pytest.raises(StreamBroken, match="ended before the answer did"):
        await read_stream(chunked(body[: len(body) // 2], 64), 10**7, StepCollector())


async def test_an_error_event_in_the_stream_is_broken() -> None:
    body = sse(pieces(ANSWER)[:5], done=False).split(b'data: {"choices": [{"index": 0, "delta": {}')
    cut = body[0] + b'data: {"error": {"message": "overloaded"}}\n\n'
    with pytest.raises(StreamBroken, match="reported an error"):
        await read_stream(chunked(cut, 64), 10**7, StepCollector())


async def test_a_stream_without_content_deltas_says_so() -> None:
    with pytest.raises(NoContentDeltas):
        await read_stream(chunked(sse([]), 64), 10**7, StepCollector())


async def test_a_stream_past_the_byte_limit_stops_there() -> None:
    body = sse(pieces(ANSWER))
    with pytest.raises(AnswerTooLarge, match="exceeded 1000 bytes"):
        await read_stream(chunked(body, 64), 1000, StepCollector())


async def test_a_body_past_the_byte_limit_stops_there() -> None:
    assert await read_body(chunked(b"x" * 1000, 64), 1000) == b"x" * 1000
    with pytest.raises(AnswerTooLarge):
        await read_body(chunked(b"x" * 1001, 64), 1000)


def test_following_stops_past_the_text_limit() -> None:
    huge = [dict(step) for step in STEPS]
    huge[0]["description"] = "x" * 70_000
    _, seen = collect(json.dumps({"steps": huge}), size=1000)
    assert seen == []


def test_progress_is_stored_as_the_steps_and_the_start() -> None:
    _, seen = collect(ANSWER)
    stored = seen[0].as_json()
    assert stored["steps"] == STEPS[:1]
    assert stored["started_at"] == seen[0].started_at.isoformat()


# -- the planner's call, against the tests' loopback server ------------------------------------


@pytest.fixture
async def planner(llm: FakeLLM) -> AsyncIterator[OpenAIPlanner]:
    planner = OpenAIPlanner(load_settings({"planner": "openai", "llm_timeout_seconds": 5.0}))
    yield planner
    await planner.aclose()


LEAD = Lead(id=LeadId(7), telegram_id=7, prospect_name="Ada Lovelace")


async def test_the_call_asks_for_a_stream_with_usage_and_a_token_limit(
    llm: FakeLLM, planner: OpenAIPlanner
) -> None:
    plan = await planner.plan(LEAD)
    assert len(plan.steps) == len(template_steps(Lead(id=LeadId(0), telegram_id=0)))
    [call] = llm.calls
    assert call.body["stream"] is True
    assert call.body["stream_options"] == {"include_usage": True}
    assert call.body["max_tokens"] == MAX_TOKENS
    assert call.body["response_format"]["type"] == "json_schema"


async def test_a_whole_answer_to_a_streamed_call_is_read_as_before_and_shows_nothing(
    llm: FakeLLM, planner: OpenAIPlanner
) -> None:
    # A server that ignores `stream` and answers with one JSON body (as the benchmarks' does).
    message = {"role": "assistant", "content": ANSWER}
    whole = {"choices": [{"index": 0, "finish_reason": "stop", "message": message}]}
    llm.script(Reply(body=whole))
    seen: list[Progress] = []
    plan = await planner.plan(LEAD, seen.append)
    assert plan.as_json() == STEPS
    assert seen == []


async def test_steps_are_passed_on_as_the_model_writes_them(
    llm: FakeLLM, planner: OpenAIPlanner
) -> None:
    llm.script(Reply(steps=STEPS, tokens_per_second=400))
    seen: list[tuple[float, int]] = []
    plan = await planner.plan(LEAD, lambda p: seen.append((time.time(), len(p.steps))))
    assert plan.as_json() == STEPS
    [call] = llm.calls
    assert call.finished is not None
    # Step k is passed on after the model wrote it and before the answer ended.
    assert [count for _, count in seen] == [1, 2, 3, 4, 5]
    for (when, count), written in zip(seen, call.step_times, strict=False):
        assert written <= when < call.finished, count


async def test_a_server_that_cannot_stream_a_json_schema_answer_gets_whole_calls_from_then_on(
    planner: OpenAIPlanner, llm: FakeLLM, caplog: pytest.LogCaptureFixture
) -> None:
    llm.limits.stream_json_schema = False
    assert len((await planner.plan(LEAD)).steps) == len(STEPS)
    assert len((await planner.plan(LEAD)).steps) == len(STEPS)
    assert [bool(call.body.get("stream")) for call in llm.calls] == [True, False, False]
    assert {call.body["response_format"]["type"] for call in llm.calls} == {"json_schema"}
    warnings = [r for r in caplog.records if "cannot stream a structured answer" in r.message]
    assert len(warnings) == 1


async def test_a_stream_without_content_costs_only_its_own_request_a_whole_call(
    planner: OpenAIPlanner, llm: FakeLLM, caplog: pytest.LogCaptureFixture
) -> None:
    llm.script(Reply(no_content=True))
    assert len((await planner.plan(LEAD)).steps) == len(STEPS)
    seen: list[Progress] = []
    llm.script(Reply(steps=STEPS, tokens_per_second=400))
    assert len((await planner.plan(LEAD, seen.append)).steps) == len(STEPS)
    # The empty stream's request asked again for a whole answer; the next one streams as before.
    assert [bool(call.body.get("stream")) for call in llm.calls] == [True, False, True]
    assert [len(progress.steps) for progress in seen] == [1, 2, 3, 4, 5]
    assert not [r for r in caplog.records if "cannot stream" in r.message]


async def test_streams_that_keep_coming_empty_get_whole_calls_from_then_on(
    planner: OpenAIPlanner, llm: FakeLLM, caplog: pytest.LogCaptureFixture
) -> None:
    llm.default = Reply(no_content=True)  # streams carry nothing; whole answers are plans
    for _ in range(EMPTY_STREAMS_IN_A_ROW + 1):
        assert len((await planner.plan(LEAD)).steps) == len(STEPS)
    streamed = [bool(call.body.get("stream")) for call in llm.calls]
    assert streamed == [True, False] * EMPTY_STREAMS_IN_A_ROW + [False]
    warnings = [r for r in caplog.records if "cannot stream a structured answer" in r.message]
    assert len(warnings) == 1
    assert f"{EMPTY_STREAMS_IN_A_ROW} streams in a row carried no content" in warnings[0].message


async def test_a_connection_the_server_closed_after_a_stream_is_not_a_failed_call(
    planner: OpenAIPlanner, llm: FakeLLM
) -> None:
    # llama-server closes the kept-alive connection after each streamed answer; the next call,
    # sent on it before the close arrives, is never read. It is sent again, on a new one.
    llm.script(Reply(close_after=0.3))
    for _ in range(2):
        assert len((await planner.plan(LEAD)).steps) == len(STEPS)
    assert [call.status for call in llm.calls] == [200, 200]


async def test_a_stream_cut_in_the_middle_is_a_transient_error(
    planner: OpenAIPlanner, llm: FakeLLM
) -> None:
    seen: list[Progress] = []
    llm.script(Reply(steps=STEPS, tokens_per_second=2000, cut_after=200))
    with pytest.raises(TransientError, match="answer broke off") as raised:
        await planner.plan(LEAD, seen.append)
    assert raised.value.kind == "connection"
    assert seen  # some steps were shown before the cut


async def test_an_answer_past_the_byte_limit_is_invalid_output(
    llm: FakeLLM, planner: OpenAIPlanner
) -> None:
    llm.script(Reply(content="x" * (MAX_ANSWER_BYTES + 1)))
    with pytest.raises(TransientError) as raised:
        await planner.plan(LEAD)
    assert raised.value.message == (
        f"The model's output was invalid: the answer exceeded {MAX_ANSWER_BYTES} bytes."
    )
    assert raised.value.kind == "invalid_output"


async def test_content_and_usage_in_the_last_chunk_are_read_once() -> None:
    # Some servers put the last piece of content, the finish reason and usage in one chunk.
    last = {
        "choices": [{"index": 0, "delta": {"content": ANSWER[-5:]}, "finish_reason": "stop"}],
        "usage": {"completion_tokens": 7},
        "model": "m",
    }
    body = sse(pieces(ANSWER[:-5]), usage=False, done=False).replace(
        b'data: {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}',
        b"data: " + json.dumps(last).encode(),
    )
    answer = await read_stream(chunked(body, 100), 10**7, StepCollector())
    assert answer.content == ANSWER
    assert (answer.finish_reason, answer.usage, answer.model) == (
        "stop",
        {"completion_tokens": 7},
        "m",
    )
