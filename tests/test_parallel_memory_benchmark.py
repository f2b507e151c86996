"""benchmarks/parallel_memory.py's bookkeeping (never its timings): one quick FSDP2 launch on 2 gloo processes."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

BENCHMARK = Path(__file__).resolve().parents[1] / "benchmarks" / "parallel_memory.py"


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("optimlab_benchmarks_parallel_memory", BENCHMARK)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_fsdp2_ranks_hold_disjoint_halves_measured_from_the_tensors(bench: ModuleType, tmp_path: Path) -> None:
    ranks = bench._launch(2, "fsdp2", True, tmp_path)
    assert [row["rank"] for row in ranks] == [0, 1]
    parameters = ranks[0]["parameters"]
    assert parameters == 29_056  # the quick GPT (tied embedding once)
    # the shards add up to the whole model, exactly: 4 B per parameter, gradient and AdamW's two moments
    assert sum(row["param_bytes"] for row in ranks) == 4 * parameters
    assert sum(row["grad_bytes"] for row in ranks) == 4 * parameters
    # ... and AdamW's float32 step counter, one per parameter tensor, kept whole on every rank
    assert sum(row["state_bytes"] for row in ranks) == 8 * parameters + 2 * 4 * _tensor_count(bench)
    for row in ranks:  # each rank about half (Shard(0) over rows of unequal counts)
        assert 0.45 < row["param_bytes"] / (4 * parameters) < 0.55
        assert len(row["step_s"]) == bench.QUICK["timed_steps"] and row["peak_rss_bytes"] > 0


def _tensor_count(bench: ModuleType) -> int:
    from optimlab.train.model import GPT, GPTConfig

    shape = bench.QUICK
    model = GPT(GPTConfig(vocab_size=shape["vocab_size"], block_size=shape["block_size"], n_layer=shape["n_layer"],
                          n_head=shape["n_head"], n_embd=shape["n_embd"]))
    return len(list(model.parameters()))


def test_expected_bytes_per_strategy(bench: ModuleType) -> None:
    whole = {"param_bytes": 400, "grad_bytes": 400, "state_bytes": 800}
    assert bench._expected("ddp", 4, whole) == (400, 400, 800)
    assert bench._expected("zero1", 4, whole) == (400, 400, 200)
    assert bench._expected("fsdp2", 4, whole) == (100, 100, 200)


def test_markdown_shows_measured_against_expected(bench: ModuleType, tmp_path: Path) -> None:
    mib = bench.MIB
    row = {"world_size": 2, "strategy": "fsdp2", "param_bytes": [mib, 3 * mib], "grad_bytes": [mib, mib],
           "state_bytes": [2 * mib, 2 * mib], "peak_rss_bytes": [300 * mib, 300 * mib],
           "expected_param_bytes": 2 * mib, "expected_grad_bytes": mib, "expected_state_bytes": 2 * mib,
           "step_s": 0.5, "tokens_per_s": 1024.0}
    results = {"shape": bench.QUICK, "parameters": 1000, "cores": 2,
               "load_before": "1.0 / 1.0 / 1.0", "load_after": "1.0 / 1.0 / 1.0", "quick": True,
               "measured_at": "2026-12-04 23:00 UTC", "rows": [row]}
    table = bench.to_markdown(results)
    # largest rank 3 + 1 + 2 = 6 MiB against 5 expected: 1.200; the unequal parameter shards shown as a range
    assert "| 2 | fsdp2 | 1.0–3.0 | 1.0 | 2.0 | 2.0 | 4.0–6.0 | 5.0 | 1.200 | 300.0 | 1,024 |" in table
    json_path, markdown_path = bench.write(results, tmp_path)
    assert json_path.name == "parallel_memory.json" and "Memory is **measured from the tensors**" in \
        markdown_path.read_text()
