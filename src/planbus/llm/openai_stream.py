"""A streamed answer: server-sent events in, the plan's finished steps out as the model writes.

The model writes `{"steps": [{...}, {...}, ...]}` a few characters at a time. pydantic's
partial-JSON parser reads the text so far; every element of `steps` that is followed by another
element is finished, and it is published once the steps so far pass the plan's rules as a
prefix (each step's own rules, ids 1..k, delays never decreasing). The whole answer is still
validated exactly as a non-streamed one at the end: a published step is a preview, not the plan.
"""

from __future__ import annotations

import datetime as dt
import json
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from pydantic_core import from_json

from planbus.llm import accounting
from planbus.llm.plan import InvalidPlan, Step, validate_plan

# Past this much answer text the steps are no longer followed (the answer is still read and
# validated at the end): a plan is a few kilobytes, and each look re-reads the whole text.
FOLLOW_LIMIT_CHARACTERS = 64_000
# At most this many looks at the partial answer: one per `{` seen, a few per step.
MAX_LOOKS = 100


@dataclass(frozen=True, slots=True)
class Progress:
    """The steps finished so far and when the model started answering."""

    started_at: dt.datetime
    steps: tuple[Step, ...]
    started: float  # time.monotonic() of started_at, for intervals

    def as_json(self) -> dict[str, Any]:
        """The `progress` column's value, steps in the shape `result.plan` will have."""
        return {
            "started_at": self.started_at.isoformat(),
            "steps": [step.model_dump(mode="json") for step in self.steps],
        }


ProgressCallback = Callable[[Progress], None]


class AnswerTooLarge(Exception):
    """The server sent more than the byte limit."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"the answer exceeded {limit} bytes")
        self.limit = limit


class StreamBroken(Exception):
    """The stream could not be read to its end: cut, malformed, or an error event."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class NoContentDeltas(Exception):
    """The stream ended normally without a single content delta: no streaming for this server."""


class StepCollector:
    """Follows the growing answer text and reports each newly finished, valid step."""

    def __init__(self, on_progress: ProgressCallback | None = None) -> None:
        self._on_progress = on_progress
        self._parts: list[str] = []
        self._length = 0
        self._looks = 0
        self._following = on_progress is not None
        self.started_at: dt.datetime | None = None
        self._started = 0.0
        self.steps: tuple[Step, ...] = ()

    @property
    def text(self) -> str:
        return "".join(self._parts)

    def feed(self, text: str) -> None:
        """Add a content delta; publish the steps it finished, if any."""
        if not text:
            return
        if self.started_at is None:
            self.started_at = dt.datetime.now(dt.UTC)
            self._started = time.monotonic()
            accounting.note_first_token()
        self._parts.append(text)
        self._length += len(text)
        # A new element of `steps` starts with `{`: only then can the one before it be finished.
        if self._following and "{" in text:
            self._look()

    def _look(self) -> None:
        self._looks += 1
        if self._looks > MAX_LOOKS or self._length > FOLLOW_LIMIT_CHARACTERS:
            self._following = False
            return
        finished = _finished_elements(self.text)
        if len(finished) <= len(self.steps):
            return
        found = self.steps
        for count in range(len(self.steps) + 1, len(finished) + 1):
            try:
                found = tuple(validate_plan({"steps": finished[:count]}).steps)
            except InvalidPlan:
                # The plan will be rejected at the end; show nothing past the broken step.
                self._following = False
                break
        if len(found) > len(self.steps):
            self.steps = found
            assert self._on_progress is not None and self.started_at is not None
            self._on_progress(Progress(self.started_at, found, self._started))


def _finished_elements(text: str) -> list[Any]:
    """The elements of `steps` in the partial answer that another element already follows.

    Nothing once the text is a whole JSON value: the answer is complete, and the plan itself
    follows at once, so there is nothing to preview (an answer in one piece shows no steps).
    """
    try:
        from_json(text)
        return []
    except ValueError:
        pass
    try:
        data = from_json(text, allow_partial=True)
    except ValueError:
        return []  # not JSON at all: the final validation will say so
    steps = data.get("steps") if isinstance(data, dict) else None
    return steps[:-1] if isinstance(steps, list) else []


