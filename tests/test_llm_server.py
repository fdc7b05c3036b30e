"""The fake LLM server behaves like a real provider, seen through the real openai SDK."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx2
import openai
import pytest
from openai import AsyncOpenAI

from tests.llm_limits import TokenBucket, duration
from tests.llm_server import FakeLLM, Limits, Reply
from tests.llm_stream import step_ends

pytestmark = pytest.mark.anyio

MODEL = "fake-model-7"
MESSAGES: list[Any] = [{"role": "user", "content": "Plan for Ada Lovelace"}]
SCHEMA_FORMAT: Any = {
    "type": "json_schema",
    "json_schema": {"name": "plan", "strict": True, "schema": {"type": "object"}},
}


@pytest.fixture
def server(request: pytest.FixtureRequest) -> Iterator[FakeLLM]:
    """A FakeLLM with the limits and default reply a test passes through `parametrize`."""
    limits, reply = getattr(request, "param", (None, None))
    with FakeLLM(limits=limits, default=reply) as llm:
        yield llm


@pytest.fixture
async def client(server: FakeLLM) -> AsyncIterator[AsyncOpenAI]:
    async with AsyncOpenAI(base_url=server.base_url, api_key="sk-test", max_retries=0) as sdk:
        yield sdk


async def complete(client: AsyncOpenAI) -> Any:
    return await client.chat.completions.with_raw_response.create(model=MODEL, messages=MESSAGES)


def test_durations_are_written_as_openai_writes_them() -> None:
    assert duration(0.12) == "120ms"
    assert duration(1) == "1s"
    assert duration(1.5) == "1.5s"
    assert duration(360) == "6m0s"
    assert duration(3720) == "1h2m0s"


def test_a_bucket_refills_at_its_rate() -> None:
    bucket = TokenBucket(rate=10, burst=2, now=0.0)
    assert bucket.take(0.0) is None
    assert bucket.take(0.0) is None
    refused = bucket.take(0.0)
    assert refused is not None
    assert refused.headers["retry-after-ms"] == "100"
    assert bucket.take(0.099) is not None
    assert bucket.take(0.1) is None


async def test_default_answers_carry_usage_and_echo_the_model(
    server: FakeLLM, client: AsyncOpenAI
) -> None:
    answer = await client.chat.completions.create(model=MODEL, messages=MESSAGES)
    assert answer.model == MODEL
    assert answer.usage is not None
    assert answer.usage.prompt_tokens > 0
    assert answer.usage.completion_tokens > 0
    assert answer.usage.total_tokens == answer.usage.prompt_tokens + answer.usage.completion_tokens
    assert len(json.loads(answer.choices[0].message.content or "")["steps"]) == 6
    assert server.stats()["accepted"] == 1
    assert server.stats()["refused"] == 0


@pytest.mark.parametrize("server", [(Limits(requests_per_second=20, burst=3), None)], indirect=True)
async def test_rate_limit_refuses_beyond_the_burst_with_honest_headers(
    server: FakeLLM, client: AsyncOpenAI
) -> None:
    for _ in range(3):
        passed = await complete(client)
        assert passed.headers["x-ratelimit-limit-requests"] == "3"
    with pytest.raises(openai.RateLimitError) as refused:
        await complete(client)
    error = refused.value
    assert error.status_code == 429
    assert error.code == "rate_limit_exceeded"
    assert error.type == "requests"
    assert "Rate limit reached" in error.message
    headers = error.response.headers
    wait_ms = int(headers["retry-after-ms"])
    assert 0 < wait_ms <= 50
    assert headers["retry-after"] == "1"
    assert headers["x-ratelimit-remaining-requests"] == "0"
    assert headers["x-ratelimit-reset-requests"].endswith("ms")

    await asyncio.sleep(wait_ms / 1000)
    await complete(client)  # honest: waiting retry-after-ms is enough
    assert server.stats() | {"in_flight": 0} == server.stats()
    assert server.stats()["accepted"] == 4
    assert server.stats()["rate_limited"] == server.stats()["refused"] == 1


@pytest.mark.parametrize(
    "server", [(Limits(slots=2, busy_retry_after=None), Reply(delay=0.3))], indirect=True
)
async def test_slots_refuse_beyond_k_calls_in_flight(server: FakeLLM, client: AsyncOpenAI) -> None:
    outcomes = await asyncio.gather(*(complete(client) for _ in range(5)), return_exceptions=True)
    refused = [o for o in outcomes if isinstance(o, openai.InternalServerError)]
    assert len(refused) == 3
    assert all(o.status_code == 503 for o in refused)
    assert all("retry-after" not in o.response.headers for o in refused)
    assert "server busy" in str(refused[0].body)
    assert server.stats()["busy"] == server.stats()["refused"] == 3
    assert server.stats()["max_in_flight"] == 2
    await complete(client)  # the slots are free again once the calls have ended


@pytest.mark.parametrize("server", [(Limits(quota_calls=1), None)], indirect=True)
async def test_a_spent_quota_answers_insufficient_quota(
    server: FakeLLM, client: AsyncOpenAI
) -> None:
    await complete(client)
    with pytest.raises(openai.RateLimitError) as refused:
        await complete(client)
    assert refused.value.code == "insufficient_quota"
    assert refused.value.type == "insufficient_quota"
    assert "exceeded your current quota" in refused.value.message
    assert server.stats()["quota"] == 1
    assert server.stats()["refused"] == 0  # not throttling


STREAM_REPLY = Reply(tokens_per_second=400, chunk_chars=4)


@pytest.mark.parametrize("server", [(None, STREAM_REPLY)], indirect=True)
async def test_stream_pieces_reassemble_into_the_same_json(
    server: FakeLLM, client: AsyncOpenAI
) -> None:
    whole = await client.chat.completions.create(model=MODEL, messages=MESSAGES)
    stream = await client.chat.completions.create(
        model=MODEL,
        messages=MESSAGES,
        stream=True,
        stream_options={"include_usage": True},
        response_format=SCHEMA_FORMAT,
    )
    pieces: list[str] = []
    usage = None
    async for chunk in stream:
        assert chunk.object == "chat.completion.chunk"
        assert chunk.model == MODEL
        if chunk.choices:
            pieces.append(chunk.choices[0].delta.content or "")
        else:
            usage = chunk.usage
    assert "".join(pieces) == whole.choices[0].message.content
    assert max(len(p) for p in pieces) == 4
    assert usage is not None
    assert whole.usage is not None
    assert usage.completion_tokens == whole.usage.completion_tokens
    # The server knows when each step's last piece left: one time per step, in order.
    call = server.calls[-1]
    assert len(call.step_times) == 6
    assert call.step_times == sorted(call.step_times)
    assert call.finished is not None
    assert call.finished >= call.step_times[-1]


@pytest.mark.parametrize("server", [(None, Reply(tokens_per_second=100))], indirect=True)
async def test_a_stream_keeps_its_pace(server: FakeLLM, client: AsyncOpenAI) -> None:
    content = json.dumps({"steps": [{"step_id": 1}]})  # 21 characters: 6 pieces
    server.script(Reply(content=content, tokens_per_second=100))
    started = time.monotonic()
    stream = await client.chat.completions.create(model=MODEL, messages=MESSAGES, stream=True)
    chunks = [chunk async for chunk in stream]
    assert time.monotonic() - started >= 0.06
    assert not any(c.usage for c in chunks)  # no usage chunk unless asked for
    assert len(server.calls[-1].step_times) == 1
    # A whole answer takes as long, and the server knows when the model wrote each step.
    server.script(Reply(content=content, tokens_per_second=100))
    started = time.monotonic()
    await client.chat.completions.create(model=MODEL, messages=MESSAGES)
    assert time.monotonic() - started >= 0.06
    call = server.calls[-1]
    assert call.finished is not None
    assert len(call.step_times) == 1
    assert call.arrived < call.step_times[0] <= call.finished


@pytest.mark.parametrize("server", [(None, Reply(cut_after=5))], indirect=True)
async def test_a_cut_stream_raises_in_the_client(server: FakeLLM, client: AsyncOpenAI) -> None:
    stream = await client.chat.completions.create(model=MODEL, messages=MESSAGES, stream=True)
    received: list[str] = []
    with pytest.raises((httpx2.RemoteProtocolError, openai.APIError)):
        async for chunk in stream:
            received.extend(c.delta.content or "" for c in chunk.choices)
    assert 0 < len("".join(received)) <= 20


async def test_a_cut_stream_raises_through_the_aiohttp_transport(server: FakeLLM) -> None:
    server.script(Reply(cut_after=5))
    async with AsyncOpenAI(
        base_url=server.base_url,
        api_key="sk-test",
        max_retries=0,
        http_client=openai.DefaultAioHttpClient(),
    ) as sdk:
        stream = await sdk.chat.completions.create(model=MODEL, messages=MESSAGES, stream=True)
        with pytest.raises(openai.APIConnectionError):
            async for _ in stream:
                pass


@pytest.mark.parametrize("server", [(None, Reply(no_content=True))], indirect=True)
async def test_a_stream_with_no_content_deltas(server: FakeLLM, client: AsyncOpenAI) -> None:
    stream = await client.chat.completions.create(model=MODEL, messages=MESSAGES, stream=True)
    chunks = [chunk async for chunk in stream]
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == ""
    assert chunks[-1].choices[0].finish_reason == "stop"


@pytest.mark.parametrize("server", [(Limits(stream_json_schema=False), None)], indirect=True)
async def test_a_server_can_refuse_streamed_structured_output(
    server: FakeLLM, client: AsyncOpenAI
) -> None:
    with pytest.raises(openai.BadRequestError) as refused:
        await client.chat.completions.create(
            model=MODEL, messages=MESSAGES, stream=True, response_format=SCHEMA_FORMAT
        )
    assert "stream" in refused.value.message
    # Without the schema, or without streaming, it answers.
    await client.chat.completions.create(
        model=MODEL, messages=MESSAGES, response_format=SCHEMA_FORMAT
    )
    stream = await client.chat.completions.create(model=MODEL, messages=MESSAGES, stream=True)
    assert [chunk async for chunk in stream]
    assert server.stats()["rejected"] == 1


def test_step_ends_skip_braces_inside_strings() -> None:
    content = json.dumps({"steps": [{"a": "}{"}, {"b": [1, {"c": 2}]}]})
    ends = step_ends(content)
    assert len(ends) == 2
    assert content[ends[0] - 1] == "}"
    assert json.loads(content[content.index("[") + 1 : ends[0]]) == {"a": "}{"}
