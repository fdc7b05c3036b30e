"""The benchmark suite still runs: its quick mode end to end, with no timing assertions."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_quick_benchmark_prints_the_table_and_writes_the_json(tmp_path: Path) -> None:
    output = tmp_path / "results.json"
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.run", "--quick", "--output", str(output)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=280,
        stdin=subprocess.DEVNULL,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "| metric | planbus | baseline |" in done.stdout
    assert "W1 commit → LLM call, p50" in done.stdout

    report = json.loads(output.read_text())
    assert report["mode"] == "quick"
    assert report["machine"]["nproc"] >= 1
    ran = report["results"]
    assert set(ran) == {
        "w1",
        "w1_baseline",
        "w1_breakdown",
        "w2_template",
        "w2_openai",
        "w3",
        "w3_baseline",
        "w4",
        "idle",
        "recovery",
        "first_step",
        "fairness",
    }
    # Correctness, not speed: every effect written, no false takeover.
    assert ran["w2_template"]["effects"]["completed"] == ran["w2_template"]["requests"]
    assert ran["w2_openai"]["effects"]["events"] == ran["w2_openai"]["requests"]
    assert ran["recovery"]["false_takeovers"] == 0
    # Every measured request's model-call span arrived, and the stages come in order.
    breakdown = ran["w1_breakdown"]
    assert breakdown["spans_missing"] == 0
    stages = [breakdown[f"to_{stage}_ms"]["p50"] for stage in ("claim", "planner", "llm")]
    assert stages == sorted(stages)
    assert 0 < ran["first_step"]["steps_seen_before_completion"]
    assert ran["first_step"]["progress_writes_per_request"] <= ran["first_step"]["steps"] + 1
    assert all(entry["planbus"] is not None for entry in report["table"])
