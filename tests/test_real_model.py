"""A real self-hosted model: llama.cpp's `llama-server` serving SmolLM2-135M-Instruct.

Opt-in (`pytest -m llama`): it takes minutes of a 2-core machine, so a plain `pytest` (and CI)
leaves it out, and `python -m benchmarks.run --only real_model` is the measured scenario. It
needs the server built once (`python -m benchmarks.llama build`, about 15 minutes on 2 cores,
cached in `$PLANBUS_CACHE_DIR/llama`, default `~/.cache/planbus/llama`). Two requests go through
a real worker to the real server: the schema planbus sends is turned into the server's grammar,
the answer is streamed, validated and stored with its real token counts, or the request fails
readably.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest

from benchmarks.llama import LlamaServer, cache_dir, cached
from planbus.llm.plan import validate_plan
from tests.helpers import Database, running_worker

pytestmark = [pytest.mark.llama, pytest.mark.anyio, pytest.mark.timeout(1800)]

TIMEOUT_SECONDS = 240.0


@pytest.fixture(scope="module")
def llama_server(
    tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[LlamaServer]:
    if "llama" not in (request.config.getoption("-m") or ""):
        pytest.skip("opt-in: `pytest -m llama` runs the real model (minutes on 2 cores)")
    llama = cached()
    if llama is None:
        pytest.skip(
            f"no llama-server in {cache_dir()}: build it once with "
            "`python -m benchmarks.llama build` (about 15 minutes on 2 cores)"
        )
    log = Path(tmp_path_factory.mktemp("llama")) / "llama-server.log"
    with LlamaServer(llama, log) as server:
        yield server


async def test_a_small_self_hosted_model_plans_real_requests_end_to_end(
    llama_server: LlamaServer, database: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OPENAI_BASE_URL", llama_server.base_url)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)  # a keyless server: planner=openai
    leads = [
        await database.insert_lead(
            telegram_id=telegram_id,
            prospect_name=name,
            prospect_title="Head of Platform",
            prospect_analysis="Runs a team of forty engineers; posts weekly about reliability.",
            closing_strategy="Lead with the on-call pain, then offer a short call.",
        )
        for telegram_id, name in ((1, "Ada Lovelace"), (2, "Grace Hopper"))
    ]
    finished = []
    async with running_worker(database.url, planner="openai", llm_timeout_seconds=TIMEOUT_SECONDS):
        requests = [await database.insert_request(lead) for lead in leads]
        with anyio.fail_after(3 * 2 * TIMEOUT_SECONDS):
            for request_id in requests:
                finished.append(await database.wait_for(request_id, within=6 * TIMEOUT_SECONDS))

    completed = [request for request in finished if request["status"] == "completed"]
    for request in finished:
        # A failure is the request's own, in one readable sentence (e.g. a broken step rule).
        if request["status"] == "failed":
            assert request["result"]["error"].startswith("The "), request["result"]
    assert completed, [request["result"] for request in finished]
    for request, lead in zip(finished, leads, strict=True):
        if request["status"] != "completed":
            continue
        result = request["result"]
        validate_plan({"steps": result["plan"]})  # what was stored keeps every rule
        assert result["step_count"] == len(result["plan"])
        assert result["usage"]["completion_tokens"] > 0  # the server's own count
        reminders = await database.reminders(lead, "pending")
        assert len(reminders) == result["step_count"]
