"""What an LLM provider's failure means for a request: one plain sentence and what to do next.

The SDK's errors are converted here, once: refused credentials and an exhausted quota fail the
request at once; "slow down" (HTTP 429 rate limit, HTTP 503 overloaded, 529 Anthropic-style
overloaded) and a server that cannot be reached (connection refused or reset, name not
resolved) are `Throttled`, flow control rather than failure; timeouts, connections dropped
after the request was sent and other 5xx are worth another attempt. No sentence ever carries
the API key.
"""

from __future__ import annotations

import datetime as dt
import errno
import re
import textwrap
from collections.abc import Mapping
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import openai

from planbus.errors import INVALID_OUTPUT, PermanentError, PlanningError, Throttled, TransientError

DETAIL_WIDTH = 200  # characters of a server's own error message kept in a sentence

QUOTA_EXHAUSTED = (
    "The LLM account's quota is exhausted (insufficient_quota): add credit or raise the limit."
)

# Statuses worth another attempt besides 5xx (the SDK's own retry rule, 429 apart: throttling).
RETRYABLE_STATUSES = frozenset({408, 409})

# Providers name the exhausted quota in `error.code` (OpenAI) or `error.type` (some proxies).
QUOTA_CODES = frozenset({"insufficient_quota"})

# "Overloaded": 503, and 529 as Anthropic and gateways in front of it say it.
OVERLOADED_STATUSES = frozenset({503, 529})

# Where a proxy forwards the provider's own headers: LiteLLM prefixes them with this and may
# send no wait header of its own.
PROXIED_PREFIXES = ("", "llm_provider-")

# A connection that failed before the request reached the server: nobody is listening (refused),
# the peer or a middlebox reset it, or the network has no route. The server never saw the call.
UNREACHABLE_ERRNOS = frozenset(
    {errno.ECONNREFUSED, errno.ECONNRESET, errno.EHOSTUNREACH, errno.ENETUNREACH}
)

# Go-style durations as OpenAI's x-ratelimit-reset-* headers write them: "1s", "6m0s", "120ms".
DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s)")
DURATION_UNITS = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}


@dataclass(frozen=True, slots=True)
class ProviderErrors:
    """Converts the SDK's exceptions for one configured provider (its URL, key and timeout)."""

    url: str
    secret: str
    timeout: float

    def classify(self, exc: BaseException) -> PlanningError:
        """One plain sentence for `result.error`: no traceback, never the API key."""
        if isinstance(exc, openai.APIConnectionError) and unreachable(exc):
            return self._unreachable_error()
        if isinstance(exc, openai.APIConnectionError) and lost_connection(exc):
            return self._connection_error()
        if isinstance(exc, TimeoutError | openai.APITimeoutError):
            return TransientError(
                f"The LLM call timed out after {self.timeout:g} s.", kind="timeout"
            )
        if isinstance(exc, openai.APIConnectionError):
            return self._connection_error()
        if isinstance(exc, openai.APIResponseValidationError):
            return TransientError(
                f"{INVALID_OUTPUT}: the server's answer could not be read.", kind="invalid_output"
            )
        if isinstance(exc, openai.APIStatusError):
            return self._status_error(exc)
        return TransientError(f"The LLM call failed ({type(exc).__name__}).")

    def _unreachable_error(self) -> Throttled:
        # An outage, not a bad request: a restarting Ollama or vLLM must not fail every request
        # that arrives meanwhile. Flow control like a 503 that names no wait.
        return Throttled(
            f"Could not connect to the LLM server at {public_url(self.url)}.", kind="unreachable"
        )

    def _connection_error(self) -> TransientError:
        return TransientError(
            f"Could not connect to the LLM server at {public_url(self.url)}.", kind="connection"
        )

    def _status_error(self, exc: openai.APIStatusError) -> PlanningError:
        status = exc.status_code
        if status in (401, 403):
            return PermanentError(
                f"The LLM credentials were refused (HTTP {status}).", kind="auth_refused"
            )
        if status == 429 and quota_exhausted(exc.body):
            return PermanentError(QUOTA_EXHAUSTED, kind="quota_exhausted")
        headers = exc.response.headers
        if status == 429:
            return Throttled(
                "The LLM provider is rate limiting (HTTP 429).",
                throttle_wait_seconds(headers, dt.datetime.now(dt.UTC)),
                kind="rate_limited",
            )
        if status in OVERLOADED_STATUSES:
            return Throttled(
                f"The LLM server is overloaded (HTTP {status}).",
                throttle_wait_seconds(headers, dt.datetime.now(dt.UTC)),
                kind="overloaded",
            )
        if status >= 500 or status in RETRYABLE_STATUSES:
            return TransientError(
                f"The LLM server answered with an error (HTTP {status}).",
                retry_after_seconds(headers, dt.datetime.now(dt.UTC)),
                kind="server_error",
            )
        detail = server_detail(exc, self.secret)
        return PermanentError(
            f"The LLM server rejected the request (HTTP {status})"
            + (f": {detail}." if detail else "."),
            kind="rejected",
        )


