"""The openai planner: one Chat Completions call per attempt, through the official SDK.

Retries belong to the worker, not to the SDK (`max_retries=0`): every failure comes back here
at once, is converted into `TransientError` or `PermanentError`, and the worker decides when
(and whether) to try again. So one request costs at most `PLANBUS_MAX_ATTEMPTS` calls, and a
struggling server never sees the SDK's retries multiplied by planbus's.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from importlib import resources
from typing import TYPE_CHECKING, Any

import anyio
import httpx2
import openai
from openai import AsyncOpenAI

from planbus.errors import INVALID_OUTPUT, ConfigurationError, TransientError
from planbus.llm import accounting
from planbus.llm.openai_errors import ProviderErrors, server_detail
from planbus.llm.openai_stream import (
    AnswerTooLarge,
    NoContentDeltas,
    ProgressCallback,
    StepCollector,
    StreamBroken,
    read_body,
    read_stream,
)
from planbus.llm.plan import (
    LEAD_TEXT_FIELDS,
    InvalidPlan,
    Lead,
    Plan,
    plan_json_schema,
    validate_plan,
)

if TYPE_CHECKING:
    from openai.types.chat import ChatCompletionMessageParam
    from openai.types.chat.completion_create_params import ResponseFormat

    from planbus.settings import Settings

log = logging.getLogger(__name__)

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

JSON_MODE: ResponseFormat = {"type": "json_object"}

# The answer's size is bounded twice. The model may write at most MAX_TOKENS tokens (a ten-step
# plan is about 1,500), and planbus reads at most MAX_ANSWER_BYTES of the HTTP body: a streamed
# answer spends ~200 bytes of event framing per token, so 4,000 tokens stay under 1 MB, and a
# server that ignores `max_tokens` cannot fill the worker's memory.
MAX_TOKENS = 4_000
MAX_ANSWER_BYTES = 2_000_000
# Ask for the answer as server-sent events, usage in the last one; a server that answers with
# plain JSON instead (as the tests' and benchmarks' instant servers do) is read as before.
STREAM: dict[str, Any] = {"stream": True, "stream_options": {"include_usage": True}}
# With this header the SDK hands back the HTTP response before reading its body.
RAW_BODY: openai.RequestOptions = {"headers": {"X-Stainless-Raw-Response": "stream"}}
# Stands for the user message in a request body encoded once (see `BodyTemplates`).
USER_SLOT = "\x00planbus user message\x00"


class OpenAIPlanner:
    """Asks an OpenAI-compatible server for `{"steps": [...]}` and validates the answer."""

    name = "openai"

    def __init__(self, settings: Settings) -> None:
        self.model = settings.model
        self.timeout = settings.llm_timeout_seconds
        key = settings.openai_api_key.get_secret_value() if settings.openai_api_key else None
        try:
            # Base URL from OPENAI_BASE_URL, key from OPENAI_API_KEY: the way the SDK reads them.
            # The SDK's aiohttp transport (`openai[aiohttp]`): measured against its default
            # httpx2 transport, 0.97 instead of 1.45 ms of worker CPU per request and 928
            # instead of 665 calls/s in one process; its connection pool does not re-check
            # every idle keep-alive connection on each request.
            self._client = AsyncOpenAI(
                api_key=key,
                timeout=self.timeout,
                max_retries=0,
                http_client=openai.DefaultAioHttpClient(timeout=self.timeout),
            )
        except openai.OpenAIError:
            raise ConfigurationError(
                "the openai planner needs OPENAI_API_KEY (any non-empty value for a server "
                "without keys, such as a local Ollama); or set PLANBUS_PLANNER=template"
            ) from None
        self._secret = self._client.api_key
        self._errors = ProviderErrors(str(self._client.base_url), self._secret, self.timeout)
        schema = plan_json_schema()
        self._system_prompt = load_prompt()
        self._json_mode_prompt = (
            f"{self._system_prompt}\nAnswer with one JSON object that matches this JSON "
            f"Schema:\n{json.dumps(schema)}\n"
        )
        self._schema_format: ResponseFormat = {
            "type": "json_schema",
            "json_schema": {"name": "engagement_plan", "strict": True, "schema": schema},
        }
        self._json_schema_supported = True
        self._streaming_supported = True
        self._bodies = BodyTemplates(self.model)

    async def plan(self, lead: Lead, on_progress: ProgressCallback | None = None) -> Plan:
        try:
            content = await self._ask(lead, on_progress)
        except (openai.OpenAIError, TimeoutError) as exc:
            raise self._errors.classify(exc) from None
        return parse_plan(content)

    async def aclose(self) -> None:
        await self._client.close()

    async def _ask(self, lead: Lead, on_progress: ProgressCallback | None) -> str:
        user = user_message(lead)
        if self._json_schema_supported:
            try:
                return await self._complete(
                    self._system_prompt, user, self._schema_format, on_progress
                )
            except (openai.BadRequestError, openai.UnprocessableEntityError) as exc:
                if not _rejects_json_schema(exc):
                    raise
                self._fall_back_to_json_mode(exc)
        return await self._complete(self._json_mode_prompt, user, JSON_MODE, on_progress)

    async def _complete(
        self,
        system: str,
        user: str,
        response_format: ResponseFormat,
        on_progress: ProgressCallback | None,
    ) -> str:
        # The SDK's timeout bounds each network wait; this bounds the whole call.
        with anyio.fail_after(self.timeout):
            if self._streaming_supported:
                body = self._bodies.encode(system, user, response_format, stream=True)
                try:
                    return await self._call(body, StepCollector(on_progress))
                except (openai.BadRequestError, openai.UnprocessableEntityError) as exc:
                    if not _rejects_streaming(exc):
                        raise
                    self._stop_streaming(
                        f"HTTP {exc.status_code}: {server_detail(exc, self._secret) or '-'}"
                    )
                except NoContentDeltas:
                    self._stop_streaming("its stream carried no content")
            body = self._bodies.encode(system, user, response_format, stream=False)
            return await self._call(body, None)

    async def _call(self, body: bytes, collector: StepCollector | None) -> str:
        """One call; the answer's content, read as a stream when the server sends one."""
        # The SDK's generic `post` keeps its auth, base URL, timeouts and typed errors, but
        # skips the per-call transformation of the parameters and the construction of
        # response models that `chat.completions.create` does: measured, 0.64 ms of CPU per
        # call instead of 1.12 ms, which is what bounds a worker's calls per second. The body
        # goes as bytes (the SDK's default Content-Type is JSON), encoded mostly in advance.
        response = await self._client.post(
            "/chat/completions", content=body, cast_to=httpx2.Response, options=RAW_BODY
        )
        try:
            if collector is not None and _is_event_stream(response):
                streamed = await read_stream(response.aiter_bytes(), MAX_ANSWER_BYTES, collector)
                note_answer({"model": streamed.model, "usage": streamed.usage})
                return _checked_content(streamed.content, streamed.finish_reason)
            return _content(await read_body(response.aiter_bytes(), MAX_ANSWER_BYTES))
        except AnswerTooLarge as exc:
            raise TransientError(f"{INVALID_OUTPUT}: {exc}.", kind="invalid_output") from None
        except StreamBroken as exc:
            raise TransientError(
                f"The LLM server's answer broke off: {exc.reason}.", kind="connection"
            ) from None
        except httpx2.TimeoutException:
            raise TimeoutError from None  # one wait of the read took too long: a timeout
        except httpx2.TransportError:
            raise TransientError(
                "The LLM server's answer broke off before its end.", kind="connection"
            ) from None
        finally:
            await response.aclose()

    def _stop_streaming(self, reason: str) -> None:
        if self._streaming_supported:
            self._streaming_supported = False
            log.warning(
                "the LLM server cannot stream a structured answer (%s); asking for whole "
                "answers from now on, so plans appear all at once",
                reason,
            )

    def _fall_back_to_json_mode(self, exc: openai.APIStatusError) -> None:
        if self._json_schema_supported:
            self._json_schema_supported = False
            log.warning(
                "the LLM server rejected a JSON-schema response_format (HTTP %d: %s); "
                "using JSON mode plus validation from now on",
                exc.status_code,
                server_detail(exc, self._secret) or "no details",
            )


