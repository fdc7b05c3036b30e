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
from dataclasses import dataclass, field
from typing import Any

from pydantic_core import from_json

from planbus.plan import InvalidPlan, Step, validate_plan

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
    data_lines: list[str] = field(default_factory=list)  # of the event being read


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
        lines = (pending + chunk).split(b"\n")
        pending = lines.pop()
        for line in lines:
            _read_line(line.rstrip(b"\r"), answer, collector)
    # An event not ended by a blank line when the body ends is dropped, as the SSE spec says.
    answer.content = collector.text
    if answer.finish_reason is None and not answer.done:
        raise StreamBroken("the answer stream ended before the answer did")
    if answer.deltas == 0 and not answer.content:
        raise NoContentDeltas
    return answer


def _read_line(line: bytes, answer: StreamedAnswer, collector: StepCollector) -> None:
    # Server-sent events: `data:` lines accumulate, a blank line ends the event; comments
    # (`: keep-alive`) and other fields (`event:`, `id:`) carry nothing for us.
    if line.startswith(b"data:"):
        answer.data_lines.append(line[5:].removeprefix(b" ").decode("utf-8", "replace"))
    elif not line and answer.data_lines:
        data = "\n".join(answer.data_lines)
        answer.data_lines.clear()
        _read_event(data, answer, collector)


def _read_event(data: str, answer: StreamedAnswer, collector: StepCollector) -> None:
    if data.strip() == "[DONE]":
        answer.done = True
        return
    try:
        event = json.loads(data)
        choices = event.get("choices") or []
    except (ValueError, AttributeError):
        raise StreamBroken("an event of the answer stream could not be read") from None
    if event.get("error"):
        raise StreamBroken("the server reported an error in the middle of the answer")
    if isinstance(event.get("usage"), dict):
        answer.usage = event["usage"]
    if isinstance(event.get("model"), str):
        answer.model = event["model"]
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
