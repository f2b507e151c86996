"""The benchmark scripts in quick mode: their bookkeeping (never their timings) and the files they write."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import ModuleType, SimpleNamespace

import pytest
from benchmark_modules import load_benchmark



@pytest.fixture(scope="module")
def throughput() -> ModuleType:
    return load_benchmark("step_throughput")


@pytest.fixture(scope="module")
def quick_results(throughput: ModuleType) -> dict:
    return throughput.run(quick=True, include_compiled=False, quiet=True)


def test_quick_run_rows_are_consistent(throughput: ModuleType, quick_results: dict) -> None:
    rows = quick_results["rows"]
    table = throughput.algorithms(include_compiled=False)
    expected = {(size, name, impl.label) for size in throughput.QUICK_SIZES for name in ("adamw", "lion")
                for impl in table[name].impls if impl.sizes is None or size in impl.sizes}
    assert {(r["size"], r["algorithm"], r["impl"]) for r in rows} == expected
    bandwidth = quick_results["bandwidth_gbs"] * 1e9
    for row in rows:
        assert "error" not in row, row
        total, count = throughput.QUICK_SIZES[row["size"]]
        assert (row["params"], row["tensors"]) == (total, count)
        seconds = row["ms_per_step"] / 1e3
        assert row["gparams_per_s"] == pytest.approx(row["params"] / seconds / 1e9, rel=1e-12)
        assert row["bandwidth_fraction"] == pytest.approx(
            row["bytes_per_param_moved"] * row["params"] / seconds / bandwidth, rel=1e-12)
        # fp32: AdamW keeps two moments (8 B/param, 28 B moved), Lion one (4 B/param, 20 B moved)
        state = {"adamw": 8.0, "lion": 4.0}[row["algorithm"]]
        assert row["state_bytes_per_param"] == pytest.approx(state)
        assert row["bytes_per_param_moved"] == pytest.approx(12 + 2 * state)
        assert row["compile_s"] in (None, 0.0)  # nothing here compiles


def test_make_params_layout(throughput: ModuleType) -> None:
    import torch

    params = throughput.make_params(20_000, 10, torch.bfloat16)
    assert len(params) == 10 and all(p.shape == (2, 1000) and p.dtype == torch.bfloat16 for p in params)
    assert all(p.grad is not None and p.grad.shape == p.shape for p in params)
    small = throughput.make_params(6_400, 100, torch.float32)
    assert all(p.shape == (8, 8) for p in small)


def test_markdown_and_json(throughput: ModuleType, quick_results: dict, tmp_path: Path) -> None:
    json_path, md_path = throughput.write(quick_results, tmp_path)
    loaded = json.loads(json_path.read_text())
    assert len(loaded["rows"]) == len(quick_results["rows"])
    text = md_path.read_text()
    assert "Streaming bandwidth (in-place `a += b`" in text
    for row in quick_results["rows"]:
        assert f"| {row['algorithm']} | {row['impl']} | {row['gparams_per_s']:.3f} |" in text
    assert "#### Targets" in text


def _row(size: str, algorithm: str, impl: str, source: str, ms: float, fraction: float = 0.5,
         dtype: str = "float32") -> dict:
    return {"size": size, "algorithm": algorithm, "impl": impl, "source": source, "ms_per_step": ms,
            "bandwidth_fraction": fraction, "dtype": dtype}


def test_target_verdicts(throughput: ModuleType) -> None:
    results = {
        "config": {"targets": {"adamw": "torch-fused", "lion": "3x", "adamw-bf16-state": "lowp-1.3"},
                   "elementwise": {"adamw": True, "lion": True, "adamw-bf16-state": True}},
        "rows": [
            _row("20M", "adamw", "optimlab fused", "optimlab", 10.0),
            _row("20M", "adamw", "optimlab foreach", "optimlab", 40.0),
            _row("20M", "adamw", "torch fused", "torch", 12.0),
            _row("20M", "lion", "optimlab fused", "optimlab", 10.0, fraction=0.9),
            _row("20M", "lion", "lion-pytorch", "lion_pytorch", 25.0),
            _row("20M", "lion", "torch foreach", "torch", 40.0),
            _row("20M", "adamw-bf16-state", "optimlab fused", "optimlab", 10.0),
            _row("10k-small", "adamw", "optimlab fused", "optimlab", 3.0),
            _row("10k-small", "adamw", "torch foreach", "torch", 2.0),
            _row("10k-small", "adamw", "torch fused", "torch", 1.5),
        ],
    }
    verdicts = {(v["size"], v["algorithm"]): v for v in throughput.evaluate_targets(results)}
    adamw = verdicts[("20M", "adamw")]
    assert (adamw["ours"], adamw["theirs"], adamw["ratio"], adamw["met"]) == ("optimlab fused", "torch fused", 1.2,
                                                                               True)
    lion = verdicts[("20M", "lion")]  # 2.5x the best peer: below 3x although the bandwidth share is 90%
    assert (lion["theirs"], lion["ratio"], lion["met"], lion["bandwidth_fraction"]) == ("lion-pytorch", 2.5, False,
                                                                                          0.9)
    lowp = verdicts[("20M", "adamw-bf16-state")]  # against torch fused fp32 AdamW from the adamw rows
    assert (lowp["theirs"], lowp["ratio"], lowp["required"], lowp["met"]) == ("torch fused", 1.2, 1.3, False)
    small = verdicts[("10k-small", "adamw")]
    assert (small["theirs"], small["ratio"], small["met"]) == ("torch fused", 0.5, False)


def test_run_all_writes_perf_md_and_calls_monitor(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    run_all = load_benchmark("run_all")
    calls: list[bool] = []
    real_loader = run_all.load_benchmark

    def fake_monitor_run(quick: bool) -> dict:
        calls.append(quick)
        return {"overhead_percent": {"every=1": 1.5}}

    monitor = SimpleNamespace(run=fake_monitor_run, to_markdown=lambda results: "| monitor | 1.5% |",
                              write=lambda results, out: (Path(out) / "monitor_overhead.json").write_text("{}"))
    # the compile-time benchmark compiles in child processes (tens of seconds): its own test covers it
    compile_time = SimpleNamespace(run=lambda quick: {"rows": []}, to_markdown=lambda results: "| compile | 0 |",
                                   write=lambda results, out: (Path(out) / "compile_time.json").write_text("{}"))
    monkeypatch.setattr(run_all, "load_benchmark", lambda name: {"monitor_overhead": monitor,
                                                                 "compile_time": compile_time}.get(name)
                        or (None if name in ("guard_overhead", "store_scaleout", "parallel_memory",
                                          "frontier_step", "default_path")  # own tests
                            else real_loader(name)))
    results = run_all.run_all(tmp_path, quick=True, names=["adamw"], include_compiled=False, quiet=True)
    assert calls == [True]
    assert set(results) == {"step_throughput", "compile_time", "monitor_overhead"}
    perf = (tmp_path / "perf.md").read_text()
    assert perf.startswith("# Performance: optimizer step throughput")
    assert "## Step throughput" in perf and "| adamw | torch fused |" in perf
    assert "## Optimizer-state monitor overhead" in perf and "| monitor | 1.5% |" in perf
    assert {p.name for p in tmp_path.iterdir()} >= {"perf.md", "step_throughput.json", "step_throughput.md",
                                                    "monitor_overhead.json"}
    (tmp_path / "perf.md").unlink()  # --render-only: the same page again from the JSON files, without measuring
    assert run_all.render(tmp_path) == tmp_path / "perf.md"
    rendered = (tmp_path / "perf.md").read_text()
    assert "| adamw | torch fused |" in rendered and "| monitor | 1.5% |" in rendered
    assert calls == [True]
    # only the step throughput again: the monitor is not run, its section comes from its JSON file
    (tmp_path / "monitor_overhead.json").write_text('{"overhead_percent": {}}')
    again = run_all.run_all(tmp_path, quick=True, only=["step_throughput"], merge=True, names=["lion"],
                            include_compiled=False, quiet=True)
    assert calls == [True] and again["monitor_overhead"] == {"overhead_percent": {}}
    kept = {(row["algorithm"], row["impl"]) for row in again["step_throughput"]["rows"]}
    assert ("adamw", "torch fused") in kept and ("lion", "lion-pytorch") in kept  # merged with the first run
    with pytest.raises(ValueError, match="Invalid benchmark name"):
        run_all.run_all(tmp_path, only=["step-throughput"])


def test_gpt2_small_shapes(throughput: ModuleType) -> None:
    shapes = throughput.gpt2_small_shapes()
    assert len(shapes) == 148 and sum(math.prod(shape) for shape in shapes) == 124_439_808
    assert throughput.SIZES["gpt2-small"] == (124_439_808, 148)


def test_merge_keeps_configurations_not_measured_again(throughput: ModuleType) -> None:
    previous = {"config": {"targets": {"lion": "3x"}}, "rows": [
        _row("20M", "adamw", "torch fused", "torch", 12.0), _row("20M", "lion", "lion-pytorch", "lion_pytorch", 25.0),
        _row("20M", "adamw", "optimlab fused", "optimlab", 14.0)]}
    current = {"config": {"targets": {"adamw": "torch-fused"}}, "measured": "today", "rows": [
        dict(_row("20M", "adamw", "optimlab flat", "optimlab", 10.0), measured="today"),
        dict(_row("20M", "adamw", "torch fused", "torch", 11.0), measured="today"),
        dict(_row("1M", "adamw", "torch fused", "torch", 1.0), measured="today")]}
    merged = throughput.merge(previous, current)
    assert [(r["size"], r["algorithm"], r["impl"], r["measured"]) for r in merged["rows"]] == [
        ("20M", "adamw", "optimlab flat", "today"), ("20M", "adamw", "torch fused", "today"),
        ("20M", "lion", "lion-pytorch", "an earlier run"), ("1M", "adamw", "torch fused", "today")]
    assert merged["config"]["targets"] == {"lion": "3x", "adamw": "torch-fused"}


def test_issue_table_and_default_verdict(throughput: ModuleType) -> None:
    rows = [_row("20M", "adamw", "optimlab flat", "optimlab", 10.0), _row("20M", "adamw", "torch fused", "torch", 11.0),
            _row("20M", "adamw", "optimlab default", "optimlab", 20.0),
            _row("20M", "adamw", "torch for-loop", "torch", 19.0),
            _row("20M", "sgd-momentum", "optimlab flat", "optimlab", 5.0),
            _row("20M", "sgd-momentum", "torch fused", "torch", 4.0)]
    results = {"rows": rows, "config": {"targets": {"adamw": "torch-fused", "sgd-momentum": "torch-fused"},
                                        "elementwise": {}}}
    table = "\n".join(throughput.issue_table(results))
    assert "| 20M (100 tensors, 20M params) | 1.10 yes | – | 0.80 **no** | 0.55 | 0.95 **no** | – | – |" in table
    default = [v for v in throughput.evaluate_targets(results) if v["ours"] == "optimlab default"]
    assert [(v["algorithm"], round(v["ratio"], 2), v["met"]) for v in default] == [("adamw", 0.95, False)]
    # GPT-2 small's shapes are no small-tensor case (its name ends in "small"): the torch-fused target applies
    results["rows"] += [_row("gpt2-small", "adamw", "optimlab flat", "optimlab", 50.0),
                        _row("gpt2-small", "adamw", "torch fused", "torch", 60.0),
                        _row("gpt2-small", "adamw", "torch foreach", "torch", 40.0)]
    (gpt2,) = [v for v in throughput.evaluate_targets(results)
               if v["size"] == "gpt2-small" and v["ours"] != "optimlab default"]
    assert (gpt2["target"], gpt2["theirs"], gpt2["ratio"]) == (">= 1.0x torch fused", "torch fused", 1.2)


def test_ratios_are_paired_by_round(throughput: ModuleType) -> None:
    """With per-round times, a ratio is the median of the rounds' ratios (not the ratio of the medians: 1.2 here),
    shown with its range; the load average measured around the rows is printed under the issue's table."""
    flat = dict(_row("gpt2-small", "adamw", "optimlab flat", "optimlab", 10.0), round_ms=[9.0, 10.0, 13.0],
                load=[3.5, 4.25])
    fused = dict(_row("gpt2-small", "adamw", "torch fused", "torch", 12.0), round_ms=[10.0, 30.0, 12.0], load=[3.0, 4.0])
    ratio, low, high = throughput.paired_ratio(fused, flat)
    assert (ratio, low, high) == (pytest.approx(10 / 9), pytest.approx(12 / 13), pytest.approx(3.0))
    assert throughput.paired_ratio(fused, dict(flat, round_ms=[9.0, 10.0])) == (1.2, None, None)  # not paired
    results = {"rows": [flat, fused], "config": {"targets": {"adamw": "torch-fused"}, "elementwise": {}}}
    table = "\n".join(throughput.issue_table(results))
    assert "| gpt2-small (148 tensors, 124M params) | 1.11 (0.92-3.00) yes | – |" in table
    assert "before/after these configurations: 3.0-4.2 on" in table
    (verdict,) = throughput.evaluate_targets(results)
    assert (round(verdict["ratio"], 3), verdict["met"]) == (1.111, True)
    assert throughput._ratio_cell(verdict["ratio"], *verdict["range"], suffix="x") == "1.11x (0.92-3.00)"



