"""A streamed Chat Completions answer, for the fake LLM server: the SSE events, their pieces and
where each plan step ends.

The assistant's content is cut into pieces of `chunk_chars` characters (about one token each);
each piece is one `chat.completion.chunk` event. The events are framed as HTTP/1.1 chunked
transfer encoding, so the connection can be kept alive, or dropped mid-body (a cut stream),
which the client sees as an incomplete read.
"""

from __future__ import annotations

import json
import time
from typing import Any

SSE_HEAD = (
    "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\n"
    "transfer-encoding: chunked\r\n"
)


def pieces(content: str, chunk_chars: int) -> list[str]:
    """The content in pieces of `chunk_chars` characters (the last may be shorter)."""
    size = max(1, chunk_chars)
    return [content[i : i + size] for i in range(0, len(content), size)]


def step_ends(content: str) -> list[int]:
    """Offsets just after each `}` that closes an element of the top-level `steps` array.

    A small bracket counter that skips strings: enough for the JSON this server sends, and
    an empty list for content that is not a plan.
    """
    ends: list[int] = []
    depth = 0
    in_string = escaped = False
    for index, char in enumerate(content):
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "{[":
            depth += 1
        elif char in "}]":
            depth -= 1
            # {"steps": [ {step} ... : the object, the array, then each step at depth 3.
            if char == "}" and depth == 2:
                ends.append(index + 1)
    return ends


def event(payload: dict[str, Any] | str) -> bytes:
    """One SSE event as one HTTP chunk."""
    data = payload if isinstance(payload, str) else json.dumps(payload)
    frame = f"data: {data}\n\n".encode()
    return f"{len(frame):x}\r\n".encode() + frame + b"\r\n"


END = b"0\r\n\r\n"


class ChunkMaker:
    """The `chat.completion.chunk` events of one answer."""

    def __init__(self, model: str, include_usage: bool) -> None:
        self.model = model
        self.include_usage = include_usage
        self.created = int(time.time())

    def chunk(self, delta: dict[str, Any], finish_reason: str | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {
            "id": "chatcmpl-fake",
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}],
        }
        if self.include_usage:
            body["usage"] = None  # as OpenAI: null on every chunk but the last
        return body

    def usage_chunk(self, usage: dict[str, int]) -> dict[str, Any]:
        return {
            "id": "chatcmpl-fake",
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": [],
            "usage": usage,
        }
