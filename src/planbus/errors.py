"""planbus's own small set of exceptions; driver and SDK errors are converted once, at the edge."""

from __future__ import annotations

# How every failure of the model's answer begins, however it was found (decoding, the step
# rules, or the write that could not store it).
INVALID_OUTPUT = "The model's output was invalid"

# The longest error stored in `result.error` / `last_error`: a sentence, with room for a field
# name, an SQLSTATE message or a URL; a message built from the model's own text must not store
# megabytes.
MAX_ERROR_CHARS = 300


class ConfigurationError(Exception):
    """The worker cannot start: the message says what the operator must do."""


class PlanningError(Exception):
    """Planning a request failed; `message` is one plain sentence safe to store in `result`."""

    def __init__(self, message: str, *, kind: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.kind = kind  # a short metric label: timeout, rate_limited, invalid_output, ...


class TransientError(PlanningError):
    """Worth another attempt later (timeouts, 429, 5xx, an invalid model answer)."""

    def __init__(
        self, message: str, retry_after: float | None = None, *, kind: str = "transient"
    ) -> None:
        super().__init__(message, kind=kind)
        self.retry_after = retry_after


class Throttled(TransientError):
    """The provider said "slow down" (HTTP 429 rate limit, 503 overloaded): flow control.

    The request goes back without spending an attempt; `retry_after` is the provider's own
    wait, when it gave one, and pauses every new call of the worker, not only this one.
    """


class PermanentError(PlanningError):
    """Retrying cannot help (refused credentials, a missing lead): fail the request now."""

    def __init__(self, message: str, *, kind: str = "permanent") -> None:
        super().__init__(message, kind=kind)


def one_line(exc: BaseException) -> str:
    """The exception's message on one line (driver messages span several), or its class name."""
    return " ".join(str(exc).split()) or type(exc).__name__


def bounded(text: str, limit: int = MAX_ERROR_CHARS) -> str:
    """`text` on one line (whitespace collapsed), cut to `limit` characters with "…"."""
    line = " ".join(text.split())
    return line if len(line) <= limit else line[: limit - 1] + "…"