class BodyTemplates:
    """Request bodies as bytes, all but the user message encoded once per kind of call.

    The system prompt and the JSON schema are most of a body (4 KB); encoding them on every
    call cost about 0.1 ms between a claim and its request leaving.
    """

    def __init__(self, model: str) -> None:
        self.model = model
        self._parts: dict[tuple[str, str, bool], tuple[bytes, bytes]] = {}

    def encode(
        self, system: str, user: str, response_format: ResponseFormat, *, stream: bool
    ) -> bytes:
        key = (system, response_format["type"], stream)
        parts = self._parts.get(key)
        if parts is None:
            messages: list[ChatCompletionMessageParam] = [
                {"role": "system", "content": system},
                {"role": "user", "content": USER_SLOT},
            ]
            body: dict[str, Any] = {
                "model": self.model,
                "messages": messages,
                "response_format": response_format,
                "max_tokens": MAX_TOKENS,
            }
            whole = json.dumps(body | STREAM if stream else body).encode()
            head, tail = whole.split(json.dumps(USER_SLOT).encode())
            parts = self._parts[key] = (head, tail)
        return parts[0] + json.dumps(user).encode() + parts[1]


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


def parse_plan(content: str) -> Plan:
    """Decode and validate the model's answer; an invalid one is worth another attempt."""
    try:
        data = json.loads(content)
    except json.JSONDecodeError as exc:
        raise TransientError(
            f"{INVALID_OUTPUT}: it is not JSON "
            f"({exc.msg} at line {exc.lineno} column {exc.colno}).",
            kind="invalid_output",
        ) from None
    try:
        return validate_plan(data)
    except InvalidPlan as exc:
        raise TransientError(
            f"{INVALID_OUTPUT}: {str(exc).rstrip('.')}.", kind="invalid_output"
        ) from None


