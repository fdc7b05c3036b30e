"""Traces, when asked for: one per attempt at a request, from its claim to its stored effects.

Off unless `OTEL_EXPORTER_OTLP_ENDPOINT` (or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) is set. Off,
the worker holds `NO_TRACING`, whose attempts are `NO_ATTEMPT`: their methods do nothing, and
OpenTelemetry is never imported. On, and with the optional `otel` extra installed, `otel`
(the module beside this one) records a span for the claim, one for the model call (GenAI
semantic conventions) and one for the write that ended the attempt, and exports them over
OTLP/HTTP; a W3C `traceparent` the client inserted with the request is their parent.

The worker's call sites are one line each: `attempt()` at the claim, then `asking()`,
`answered()` and `finished()` on the attempt it returned, all cheap enough to run whether
tracing is on or not.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from planbus.errors import PlanningError
    from planbus.llm.accounting import Cost
    from planbus.llm.planner import Planner

log = logging.getLogger(__name__)

# The variables that turn tracing on; the OpenTelemetry SDK reads them (and every other
# OTEL_* variable it knows) itself.
ENDPOINT_VARIABLES = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")
EXTRA_MISSING = (
    "%s is set, but OpenTelemetry is not installed, so no traces are exported; install the "
    "extra with: pip install 'planbus[otel]'"
)


class Attempt(Protocol):
    """One attempt's spans."""

    def asking(self) -> None:
        """The planner is called now."""

    def answered(self, cost: Cost | None, error: PlanningError | None) -> None:
        """The planner answered (what it cost, how it failed); the attempt's write starts."""

    def finished(self, outcome: str, error: PlanningError | None) -> None:
        """The attempt's write is done: `outcome` as the worker names it."""


class Tracing(Protocol):
    """Gives each claimed request its `Attempt`."""

    def clock(self) -> int:
        """Now, as a span's time (nanoseconds since the epoch)."""

    def attempt(
        self,
        request_id: int,
        lead_id: int,
        attempt: int,
        traceparent: str | None,
        claimed_from: int,
    ) -> Attempt:
        """A request was claimed by the statement that started at `claimed_from` (`clock()`)."""

    async def aclose(self) -> None:
        """Export what is left; called once, when the worker has stopped."""


class NoAttempt:
    """Tracing is off: records nothing."""

    __slots__ = ()

    def asking(self) -> None:
        return None

    def answered(self, cost: Cost | None, error: PlanningError | None) -> None:
        return None

    def finished(self, outcome: str, error: PlanningError | None) -> None:
        return None


class NoTracing:
    """Tracing is off: every attempt is `NO_ATTEMPT`, and the clock is never read."""

    def clock(self) -> int:
        return 0

    def attempt(
        self,
        request_id: int,
        lead_id: int,
        attempt: int,
        traceparent: str | None,
        claimed_from: int,
    ) -> Attempt:
        return NO_ATTEMPT

    async def aclose(self) -> None:
        return None


NO_ATTEMPT: Attempt = NoAttempt()
NO_TRACING: Tracing = NoTracing()


def open_tracing(environ: Mapping[str, str], planner: Planner, worker_id: str) -> Tracing:
    """`NO_TRACING`, unless the environment asks for traces and OpenTelemetry is installed."""
    variable = next((name for name in ENDPOINT_VARIABLES if environ.get(name, "").strip()), None)
    if variable is None or environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return NO_TRACING
    if environ.get("OTEL_TRACES_EXPORTER", "").strip().lower() == "none":
        return NO_TRACING
    try:
        from planbus.bus import otel
    except ImportError as exc:
        if not (exc.name or "").startswith("opentelemetry"):
            raise
        log.warning(EXTRA_MISSING, variable)
        return NO_TRACING
    protocol = environ.get("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf").strip()
    if protocol != "http/protobuf":
        log.warning(
            "OTEL_EXPORTER_OTLP_PROTOCOL=%s is ignored: planbus exports traces over OTLP/HTTP "
            "(http/protobuf) only; point %s at the collector's HTTP port (4318)",
            protocol,
            variable,
        )
    tracing = otel.OtelTracing(planner, worker_id)
    log.info("exporting traces over OTLP/HTTP to %s", traces_endpoint(environ, variable))
    return tracing


def traces_endpoint(environ: Mapping[str, str], variable: str) -> str:
    """Where the SDK sends spans: the traces URL as given, or `/v1/traces` on the base URL."""
    url = environ[variable].strip()
    return (
        url if variable == "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT" else f"{url.rstrip('/')}/v1/traces"
    )
