"""planbus's own small set of exceptions; driver and SDK errors are converted once, at the edge."""

from __future__ import annotations


class ConfigurationError(Exception):
    """The worker cannot start: the message says what the operator must do."""


class PlanningError(Exception):
    """Planning a request failed; `message` is one plain sentence safe to store in `result`."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class TransientError(PlanningError):
    """Worth another attempt later (timeouts, 429, 5xx, an invalid model answer)."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class PermanentError(PlanningError):
    """Retrying cannot help (refused credentials, a missing lead): fail the request now."""
