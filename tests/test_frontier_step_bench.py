"""benchmarks/frontier_step.py in quick mode: its bookkeeping (never its timings), the derived GPT-2 rows and
the files it writes; run_all.py runs it."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import ModuleType

import pytest
from benchmark_modules import load_benchmark



@pytest.fixture(scope="module")
def frontier() -> ModuleType:
    return load_benchmark("frontier_step")


@pytest.fixture(scope="module")
def quick(frontier: ModuleType) -> dict:
    return frontier.run(quick=True)


def _soap_state_bytes(shapes: list[tuple[int, ...]], max_dim: int) -> int:
    """optimlab SOAP in float32: two moments per value, a factor and a basis per rotated side (1-D: none),
    a 4-byte step counter per tensor."""
    values = 0
    for shape in shapes:
        values += 2 * math.prod(shape)
        if len(shape) > 1:
            values += 2 * sum(size * size for size in shape if size <= max_dim)
    return 4 * values + 4 * len(shapes)


def test_quick_rows(frontier: ModuleType, quick: dict) -> None:
    rows = quick["sets"]["quick"]
    assert {(row["algorithm"], row["implementation"]) for row in rows} == {
        ("SOAP", "optimlab"), ("SOAP", "pytorch-optimizer"), ("SOAP", "heavyball"),
        ("Shampoo", "optimlab"), ("Shampoo", "pytorch-optimizer")}
    numel = sum(math.prod(shape) for shape in frontier.QUICK_SHAPES)
    for row in rows:
        assert row["numel"] == numel and row["finite"]
        assert row["plain_ms"] <= row["refresh_ms"]  # the slowest step of a cycle is reported as the refresh
        peers = [r["ms_per_step"] for r in rows if r["algorithm"] == row["algorithm"] and r is not row]
        assert row["speed_vs_fastest_peer"] == pytest.approx(min(peers) / row["ms_per_step"], rel=1e-12)
    ours = next(row for row in rows if row["implementation"] == "optimlab" and row["algorithm"] == "SOAP")
    # (12, 8) and (40, 4) are one-sided at max_dim 8 (the 12 and 40 sides keep the identity), (8,) is plain Adam
    assert ours["state_bytes"] == _soap_state_bytes(frontier.QUICK_SHAPES, quick["max_dim"])
    assert "gpt2-small (124M, derived)" not in quick["sets"]


def test_cycle_summary(frontier: ModuleType) -> None:
    summary = frontier._cycle_summary([[0.004, 0.001, 0.001], [0.002, 0.002, 0.008], [0.001, 0.003, 0.002]])
    assert summary["ms_per_step"] == pytest.approx(2.0)  # cycle means 2, 4, 2 ms
    assert summary["refresh_ms"] == pytest.approx(4.0)  # slowest steps 4, 8, 3 ms (wherever in the cycle)
    assert summary["plain_ms"] == pytest.approx(1.5)  # medians of the others 1, 2, 1.5 ms


def test_gpt2_sets_cover_the_124m_model(frontier: ModuleType) -> None:
    total = 0
    for shapes, count in frontier.SETS.values():
        if count is not None:
            total += count * sum(math.prod(shape) for shape in shapes())
    token_rows = frontier.gpt2_token_embedding_slice()[0][0]
    assert token_rows * frontier.TOKEN_SLICES - 50257 == 5  # six slices overcount the vocabulary by 5 rows
    assert total - 5 * 768 == 124_439_808


def test_derived_rows_sum_the_sets(frontier: ModuleType) -> None:
    def row(algorithm: str, implementation: str, value: float) -> dict:
        return {"algorithm": algorithm, "implementation": implementation, "ms_per_step": value,
                "refresh_ms": 2 * value, "plain_ms": value / 2, "state_bytes": 10 * value, "numel": 100, "finite": True}

    parts = [label for label, (_, count) in frontier.SETS.items() if count is not None]
    sets = {label: [row("SOAP", "optimlab", 1.0 + index), row("SOAP", "heavyball", 2.0 + index)]
            for index, label in enumerate(parts)}
    assert frontier.derived_gpt2({label: rows for label, rows in list(sets.items())[:-1]}) == []
    derived = {r["implementation"]: r for r in frontier.derived_gpt2(sets)}
    counts = [count for _, count in frontier.SETS.values() if count is not None]
    ours = sum(count * (1.0 + index) for index, count in enumerate(counts))
    assert derived["optimlab"]["ms_per_step"] == pytest.approx(ours)
    assert derived["optimlab"]["numel"] == 100 * sum(counts)
    assert derived["optimlab"]["speed_vs_fastest_peer"] == pytest.approx(derived["heavyball"]["ms_per_step"] / ours)


def test_files_and_run_all_registration(frontier: ModuleType, quick: dict, tmp_path: Path) -> None:
    json_path, markdown_path = frontier.write(quick, tmp_path)
    assert json.loads(json_path.read_text())["sets"]["quick"] == quick["sets"]["quick"]
    table = markdown_path.read_text()
    assert "| quick (0.00M) | SOAP | heavyball |" in table and "Load average" in table
    run_all = load_benchmark("run_all")
    assert "frontier_step" in run_all.BENCHMARKS
    assert "## SOAP and Shampoo against pytorch-optimizer and heavyball" in run_all.compose({"frontier_step": quick})
