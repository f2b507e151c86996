"""benchmarks/monitor_overhead.py: the bookkeeping of the interleaved measurement, on a tiny MLP."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "monitor_overhead.py"


@pytest.fixture(scope="module")
def benchmark():
    spec = importlib.util.spec_from_file_location("monitor_overhead", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quick_run_on_a_tiny_model_writes_json_and_markdown(benchmark, tmp_path: Path) -> None:
    results = benchmark.run(quick=True, device="cpu", widths=(6, 10, 3))
    assert results["parameters"] == 6 * 10 + 10 + 10 * 3 + 3
    assert results["rounds"] == 3 and results["steps_per_block"] == 10
    assert set(results["median_step_ms"]) == {"no monitor", "every=10", "every=1"}
    assert all(len(samples) == 3 for samples in results["samples_cpu_ms"].values())
    for mode, median in results["median_step_ms"].items():
        assert sorted(results["samples_ms"][mode])[1] == pytest.approx(median)
        if mode != "no monitor":
            expected = 100.0 * (median / results["median_step_ms"]["no monitor"] - 1.0)
            assert results["overhead_percent"][mode] == pytest.approx(expected)
    for mode in ("every=10", "every=1"):  # paired: the median of the rounds' own overheads
        per_round = [100.0 * (a / b - 1.0) for a, b in zip(results["samples_cpu_ms"][mode],
                                                             results["samples_cpu_ms"]["no monitor"])]
        assert results["paired_cpu_overhead_percent"][mode] == pytest.approx(
            [sorted(per_round)[1], min(per_round), max(per_round)])
    json_path, markdown_path = benchmark.write(results, tmp_path)
    assert json.loads(json_path.read_text())["overhead_percent"] == results["overhead_percent"]
    markdown = markdown_path.read_text()
    assert "| every=10 |" in markdown and "| every=1 |" in markdown and "no monitor" in markdown
