"""What a real provider refuses, for the fake LLM server: an account's rate limit, a box's slots,
an exhausted quota. Each refusal carries the status, body and headers a real provider sends.

The rate limit is OpenAI's: HTTP 429 with `rate_limit_exceeded`, `retry-after-ms`,
`retry-after` and the `x-ratelimit-*-requests` headers. They are honest: a client that waits
`retry-after-ms` (or `retry-after`, rounded up to whole seconds) finds a token in the bucket,
unless another client took it meanwhile. The slot limit is Ollama's (`OLLAMA_NUM_PARALLEL`
with no queue): HTTP 503 and no `retry-after` unless asked for.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

RATE_LIMIT_BODY_MESSAGE = (
    "Rate limit reached for requests on this account: Limit {limit}, Used {limit}, "
    "Requested 1. Please try again in {wait}."
)
QUOTA_BODY: dict[str, Any] = {
    "error": {
        "code": "insufficient_quota",
        "type": "insufficient_quota",
        "param": None,
        "message": "You exceeded your current quota, please check your plan and billing details.",
    }
}
# Ollama's answer when every slot is busy and its queue is full.
BUSY_BODY: dict[str, Any] = {
    "error": "server busy, please try again.  maximum pending requests exceeded"
}


@dataclass
class Limits:
    """A provider's limits, shared by every call to this server. Default: none."""

    requests_per_second: float | None = None  # token bucket refill rate
    burst: int = 1  # token bucket size
    slots: int | None = None  # calls answered at once; 503 beyond
    busy_retry_after: float | None = None  # `retry-after` on the 503, seconds; None: no header
    quota_calls: int | None = None  # accepted calls before the quota is spent; 0: spent already
    stream_json_schema: bool = True  # False: 400 for `stream` with a json_schema format
    # llama-server's `-np N`, Ollama, vLLM: N calls answered at once, the rest wait in a queue
    # (first come, first served) and are answered later; none is refused. A call whose client
    # leaves while it waits is dropped from the queue, as llama-server does.
    serve_at_once: int | None = None


@dataclass
class Refusal:
    """An answer sent instead of the model's: status, JSON body, extra headers."""

    status: int
    body: dict[str, Any]
    headers: dict[str, str]


def duration(seconds: float) -> str:
    """OpenAI's way of writing a wait (Go durations): "120ms", "1s", "1.5s", "6m0s", "1h2m0s"."""
    if seconds < 1:
        return f"{max(0, math.ceil(seconds * 1000))}ms"
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    text = f"{round(secs, 3):g}s"
    if hours:
        return f"{int(hours)}h{int(minutes)}m{text}"
    if minutes:
        return f"{int(minutes)}m{text}"
    return text


class TokenBucket:
    """An account-wide rate limit: `rate` requests a second, at most `burst` at once.

    `now` is an argument (monotonic seconds), so the bucket is a pure object.
    """

    def __init__(self, rate: float, burst: int, now: float | None = None) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError("a rate limit needs rate > 0 and burst >= 1")
        self.rate = rate
        self.burst = burst
        self.tokens = float(burst)
        self.updated = time.monotonic() if now is None else now

    def _refill(self, now: float) -> None:
        self.tokens = min(self.burst, self.tokens + (now - self.updated) * self.rate)
        self.updated = now

    def take(self, now: float) -> Refusal | None:
        """Spend a token, or say how long until there is one."""
        self._refill(now)
        # A client that waited exactly retry-after-ms must pass despite float rounding.
        if self.tokens >= 1 - 1e-9:
            self.tokens = max(0.0, self.tokens - 1)
            return None
        wait = (1 - self.tokens) / self.rate
        wait_ms = math.ceil(wait * 1000)
        message = RATE_LIMIT_BODY_MESSAGE.format(limit=self.burst, wait=duration(wait_ms / 1000))
        headers = {
            "retry-after-ms": str(wait_ms),
            "retry-after": str(math.ceil(wait_ms / 1000)),
            **self.headers(now),
        }
        body = {
            "error": {
                "message": message,
                "type": "requests",
                "param": None,
                "code": "rate_limit_exceeded",
            }
        }
        return Refusal(429, body, headers)

    def headers(self, now: float) -> dict[str, str]:
        """The `x-ratelimit-*-requests` headers OpenAI sends on every answer."""
        self._refill(now)
        return {
            "x-ratelimit-limit-requests": str(self.burst),
            "x-ratelimit-remaining-requests": str(int(self.tokens + 1e-9)),
            # Until the bucket is full again, as OpenAI's "resets to its initial state".
            "x-ratelimit-reset-requests": duration((self.burst - self.tokens) / self.rate),
        }


def busy(retry_after: float | None) -> Refusal:
    """Every slot is taken: Ollama's 503, with `retry-after` only when asked for."""
    headers = {} if retry_after is None else {"retry-after": f"{retry_after:g}"}
    return Refusal(503, dict(BUSY_BODY), headers)


def quota_exhausted() -> Refusal:
    """The account's credit is spent: OpenAI's 429 `insufficient_quota` (no retry-after)."""
    return Refusal(429, dict(QUOTA_BODY), {})
