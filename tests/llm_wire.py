"""The fake LLM server's wire format: HTTP/1.1 requests in, JSON answers out, token counts."""

from __future__ import annotations

import asyncio
import json
import math
import time
from typing import Any


async def read_request(
    reader: asyncio.StreamReader,
) -> tuple[str, str, dict[str, str], dict[str, Any]] | None:
    head = await reader.readuntil(b"\r\n\r\n") if not reader.at_eof() else b""
    if not head:
        return None
    lines = head.decode("latin-1").split("\r\n")
    method, path, _version = lines[0].split(" ", 2)
    headers = {}
    for line in lines[1:]:
        if ":" in line:
            name, value = line.split(":", 1)
            headers[name.strip().lower()] = value.strip()
    raw = await reader.readexactly(int(headers.get("content-length", "0")))
    return method, path, headers, json.loads(raw) if raw else {}


def usage(request: dict[str, Any], content: str) -> dict[str, int]:
    """Token counts as a tokenizer would roughly give them: four characters a token."""
    messages = request.get("messages", [])
    prompt = sum(len(str(m.get("content", ""))) for m in messages)
    prompt_tokens, completion_tokens = math.ceil(prompt / 4), math.ceil(len(content) / 4)
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def http(status: int, body: dict[str, Any], extra: dict[str, str]) -> bytes:
    payload = json.dumps(body).encode()
    headers = {"content-type": "application/json", "content-length": str(len(payload)), **extra}
    head = f"HTTP/1.1 {status} {REASONS.get(status, 'Status')}\r\n"
    head += "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    return head.encode() + b"\r\n" + payload


REASONS = {
    200: "OK",
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    429: "Too Many Requests",
    500: "Internal Server Error",
    503: "Service Unavailable",
}


def completion(request: dict[str, Any], content: str) -> dict[str, Any]:
    """A whole `chat.completion` answer with this content, echoing the requested model."""
    return {
        "id": "chatcmpl-fake",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": request.get("model", "fake"),
        "choices": [
            {
                "index": 0,
                "finish_reason": "stop",
                "message": {"role": "assistant", "content": content},
            }
        ],
        "usage": usage(request, content),
    }