def _is_event_stream(response: httpx2.Response) -> bool:
    return response.headers.get("content-type", "").startswith("text/event-stream")


def _content(answer: bytes) -> str:
    # OpenAI-compatible servers vary: read defensively, and call anything unusable invalid.
    try:
        completion = json.loads(answer)
        note_answer(completion)
        choice = completion["choices"][0]
        reason = choice.get("finish_reason")
        content = choice.get("message", {}).get("content")
    except (ValueError, LookupError, TypeError, AttributeError):
        raise TransientError(
            f"{INVALID_OUTPUT}: the server's answer could not be read.", kind="invalid_output"
        ) from None
    return _checked_content(content, reason)


def _checked_content(content: Any, reason: Any) -> str:
    """The answer's text, unless it was cut at the length limit or is missing."""
    if reason == "length":
        raise TransientError(
            f"{INVALID_OUTPUT}: the answer was cut off at the length limit.", kind="invalid_output"
        )
    if isinstance(content, str):
        return content
    raise TransientError(
        f"{INVALID_OUTPUT}: the answer had no message content (finish_reason {reason}).",
        kind="invalid_output",
    )


def _rejects_json_schema(exc: openai.APIStatusError) -> bool:
    """Does this 400/422 say the server cannot do a JSON-schema `response_format`?"""
    text = _error_text(exc)
    return "json_schema" in text or "response_format" in text


def _rejects_streaming(exc: openai.APIStatusError) -> bool:
    """Does this 400/422 (to a streamed call) say the server cannot stream this answer?"""
    return "stream" in _error_text(exc)


def _error_text(exc: openai.APIStatusError) -> str:
    return f"{exc.message} {json.dumps(exc.body, default=str)}".lower()


def note_answer(completion: Mapping[str, Any]) -> None:
    """Record the model and `usage` of a Chat Completions answer (or its last streamed chunk)."""
    cost = accounting.current()
    if cost is None:
        return
    model = completion.get("model")
    if isinstance(model, str) and model:
        cost.model = model[:200]
    usage = completion.get("usage")
    if isinstance(usage, Mapping):
        cost.prompt_tokens = _count(usage.get("prompt_tokens"))
        cost.completion_tokens = _count(usage.get("completion_tokens"))


def _count(value: object) -> int | None:
    # A hostile server may send anything here; only a plain non-negative integer counts.
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**31:
        return value
    return None
