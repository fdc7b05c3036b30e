"""`Wakeup`: what the claim loop sleeps on: a set, or a moment it must be up by."""

from __future__ import annotations

import math

import anyio


class Wakeup:
    """A resettable event: `set()` from anywhere, `wait()` until set or timed out."""

    def __init__(self) -> None:
        self._event = anyio.Event()
        self._scope: anyio.CancelScope | None = None
        self._until = math.inf

    def set(self) -> None:
        self._event.set()

    def by(self, moment: float) -> None:
        # The current wait ends at `moment` (never past its timeout), the waiter left asleep:
        # a fallback claim planned or dropped costs no task switch.
        if self._scope is not None:
            self._scope.deadline = min(self._until, moment)

    async def wait(self, seconds: float, moment: float = math.inf) -> None:
        with anyio.move_on_after(seconds) as self._scope:
            self._until = self._scope.deadline
            self.by(moment)
            await self._event.wait()
        self._scope = None
        # Reset before the caller claims: a wake-up arriving after this is not lost, because
        # the claim that follows sees every row committed before that notification.
        self._event = anyio.Event()
