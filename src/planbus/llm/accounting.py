"""What one plan cost: the model that answered, its tokens, the time spent in the model.

The worker opens a `ledger()` around each planning call; whichever planner answers notes what
the provider reported into `current()` (the openai planner: `openai_planner.note_answer`). A
context variable carries the ledger, so the Planner protocol stays `plan(lead)`: each claimed
request is planned in a task of its own, and a ledger is never shared between two requests. A
completed request stores the ledger beside its plan in `result` (see `as_result`); /metrics
counts the tokens by kind and model.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any


@dataclass(slots=True)
class Cost:
    """One request's last planning call, as the provider reported it."""

    model: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    finish_reason: str | None = None  # why the model stopped ("stop", "length"), if it said
    model_seconds: float = 0.0
    # time.monotonic() when the answer's first content arrived (None until it does): a call
    # that streams is being served, however long it takes; one without it may wait in a queue.
    first_token_at: float | None = None

    def as_result(self) -> dict[str, Any]:
        """The keys a completed request's `result` carries beside `plan` and `step_count`."""
        result: dict[str, Any] = {
            "model": self.model,
            "model_seconds": round(self.model_seconds, 3),
        }
        if self.prompt_tokens is not None or self.completion_tokens is not None:
            result["usage"] = {
                "prompt_tokens": self.prompt_tokens or 0,
                "completion_tokens": self.completion_tokens or 0,
            }
        return result


_current: ContextVar[Cost | None] = ContextVar("planbus_cost", default=None)


@contextmanager
def ledger(model: str | None) -> Iterator[Cost]:
    """A fresh ledger for the planning call made inside the block; `model` until one answers."""
    cost = Cost(model=model)
    token = _current.set(cost)
    try:
        yield cost
    finally:
        _current.reset(token)


def current() -> Cost | None:
    """The ledger of the planning call running in this task, if any."""
    return _current.get()


def note_first_token() -> None:
    """The answer's first content arrived now (the first one only counts)."""
    cost = _current.get()
    if cost is not None and cost.first_token_at is None:
        cost.first_token_at = time.monotonic()
