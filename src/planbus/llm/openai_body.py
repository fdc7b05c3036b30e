"""The Chat Completions request body as bytes, all but the user message encoded once.

The system prompt and the JSON schema are most of a body (about 24 KB with the positional
schema, 5 KB with the item schema); encoding them on every call cost about 0.1 ms between a
claim and its request leaving at 4 KB.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from openai.types.chat import ChatCompletionMessageParam
    from openai.types.chat.completion_create_params import ResponseFormat

# The answer's size is bounded twice. The model may write at most MAX_TOKENS tokens (a ten-step
# plan is about 1,500), and planbus reads at most MAX_ANSWER_BYTES of the HTTP body (see
# openai_planner): a streamed answer spends ~200 bytes of event framing per token.
MAX_TOKENS = 4_000
# Ask for the answer as server-sent events, usage in the last one; a server that answers with
# plain JSON instead (as the tests' and benchmarks' instant servers do) is read as before.
STREAM: dict[str, Any] = {"stream": True, "stream_options": {"include_usage": True}}
# No spaces after separators: the positional schema is most of a body (see llm/schema.py).
COMPACT = (",", ":")
# Stands for the user message in a body encoded in advance.
USER_SLOT = "\x00planbus user message\x00"


class BodyTemplates:
    """Request bodies as bytes, all but the user message encoded once per kind of call."""

    def __init__(self, model: str) -> None:
        self.model = model
        self._parts: dict[tuple[str, int, bool], tuple[bytes, bytes, ResponseFormat]] = {}

    def encode(
        self, system: str, user: str, response_format: ResponseFormat, *, stream: bool
    ) -> bytes:
        # By identity: the planner keeps each response_format it sends for as long as it may
        # send it, and the entry holds it, so an id is never reused for another format.
        key = (system, id(response_format), stream)
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
            whole = json.dumps(body | STREAM if stream else body, separators=COMPACT).encode()
            head, tail = whole.split(json.dumps(USER_SLOT).encode())
            parts = self._parts[key] = (head, tail, response_format)
        return parts[0] + json.dumps(user).encode() + parts[1]
