"""The W1 chart: pickup latency of planbus against the baseline, on a log scale.

matplotlib is optional (`pip install -e '.[bench]'`); without it the run says so and goes on.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def w1_chart(results: dict[str, Any], path: Path, machine: str) -> str:
    """Draw the cumulative distributions; returns what happened, for the run's output."""
    planbus = results.get("w1")
    baseline = results.get("w1_baseline")
    if not planbus:
        return "chart skipped: W1 did not run"
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "chart skipped: matplotlib is not installed (pip install -e '.[bench]')"

    figure, axes = plt.subplots(figsize=(8, 4.2), dpi=120)
    # Only commit -> LLM call: commit -> claim compares the client's clock reading with the
    # claim's now(), and can be slightly negative, which a log scale cannot show.
    series = [(planbus, "samples_to_llm_ms", "planbus: commit → LLM call", "#1f6feb", "-")]
    if baseline:
        series += [
            (
                baseline,
                "samples_to_llm_ms",
                "baseline (poll every 3 s): commit → LLM call",
                "#d1242f",
                "-",
            ),
        ]
    for data, key, label, color, style in series:
        values = sorted(data[key])
        fractions = [(i + 1) / len(values) for i in range(len(values))]
        axes.step(values, fractions, where="post", label=label, color=color, linestyle=style)
    axes.set_xscale("log")
    axes.set_xlabel("latency from the INSERT's commit (ms, log scale)")
    axes.set_ylabel("fraction of requests")
    axes.set_ylim(0, 1.02)
    axes.grid(True, which="both", alpha=0.3)
    p50 = planbus["to_llm_ms"]["p50"]
    title = f"W1 pickup latency ({planbus['requests']} requests at {planbus['rate_per_second']:g}/s"
    title += f"; planbus p50 {p50:.2f} ms"
    if baseline:
        title += f", baseline p50 {baseline['to_llm_ms']['p50']:.0f} ms"
    axes.set_title(title + ")", fontsize=10)
    axes.legend(loc="lower right", fontsize=8)
    figure.text(0.99, 0.01, machine, ha="right", va="bottom", fontsize=7, color="#666666")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    plt.close(figure)
    return f"chart written to {path}"
