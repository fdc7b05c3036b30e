"""The spans of an attempt, exported over OTLP/HTTP: imported only when tracing is on.

`tracing.open_tracing` imports this module when `OTEL_EXPORTER_OTLP_ENDPOINT` is set; it needs
the optional `otel` extra. The OpenTelemetry SDK configures itself from its own variables
(endpoint, headers, timeout, `OTEL_SERVICE_NAME`, `OTEL_RESOURCE_ATTRIBUTES`, the batch
processor's `OTEL_BSP_*`, the sampler): see docs/configuration.md.

Each attempt exports three spans, made once its last write is done from the times the worker
noted on the way, so nothing is held open across the event loop and nothing is built before
the model call is sent:

- `claim plan_request`: the claim statement that took the request (a batch shares its times);
- `chat {model}`: the model call, with the GenAI semantic conventions' attributes (or
  `plan template` for the offline planner);
- `store plan_request`: the write that ended the attempt (the completed plan's effects, or
  the request given back, failed, or handed back on a graceful stop), with the outcome.

Their parent is the request's `traceparent` when the client sent one (W3C Trace Context); a
request without one gets a `process plan_request` span of its own as the root of its trace.
The tracer provider is this worker's own, not OpenTelemetry's global one.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import anyio
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.trace import Span, SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from planbus import __version__

if TYPE_CHECKING:
    from opentelemetry.util.types import AttributeValue

    from planbus.errors import PlanningError
    from planbus.llm.accounting import Cost
    from planbus.llm.planner import Planner

# How long the exit may wait for the last spans to reach the collector.
FLUSH_SECONDS = 5.0
# The GenAI conventions name the provider twice: `gen_ai.provider.name` now, `gen_ai.system`
# before it (still what many back-ends group by). An OpenAI-compatible server speaks openai.
PROVIDER = "openai"


class OtelTracing:
    """Spans for every attempt, batched and exported by the SDK's own thread."""

    def __init__(self, planner: Planner, worker_id: str) -> None:
        self.provider = TracerProvider(resource=_resource())
        self.provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
        self.tracer = self.provider.get_tracer("planbus", __version__)
        self.propagator = TraceContextTextMapPropagator()
        self.worker_id = worker_id
        self.planner = planner.name
        self.model: str | None = getattr(planner, "model", None)
        self.server: dict[str, AttributeValue] = _server(getattr(planner, "base_url", None))

    def clock(self) -> int:
        return time.time_ns()

    def attempt(
        self,
        request_id: int,
        lead_id: int,
        attempt: int,
        traceparent: str | None,
        claimed_from: int,
    ) -> OtelAttempt:
        return OtelAttempt(self, request_id, lead_id, attempt, traceparent, claimed_from)

    def parent(self, traceparent: str | None) -> Context | None:
        """The client's span as a parent, when `traceparent` is a valid one."""
        if not traceparent:
            return None
        context = self.propagator.extract({"traceparent": traceparent})
        valid = trace.get_current_span(context).get_span_context().is_valid
        return context if valid else None

    async def aclose(self) -> None:
        # The batch processor's thread sends what is left; a collector that does not answer
        # must not hold the exit for the exporter's whole retry budget.
        with anyio.move_on_after(FLUSH_SECONDS):
            await anyio.to_thread.run_sync(self.provider.shutdown, abandon_on_cancel=True)


