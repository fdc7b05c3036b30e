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
from typing import TYPE_CHECKING, Any

import aiohttp
import anyio
import httpx2
import openai
from openai import AsyncOpenAI

from planbus.errors import INVALID_OUTPUT, ConfigurationError, TransientError
from planbus.llm import accounting
from planbus.llm.openai_body import BodyTemplates
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
from planbus.llm.plan import InvalidPlan, Lead, Plan, validate_plan
from planbus.llm.prompt import load_prompt, user_message
from planbus.llm.schema import SchemaStep, after_refusal, plan_json_schema, schema_ladder

if TYPE_CHECKING:
    from openai.types.chat.completion_create_params import ResponseFormat

    from planbus.settings import Settings

log = logging.getLogger(__name__)

JSON_MODE: ResponseFormat = {"type": "json_object"}
NAME = "engagement_plan"  # the JSON schema's name in `response_format`
# The key sent to a server named by OPENAI_BASE_URL when OPENAI_API_KEY is not set (the SDK
# refuses to start without one; llama.cpp, Ollama and vLLM without --api-key ignore it).
KEYLESS = "no-key"

# The answer's size is bounded twice: the model may write at most MAX_TOKENS tokens
# (openai_body), and planbus reads at most MAX_ANSWER_BYTES of the HTTP body: a streamed answer
# spends ~200 bytes of event framing per token, so 4,000 tokens stay under 1 MB, and a server
# that ignores `max_tokens` cannot fill the worker's memory.
MAX_ANSWER_BYTES = 2_000_000
# A stream without content is asked again as a whole answer, for that request only; this many
# in a row (none with content between them) mean the server cannot stream: whole answers for all.
EMPTY_STREAMS_IN_A_ROW = 3
# With this header the SDK hands back the HTTP response before reading its body.
RAW_BODY: openai.RequestOptions = {"headers": {"X-Stainless-Raw-Response": "stream"}}


