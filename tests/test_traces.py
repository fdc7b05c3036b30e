"""Traces: a worker process exports each attempt's spans to a real OTLP/HTTP receiver."""

from __future__ import annotations

import logging
import secrets
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest

from planbus.bus.tracing import EXTRA_MISSING, NO_TRACING, open_tracing
from planbus.llm.accounting import ledger
from planbus.llm.openai_planner import note_answer
from planbus.llm.planner import TemplatePlanner
from tests.helpers import Database, eventually
from tests.llm_server import FakeLLM, Reply
from tests.otlp_receiver import OtlpReceiver, ReceivedSpan
from tests.processes import WorkerProcess
from tests.test_security import tma_insert

pytestmark = pytest.mark.anyio

ALICE = 1001
MODEL = "gpt-4o-mini"  # the worker's default PLANBUS_MODEL, echoed by the fake LLM
SPAN_KIND_CLIENT, SPAN_KIND_CONSUMER = 3, 5  # opentelemetry.proto.trace.v1.Span.SpanKind
STATUS_ERROR = 2
PROBE = "tests.otel_probe"


def traced(receiver: OtlpReceiver) -> dict[str, str]:
    """The environment that turns tracing on, spans sent within 50 ms of their end."""
    return {"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.url, "OTEL_BSP_SCHEDULE_DELAY": "50"}


def by_attempt(spans: list[ReceivedSpan]) -> dict[int, dict[str, ReceivedSpan]]:
    attempts: dict[int, dict[str, ReceivedSpan]] = defaultdict(dict)
    for span in spans:
        attempts[span.attributes["planbus.request.attempt"]][span.name] = span
    return dict(attempts)


async def run_one_request(
    database: Database, worker: WorkerProcess, **columns: Any
) -> dict[str, Any]:
    """Start the worker, let the Mini App insert one request, wait for it, stop gracefully."""
    lead = await database.insert_lead(telegram_id=ALICE)
    try:
        await worker.start()
        row = await database.wait_for(await tma_insert(database.url, ALICE, lead, **columns))
        code, _ = await worker.terminate()
        assert code == 0, worker.log()
    finally:
        await worker.aclose()
    return row


async def test_each_attempt_exports_its_claim_model_call_and_effects_under_the_mini_apps_span(
    database: Database, tmp_path: Path
) -> None:
    trace_id, parent_id = secrets.token_hex(16), secrets.token_hex(8)
    with FakeLLM() as llm, OtlpReceiver() as receiver:
        llm.script(Reply(status=500))  # the first attempt fails, the second completes
        worker = WorkerProcess(
            database.url, tmp_path / "worker.log", llm_base_url=llm.base_url, env=traced(receiver)
        )
        row = await run_one_request(database, worker, traceparent=f"00-{trace_id}-{parent_id}-01")
        await eventually(lambda: len(receiver.trace(trace_id)) >= 6, 10, "two attempts' spans")
    assert (row["status"], row["attempts"]) == ("completed", 2)

    spans = receiver.trace(trace_id)
    assert len(spans) == 6
    assert {span.parent_span_id for span in spans} == {parent_id}  # the Mini App's span
    assert {span.attributes["planbus.request.id"] for span in spans} == {row["id"]}
    attempts = by_attempt(spans)
    names = {"claim plan_request", f"chat {MODEL}", "store plan_request"}
    assert {n: set(a) for n, a in attempts.items()} == {1: names, 2: names}

    first, second = attempts[1], attempts[2]
    assert first[f"chat {MODEL}"].status_code == STATUS_ERROR
    assert first[f"chat {MODEL}"].attributes["error.type"]
    assert first["store plan_request"].attributes["planbus.outcome"] == "pending"
    assert second["store plan_request"].attributes["planbus.outcome"] == "completed"

    chat = second[f"chat {MODEL}"]
    usage = row["result"]["usage"]
    assert chat.kind == SPAN_KIND_CLIENT
    assert chat.attributes == {
        "gen_ai.operation.name": "chat",
        "gen_ai.provider.name": "openai",
        "gen_ai.system": "openai",
        "gen_ai.request.model": MODEL,
        "gen_ai.response.model": MODEL,
        "gen_ai.usage.input_tokens": usage["prompt_tokens"],
        "gen_ai.usage.output_tokens": usage["completion_tokens"],
        "gen_ai.response.finish_reasons": ["stop"],
        "server.address": "127.0.0.1",
        "server.port": llm.port,
        "planbus.request.id": row["id"],
        "planbus.request.attempt": 2,
        "planbus.lead.id": row["lead_id"],
    }
    assert usage["prompt_tokens"] > 0 and usage["completion_tokens"] > 0
    claim, store = second["claim plan_request"], second["store plan_request"]
    assert claim.start_ns <= claim.end_ns <= chat.start_ns < chat.end_ns <= store.start_ns
    assert store.start_ns <= store.end_ns
    assert claim.resource["service.name"] == "planbus"


async def test_a_request_without_a_traceparent_gets_a_trace_of_its_own(
    database: Database, tmp_path: Path
) -> None:
    with OtlpReceiver() as receiver:
        worker = WorkerProcess(database.url, tmp_path / "worker.log", env=traced(receiver))
        row = await run_one_request(database, worker)
        await eventually(lambda: len(receiver.spans) >= 4, 10, "one attempt's spans")
    [root] = [span for span in receiver.spans if not span.parent_span_id]
    assert (root.name, root.kind) == ("process plan_request", SPAN_KIND_CONSUMER)
    assert root.attributes["planbus.request.id"] == row["id"]
    children = receiver.trace(root.trace_id)
    assert {span.name for span in children} == {
        "process plan_request",
        "claim plan_request",
        "plan template",  # the offline planner: no model, so no gen_ai attributes
        "store plan_request",
    }
    assert {span.parent_span_id for span in children if span is not root} == {root.span_id}
    assert all(root.start_ns <= span.start_ns <= span.end_ns <= root.end_ns for span in children)


async def test_a_request_handed_back_on_stop_ends_its_trace(
    database: Database, tmp_path: Path
) -> None:
    with FakeLLM(default=Reply(hang=True)) as llm, OtlpReceiver() as receiver:
        env = traced(receiver) | {"PLANBUS_SHUTDOWN_GRACE_SECONDS": "0.2"}
        worker = WorkerProcess(
            database.url, tmp_path / "worker.log", llm_base_url=llm.base_url, env=env
        )
        lead = await database.insert_lead(telegram_id=ALICE)
        try:
            await worker.start()
            request_id = await tma_insert(database.url, ALICE, lead)
            await eventually(lambda: len(llm.calls) == 1, 10, "the model call")
            code, _ = await worker.terminate()
            assert code == 0, worker.log()
        finally:
            await worker.aclose()
        await eventually(lambda: len(receiver.spans) >= 4, 10, "the attempt's spans")
    assert (await database.request(request_id))["status"] == "pending"
    spans = {span.name: span for span in receiver.spans}
    assert set(spans) == {
        "process plan_request",
        "claim plan_request",
        f"chat {MODEL}",
        "store plan_request",
    }
    assert spans["store plan_request"].attributes["planbus.outcome"] == "handed_back"
    assert spans["process plan_request"].attributes["planbus.outcome"] == "handed_back"


@pytest.mark.parametrize("endpoint_set", [False, True], ids=["unset", "set"])
async def test_opentelemetry_is_imported_only_when_the_endpoint_is_set(
    database: Database, tmp_path: Path, endpoint_set: bool
) -> None:
    with OtlpReceiver() as receiver:
        worker = WorkerProcess(
            database.url,
            tmp_path / "worker.log",
            env=traced(receiver) if endpoint_set else {},
            module=PROBE,
        )
        row = await run_one_request(database, worker)
        if endpoint_set:
            await eventually(lambda: len(receiver.spans) >= 4, 10, "one attempt's spans")
    assert row["status"] == "completed"
    [loaded] = [line for line in worker.log().splitlines() if line.startswith("otel modules:")]
    if endpoint_set:
        assert "'opentelemetry.sdk.trace'" in loaded
        assert "exporting traces over OTLP/HTTP to " + receiver.url + "/v1/traces" in worker.log()
    else:
        assert loaded == "otel modules: []"
        assert receiver.posts == 0


async def test_an_endpoint_without_the_extra_is_one_warning_and_no_trace(
    database: Database, tmp_path: Path
) -> None:
    with OtlpReceiver() as receiver:
        worker = WorkerProcess(
            database.url,
            tmp_path / "worker.log",
            flags=["--without-otel"],
            env=traced(receiver),
            module=PROBE,
        )
        row = await run_one_request(database, worker)
    assert row["status"] == "completed"
    log = worker.log()
    warning = EXTRA_MISSING % "OTEL_EXPORTER_OTLP_ENDPOINT"
    assert log.count(warning) == 1
    assert [line for line in log.splitlines() if "WARNING" in line] == [
        line for line in log.splitlines() if warning in line
    ]
    assert "otel modules: []" in log
    assert receiver.posts == 0


def test_the_finish_reason_is_noted_from_a_whole_answer_and_from_a_stream() -> None:
    with ledger(MODEL) as cost:
        note_answer({"model": MODEL, "choices": [{"finish_reason": "stop", "message": {}}]})
    assert cost.finish_reason == "stop"
    with ledger(MODEL) as cost:
        note_answer({"model": MODEL, "usage": None}, "length")
    assert cost.finish_reason == "length"
    for hostile in ({"choices": [{"finish_reason": 7}]}, {"choices": "stop"}, {"choices": [None]}):
        with ledger(MODEL) as cost:
            note_answer(hostile)
        assert cost.finish_reason is None


URL = "http://127.0.0.1:9"  # nothing is exported in these tests: the provider is closed unused


@pytest.mark.parametrize(
    ("environ", "traced"),
    [
        ({}, False),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": " "}, False),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": URL, "OTEL_SDK_DISABLED": "true"}, False),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": URL, "OTEL_TRACES_EXPORTER": "none"}, False),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": URL}, True),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": URL + "/v1/traces"}, True),
    ],
    ids=["unset", "blank", "sdk disabled", "exporter none", "endpoint", "traces endpoint"],
)
async def test_the_endpoint_turns_tracing_on_and_the_sdk_switches_turn_it_off(
    environ: dict[str, str], traced: bool
) -> None:
    tracing = open_tracing(environ, TemplatePlanner(), "test-worker")
    try:
        assert (tracing is not NO_TRACING) == traced
    finally:
        await tracing.aclose()


async def test_a_grpc_protocol_is_named_in_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    environ = {"OTEL_EXPORTER_OTLP_ENDPOINT": URL, "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"}
    with caplog.at_level(logging.WARNING, logger="planbus.bus.tracing"):
        tracing = open_tracing(environ, TemplatePlanner(), "test-worker")
    await tracing.aclose()
    assert tracing is not NO_TRACING
    assert "OTEL_EXPORTER_OTLP_PROTOCOL=grpc is ignored" in caplog.text