def test_compile_time_markdown_and_files(tmp_path: Path) -> None:
    """The table and files of the compile-time benchmark (its child processes compile for tens of seconds, so
    the measurement itself runs in ``make bench`` only)."""
    compile_time = load_benchmark("compile_time")
    assert ("adamw", True) in compile_time.CONFIGS and compile_time.QUICK_CONFIGS
    run = {"first_steps_s": 20.5, "next_step_s": 0.0012, "compile_s": 19.25}
    results = {"threads": "2", "rows": [{"algorithm": "adamw", "path": "flat fused", "cold": run,
                                         "warm": dict(run, first_steps_s=3.0, compile_s=2.5)}]}
    json_path, md_path = compile_time.write(results, tmp_path)
    assert json.loads(json_path.read_text()) == results
    assert "| adamw | flat fused | 20.5 | 19.2 | 3.0 | 2.5 | 1.20 |" in md_path.read_text()


def test_guard_overhead_quick_run() -> None:
    """The guard benchmark's bookkeeping on a tiny MLP (never its timings): three modes, no skipped step."""
    guard = load_benchmark("guard_overhead")
    results = guard.run(quick=True, widths=(8, 16, 4))
    modes = ["optimizer.step", "guard", "guard, check_update"]
    assert list(results["median_step_ms"]) == modes and results["overhead_percent"]["optimizer.step"] == 0.0
    assert results["parameters"] == 8 * 16 + 16 + 16 * 4 + 4
    assert all(f"| {mode} |" in guard.to_markdown(results) for mode in modes)