class OpenAIPlanner:
    """Asks an OpenAI-compatible server for `{"steps": [...]}` and validates the answer."""

    name = "openai"

    def __init__(self, settings: Settings, *, keyless: bool = False) -> None:
        """`keyless`: without OPENAI_API_KEY, call the server (a self-hosted one, named by
        OPENAI_BASE_URL) with a placeholder key instead of refusing to start."""
        self.model = settings.model
        self.timeout = settings.llm_timeout_seconds
        key = settings.openai_api_key.get_secret_value() if settings.openai_api_key else None
        if key is None and keyless:
            key = KEYLESS
            log.info("OPENAI_API_KEY is not set: calling OPENAI_BASE_URL without a key")
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
                "the openai planner needs OPENAI_API_KEY, or OPENAI_BASE_URL naming a server "
                "that needs no key (a local llama.cpp or Ollama); or set PLANBUS_PLANNER=template"
            ) from None
        self._secret = self._client.api_key
        self.base_url = str(self._client.base_url)  # where the calls go: traces name the server
        self._errors = ProviderErrors(self.base_url, self._secret, self.timeout)
        schema = plan_json_schema()
        self._system_prompt = load_prompt()
        self._json_mode_prompt = (
            f"{self._system_prompt}\nAnswer with one JSON object that matches this JSON "
            f"Schema:\n{json.dumps(schema)}\n"
        )
        # The positional schema first, then the item schema, each with text lengths and then
        # without; a server that refuses them all gets JSON mode. See `llm/schema.py`.
        self._ladder: list[tuple[SchemaStep, ResponseFormat]] = [
            (
                step,
                {
                    "type": "json_schema",
                    "json_schema": {"name": NAME, "strict": True, "schema": step.schema},
                },
            )
            for step in schema_ladder()
        ]
        self._streaming_supported = True
        self._empty_streams = 0
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
        while self._ladder:
            response_format = self._ladder[0][1]
            try:
                return await self._complete(self._system_prompt, user, response_format, on_progress)
            except (openai.BadRequestError, openai.UnprocessableEntityError) as exc:
                if not _rejects_json_schema(exc):
                    raise
                self._fall_back(response_format, exc)
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
                    content = await self._call(body, StepCollector(on_progress))
                except (openai.BadRequestError, openai.UnprocessableEntityError) as exc:
                    if not _rejects_streaming(exc):
                        raise
                    self._stop_streaming(
                        f"HTTP {exc.status_code}: {server_detail(exc, self._secret) or '-'}"
                    )
                except NoContentDeltas:
                    self._after_empty_stream()  # this request asks again, for a whole answer
                else:
                    self._empty_streams = 0
                    return content
            body = self._bodies.encode(system, user, response_format, stream=False)
            return await self._call(body, None)

    async def _call(self, body: bytes, collector: StepCollector | None) -> str:
        """One call; the answer's content, read as a stream when the server sends one."""
        # The SDK's generic `post` keeps its auth, base URL, timeouts and typed errors, but
        # skips the per-call transformation of the parameters and the construction of
        # response models that `chat.completions.create` does: measured, 0.64 ms of CPU per
        # call instead of 1.12 ms, which is what bounds a worker's calls per second. The body
        # goes as bytes (the SDK's default Content-Type is JSON), encoded mostly in advance.
        try:
            response = await self._post(body)
        except openai.APIConnectionError as exc:
            if not _stale_connection(exc):
                raise
            # A kept-alive connection the server had closed (llama-server closes one after
            # every streamed answer): the call was never read; send it once more, on a new one.
            response = await self._post(body)
        try:
            if collector is not None and _is_event_stream(response):
                streamed = await read_stream(response.aiter_bytes(), MAX_ANSWER_BYTES, collector)
                note_answer(
                    {"model": streamed.model, "usage": streamed.usage}, streamed.finish_reason
                )
                return _checked_content(streamed.content, streamed.finish_reason)
            whole = await read_body(response.aiter_bytes(), MAX_ANSWER_BYTES)
            accounting.note_first_token()  # a whole answer: its first content is its end
            return _content(whole)
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

    async def _post(self, body: bytes) -> httpx2.Response:
        return await self._client.post(
            "/chat/completions", content=body, cast_to=httpx2.Response, options=RAW_BODY
        )

    def _after_empty_stream(self) -> None:
        """One empty stream costs its own request a second call; only streams that keep
        coming empty say the server cannot stream, and then nobody is asked for one."""
        self._empty_streams += 1
        if self._empty_streams >= EMPTY_STREAMS_IN_A_ROW:
            self._stop_streaming(f"{self._empty_streams} streams in a row carried no content")
        else:
            log.warning("a streamed answer carried no content; asking for a whole answer instead")

    def _fall_back(self, refused: ResponseFormat, exc: openai.APIStatusError) -> None:
        """Step down from a refused schema (once, however many calls saw it refused)."""
        step = next((step for step, sent in self._ladder if sent is refused), None)
        if step is None:
            return
        detail = server_detail(exc, self._secret) or "no details"
        left = after_refusal([s for s, _ in self._ladder], step, _error_text(exc))
        self._ladder = [(s, sent) for s, sent in self._ladder if s in left]
        log.warning(
            "the LLM server rejected %s as response_format (HTTP %d: %s); %s",
            step.name,
            exc.status_code,
            detail,
            f"sending {left[0].name} from now on"
            if left
            else "using JSON mode plus validation from now on",
        )


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


def _stale_connection(exc: BaseException) -> bool:
    """Did the call fail on a pooled connection the server had already closed, unanswered?"""
    seen: BaseException | None = exc
    for _ in range(8):  # the SDK's error, the transport's, aiohttp's: a short chain
        if seen is None:
            return False
        if isinstance(seen, aiohttp.ServerDisconnectedError | aiohttp.ClientConnectionResetError):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _rejects_json_schema(exc: openai.APIStatusError) -> bool:
    """Does this 400/422 say the server cannot do a JSON-schema `response_format`?"""
    text = _error_text(exc)
    # llama-server names neither: "Unable to generate parser for this template. Automatic
    # parser generation failed: JSON schema error at #/properties/a: cannot resolve $ref ...".
    return any(word in text for word in ("json_schema", "json schema", "response_format"))


def _rejects_streaming(exc: openai.APIStatusError) -> bool:
    """Does this 400/422 (to a streamed call) say the server cannot stream this answer?"""
    return "stream" in _error_text(exc)


def _error_text(exc: openai.APIStatusError) -> str:
    return f"{exc.message} {json.dumps(exc.body, default=str)}".lower()


def note_answer(completion: Mapping[str, Any], finish_reason: object = None) -> None:
    """Record the model, `usage` and finish reason of a Chat Completions answer (or of a
    stream: its model, its last chunk's usage, and the finish reason it ended with)."""
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
    if finish_reason is None:
        choices = completion.get("choices")
        if isinstance(choices, list) and choices and isinstance(choices[0], Mapping):
            finish_reason = choices[0].get("finish_reason")
    if isinstance(finish_reason, str) and finish_reason:
        cost.finish_reason = finish_reason[:40]  # a label ("stop"), whatever a server sends


def _count(value: object) -> int | None:
    # A hostile server may send anything here; only a plain non-negative integer counts.
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**31:
        return value
    return None