class OtelAttempt:
    """One attempt's times, noted as they pass; its spans are made once its write is done.

    Noting a time is all the claim and the model call pay: the spans (about 25 us of CPU each)
    are built after the attempt's last write, off the path from the insert to the model call.
    """

    __slots__ = (
        "_answered",
        "_asked",
        "_claimed_from",
        "_claimed_to",
        "_cost",
        "_error",
        "_ids",
        "_traceparent",
        "tracing",
    )

    def __init__(
        self,
        tracing: OtelTracing,
        request_id: int,
        lead_id: int,
        attempt: int,
        traceparent: str | None,
        claimed_from: int,
    ) -> None:
        self._claimed_to = time.time_ns()
        self.tracing = tracing
        self._ids = (request_id, lead_id, attempt)
        self._traceparent = traceparent
        self._claimed_from = claimed_from
        self._asked = 0
        self._answered = 0
        self._cost: Cost | None = None
        self._error: PlanningError | None = None

    def asking(self) -> None:
        self._asked = time.time_ns()

    def answered(self, cost: Cost | None, error: PlanningError | None) -> None:
        self._answered = time.time_ns()
        self._cost = cost
        self._error = error

    def finished(self, outcome: str, error: PlanningError | None) -> None:
        now = time.time_ns()
        if not self._answered:  # handed back on stop: the call was cancelled now
            self._answered = now
        request_id, lead_id, attempt = self._ids
        attributes: dict[str, AttributeValue] = {
            "planbus.request.id": request_id,
            "planbus.request.attempt": attempt,
            "planbus.lead.id": lead_id,
        }
        tracer = self.tracing.tracer
        root = None
        parent = self.tracing.parent(self._traceparent)
        if parent is None:  # no client span to hang under: the attempt is a trace of its own
            root = tracer.start_span(
                "process plan_request",
                kind=SpanKind.CONSUMER,
                start_time=self._claimed_from,
                attributes={
                    **attributes,
                    "planbus.worker.id": self.tracing.worker_id,
                    "planbus.outcome": outcome,
                },
            )
            parent = trace.set_span_in_context(root)
        claim = tracer.start_span(
            "claim plan_request",
            context=parent,
            kind=SpanKind.CLIENT,
            start_time=self._claimed_from,
            attributes={
                **attributes,
                "db.system.name": "postgresql",
                "planbus.worker.id": self.tracing.worker_id,
            },
        )
        claim.end(end_time=self._claimed_to)
        if self._asked:  # the planner was called (not when the lead was gone)
            self._planner_span(parent, attributes)
        store = tracer.start_span(
            "store plan_request",
            context=parent,
            kind=SpanKind.CLIENT,
            start_time=self._answered,
            attributes={**attributes, "db.system.name": "postgresql", "planbus.outcome": outcome},
        )
        if error is not None and error is not self._error:  # the write itself failed
            _failed(store, error)
        store.end(end_time=now)
        if root is not None:
            root.end(end_time=now)

    def _planner_span(self, parent: Context, attributes: dict[str, AttributeValue]) -> None:
        """The model call as OpenTelemetry's GenAI semantic conventions describe it."""
        tracing = self.tracing
        if tracing.planner != PROVIDER:  # the offline planner: no model, no gen_ai.*
            name, kind = f"plan {tracing.planner}", SpanKind.INTERNAL
            attributes = {**attributes, "planbus.planner": tracing.planner}
        else:
            model = tracing.model or "unknown"
            name, kind = f"chat {model}", SpanKind.CLIENT
            attributes = {
                **attributes,
                "gen_ai.operation.name": "chat",
                "gen_ai.provider.name": PROVIDER,
                "gen_ai.system": PROVIDER,
                "gen_ai.request.model": model,
                **tracing.server,
                **_usage(self._cost),
            }
        span = tracing.tracer.start_span(
            name, context=parent, kind=kind, start_time=self._asked, attributes=attributes
        )
        if self._error is not None:
            _failed(span, self._error)
        span.end(end_time=self._answered)


def _usage(cost: Cost | None) -> dict[str, AttributeValue]:
    """What the provider said about its answer: model, tokens, why it stopped."""
    if cost is None:
        return {}
    found: dict[str, AttributeValue] = {}
    if cost.model:
        found["gen_ai.response.model"] = cost.model
    if cost.prompt_tokens is not None:
        found["gen_ai.usage.input_tokens"] = cost.prompt_tokens
    if cost.completion_tokens is not None:
        found["gen_ai.usage.output_tokens"] = cost.completion_tokens
    if cost.finish_reason is not None:
        found["gen_ai.response.finish_reasons"] = [cost.finish_reason]
    return found


def _failed(span: Span, error: PlanningError) -> None:
    span.set_attribute("error.type", error.kind or type(error).__name__)
    span.set_status(Status(StatusCode.ERROR, error.message))


def _resource() -> Resource:
    """The SDK's resource (OTEL_SERVICE_NAME, OTEL_RESOURCE_ATTRIBUTES), named planbus unless
    the operator named it."""
    resource = Resource.create({"service.version": __version__})
    if str(resource.attributes.get("service.name", "")).startswith("unknown_service"):
        resource = resource.merge(Resource({"service.name": "planbus"}))
    return resource


def _server(base_url: str | None) -> dict[str, AttributeValue]:
    """`server.address` and `server.port` of the LLM server, as the conventions recommend."""
    if not base_url:
        return {}
    parts = urlsplit(base_url)
    if not parts.hostname:
        return {}
    port = parts.port or (443 if parts.scheme == "https" else 80)
    return {"server.address": parts.hostname, "server.port": port}