def test_default_path_quick_run(tmp_path: Path) -> None:
    """The one-thread default-path benchmark: one row per algorithm, each ratio the paired median of its own rows'
    rounds, the thread count restored, both files written."""
    import torch

    default_path = load_benchmark("default_path")
    threads = torch.get_num_threads()
    results = default_path.run(quick=True)
    assert torch.get_num_threads() == threads
    assert [row["algorithm"] for row in results["rows"]] == ["adamw", "adam", "sgd-momentum"]
    for row in results["rows"]:
        low, high = row["range"]
        assert low <= row["ratio"] <= high and len(row["load"]) == 2
    json_path, md_path = default_path.write(results, tmp_path)
    assert json.loads(json_path.read_text())["rows"] == results["rows"]
    first = results["rows"][0]
    assert f"| adamw | {first['optimlab_ms']:.1f} | {first['torch_ms']:.1f} | {first['ratio']:.2f}x (" in md_path.read_text()


def test_benchmark_main_runs_writes_and_prints(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The command line the benchmark scripts share (optimlab.io.benchmark_main): --quick reaches run, --out
    reaches write, the markdown and the written paths are printed."""
    from optimlab.io import benchmark_main

    calls: list[tuple] = []
    written = (tmp_path / "x.json", tmp_path / "x.md")
    benchmark_main("x", lambda quick: calls.append(("run", quick)) or {"ok": quick},
                   lambda results, out: calls.append(("write", results, out)) or written,
                   lambda results: f"| table {results['ok']} |", ["--out", str(tmp_path), "--quick"])
    assert calls == [("run", True), ("write", {"ok": True}, str(tmp_path))]
    printed = capsys.readouterr().out
    assert "| table True |" in printed and f"wrote {written[0]}, {written[1]}" in printed
    for name in ("default_path", "compile_time", "guard_overhead"):  # each script's main is this command line
        with pytest.raises(SystemExit):
            load_benchmark(name).main(["--help"])
        assert "--quick" in capsys.readouterr().out