@dataclass(slots=True)
class StreamedAnswer:
    """What a stream of chat-completion chunks said, once read to its end."""

    content: str = ""
    finish_reason: str | None = None
    usage: dict[str, Any] | None = None  # from the last chunk, where the server sends it
    model: str | None = None
    done: bool = False  # `data: [DONE]` seen
    deltas: int = 0  # content deltas seen


async def read_body(chunks: AsyncIterator[bytes], limit: int) -> bytes:
    """The whole body of a non-streamed answer, refused past `limit` bytes."""
    parts = []
    received = 0
    async for chunk in chunks:
        received += len(chunk)
        if received > limit:
            raise AnswerTooLarge(limit)
        parts.append(chunk)
    return b"".join(parts)


async def read_stream(
    chunks: AsyncIterator[bytes], limit: int, collector: StepCollector
) -> StreamedAnswer:
    """Read server-sent events to the end, feeding each content delta to `collector`."""
    answer = StreamedAnswer()
    pending = b""
    received = 0
    async for chunk in chunks:
        received += len(chunk)
        if received > limit:
            raise AnswerTooLarge(limit)
        text = pending + chunk
        if b"\r" in text:
            text = text.replace(b"\r\n", b"\n")
        # A blank line ends an event; whatever follows the last one waits for more bytes.
        *events, pending = text.split(b"\n\n")
        if events:
            _read_events(events, answer, collector)
    # An event not ended by a blank line when the body ends is dropped, as the SSE spec says.
    answer.content = collector.text
    if answer.finish_reason is None and not answer.done:
        raise StreamBroken("the answer stream ended before the answer did")
    if answer.deltas == 0 and not answer.content:
        raise NoContentDeltas
    return answer


def _read_events(blocks: list[bytes], answer: StreamedAnswer, collector: StepCollector) -> None:
    payloads = []
    for block in blocks:
        data = _event_data(block)
        if data is None:
            continue
        if data.strip() == b"[DONE]":
            answer.done = True
        else:
            payloads.append(data)
    if not payloads:
        return
    # One decode for every event that arrived together: a model's stream is hundreds of small
    # events, and one C call for all of them costs a fraction of one call each.
    try:
        events = json.loads(b"[" + b",".join(payloads) + b"]")
    except ValueError:
        raise StreamBroken("an event of the answer stream could not be read") from None
    for event in events:
        _read_event(event, answer, collector)


def _event_data(block: bytes) -> bytes | None:
    """An event's data: its `data:` lines, joined; comments and other fields carry nothing."""
    if block.startswith(b"data: ") and b"\n" not in block:
        return block[6:]  # the usual event: one line
    lines = block.split(b"\n")
    data = [line[5:].removeprefix(b" ") for line in lines if line.startswith(b"data:")]
    return b"\n".join(data) if data else None


def _read_event(event: Any, answer: StreamedAnswer, collector: StepCollector) -> None:
    try:  # the usual chunk, read as cheaply as it can be: a model streams hundreds of them
        choice = event["choices"][0]
        content = choice["delta"]["content"]
        finish_reason = choice.get("finish_reason")
    except (KeyError, IndexError, TypeError, AttributeError):
        _read_other_event(event, answer, collector)
        return
    if finish_reason:
        _read_other_event(event, answer, collector)
    elif isinstance(content, str) and content:
        answer.deltas += 1
        collector.feed(content)


def _read_other_event(event: Any, answer: StreamedAnswer, collector: StepCollector) -> None:
    """An event that is not a plain content delta: the first, the last, usage, an error."""
    if not isinstance(event, dict):
        raise StreamBroken("an event of the answer stream could not be read")
    if event.get("error"):
        raise StreamBroken("the server reported an error in the middle of the answer")
    if isinstance(event.get("usage"), dict):
        answer.usage = event["usage"]
    if isinstance(event.get("model"), str):
        answer.model = event["model"]
    choices = event.get("choices")
    choice = choices[0] if isinstance(choices, list) and choices else None
    if not isinstance(choice, dict):
        return
    delta = choice.get("delta")
    content = delta.get("content") if isinstance(delta, dict) else None
    if isinstance(content, str) and content:
        answer.deltas += 1
        collector.feed(content)
    if choice.get("finish_reason"):
        answer.finish_reason = str(choice["finish_reason"])