def quota_exhausted(body: object) -> bool:
    """Whether an error body says the account's credit or quota is spent, not just busy."""
    error = body.get("error", body) if isinstance(body, dict) else None
    if not isinstance(error, dict):
        return False
    return any(error.get(key) in QUOTA_CODES for key in ("code", "type"))


def lost_connection(exc: BaseException) -> bool:
    """Whether an aiohttp connection error lies under `exc`, timeouts apart.

    The aiohttp transport reports every connection error (refused, dropped, no such host) as a
    connect *timeout*, so the SDK raises `APITimeoutError` for them; the error it wraps tells.
    """
    cause = exc.__cause__
    while cause is not None:
        if isinstance(cause, TimeoutError):
            return False
        if isinstance(cause, aiohttp.ClientConnectionError):
            return True
        cause = cause.__cause__
    return False


def unreachable(exc: BaseException) -> bool:
    """Whether `exc` failed to reach the server at all: no connection could be made.

    aiohttp reports a connection that could not be opened (refused, no such host, no route) as
    `ClientConnectorError`; one reset while the request was being sent as a `ClientOSError` with
    its errno. A connection dropped after the request went out (`ServerDisconnectedError`) is
    not one of these: the server may have started on the call.
    """
    cause = exc.__cause__
    while cause is not None:
        if isinstance(cause, aiohttp.ClientConnectorError):
            return True
        if isinstance(cause, OSError) and cause.errno in UNREACHABLE_ERRNOS:
            return True
        cause = cause.__cause__
    return False


def public_url(url: str) -> str:
    """`url` without user, password or query, which may carry a key: scheme, host, port, path."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        return "the configured URL"
    if ":" in host:
        host = f"[{host}]"
    return f"{parts.scheme}://{host}{port}{parts.path.rstrip('/')}"


def throttle_wait_seconds(headers: Mapping[str, str], now: dt.datetime) -> float | None:
    """How long a throttling provider asked to wait: `retry-after(-ms)`, else its reset time.

    OpenAI also says when each exhausted bucket refills (`x-ratelimit-reset-requests` and
    `-tokens`); the later of those whose `remaining` is 0 (or not sent) is the honest wait.
    A proxy's own headers come first, then the provider's as LiteLLM forwards them
    (`llm_provider-retry-after`, ...).
    """
    for prefix in PROXIED_PREFIXES:
        wait = retry_after_seconds(headers, now, prefix)
        if wait is None:
            wait = _reset_seconds(headers, prefix)
        if wait is not None:
            return wait
    return None


def _reset_seconds(headers: Mapping[str, str], prefix: str) -> float | None:
    resets = []
    for bucket in ("requests", "tokens"):
        reset = duration_seconds(headers.get(f"{prefix}x-ratelimit-reset-{bucket}"))
        remaining = headers.get(f"{prefix}x-ratelimit-remaining-{bucket}")
        if reset is not None and (remaining is None or _number(remaining) == 0):
            resets.append(reset)
    return max(resets) if resets else None


def retry_after_seconds(
    headers: Mapping[str, str], now: dt.datetime, prefix: str = ""
) -> float | None:
    """The wait a server asked for: `retry-after-ms`, else `Retry-After` (seconds or a date)."""
    milliseconds = _number(headers.get(f"{prefix}retry-after-ms"))
    if milliseconds is not None:
        return milliseconds / 1000
    value = headers.get(f"{prefix}retry-after")
    seconds = _number(value)
    if seconds is not None or not value:
        return seconds
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return max(0.0, (when - now).total_seconds())


def duration_seconds(value: str | None) -> float | None:
    """A duration as OpenAI's reset headers write it ("1s", "6m0s", "120ms") or plain seconds."""
    if not value:
        return None
    text = value.strip()
    plain = _number(text)
    if plain is not None:
        return plain
    parts = DURATION_PART.findall(text)
    if not parts or "".join(number + unit for number, unit in parts) != text:
        return None
    return sum(float(number) * DURATION_UNITS[unit] for number, unit in parts)


def _number(value: str | None) -> float | None:
    try:
        number = float(value) if value else None
    except ValueError:
        return None
    return number if number is not None and 0 <= number < float("inf") else None


def server_detail(exc: openai.APIStatusError, secret: str) -> str:
    """The server's own error message, as one short line without the API key."""
    body: Any = exc.body
    message = body.get("message") if isinstance(body, dict) else None
    if not isinstance(message, str):
        return ""
    if secret:
        message = message.replace(secret, "[redacted]")
    return textwrap.shorten(message, DETAIL_WIDTH, placeholder=" [...cut]").rstrip(".")
