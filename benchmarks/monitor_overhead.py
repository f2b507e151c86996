"""Overhead of :class:`optimlab.monitor.OptimizerMonitor` on a 10M-parameter MLP training step.

Three identical models with Adam — one without a monitor, one with ``every=10`` and one with ``every=1``
(memory sink), each monitor attached once as in a real run — are trained in blocks of steps,
interleaved round-robin with the starting mode rotated each round, so that drifts in machine load hit every mode alike. Per mode the median per-step time over the
rounds is reported, and the overhead as ``median(mode) / median(no monitor) - 1``, both for wall-clock
time and for the process's CPU time (the latter is robust to other processes competing for the cores).

    python benchmarks/monitor_overhead.py --out docs [--quick] [--device cuda]

``run(quick)`` returns the results as a dict (``benchmarks/run_all.py`` calls it); the script also writes
``monitor_overhead.json`` and ``monitor_overhead.md`` into ``--out``.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from optimlab.io import write_json_and_markdown
from optimlab.monitor import MemorySink, OptimizerMonitor

WIDTHS = (1024, 2304, 2304, 1024)  # three Linear layers: 10,032,640 parameters
BATCH_SIZE = 64
WARMUP_STEPS = 10  # per setup, before timing: allocator, Adam state, the monitor's buffers
MODES: dict[str, int | None] = {"no monitor": None, "every=10": 10, "every=1": 1}


def build_mlp(device: torch.device, widths: tuple[int, ...] = WIDTHS) -> nn.Module:
    """The benchmark's MLP: Linear layers of ``widths`` with ReLU between (:data:`WIDTHS`: about 10M parameters)."""
    layers: list[nn.Module] = []
    for index, (fan_in, fan_out) in enumerate(zip(widths[:-1], widths[1:])):
        if index:
            layers.append(nn.ReLU())
        layers.append(nn.Linear(fan_in, fan_out))
    return nn.Sequential(*layers).to(device)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_block(model: nn.Module, optimizer: torch.optim.Optimizer, steps: int, inputs: torch.Tensor,
                targets: torch.Tensor) -> tuple[float, float]:
    """(wall, CPU) seconds per training step over one block of ``steps`` steps."""
    _synchronize(inputs.device)
    start, start_cpu = time.perf_counter(), time.process_time()
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        nn.functional.mse_loss(model(inputs), targets).backward()
        optimizer.step()
    _synchronize(inputs.device)
    elapsed, elapsed_cpu = time.perf_counter() - start, time.process_time() - start_cpu
    return elapsed / steps, elapsed_cpu / steps


def _overheads(medians: dict[str, float]) -> dict[str, float]:
    """Percent slower than the ``no monitor`` median, per monitored mode."""
    baseline = medians["no monitor"]
    return {mode: 100.0 * (value / baseline - 1.0) for mode, value in medians.items() if mode != "no monitor"}


def _paired_overheads(samples: dict[str, list[float]]) -> dict[str, list[float]]:
    """Per monitored mode ``[median, lowest, highest]`` over the rounds of that round's overhead in percent (the
    mode's block against the unmonitored block of the same round: a load change between rounds cancels out)."""
    baseline = samples["no monitor"]
    paired = {}
    for mode, values in samples.items():
        if mode != "no monitor":
            per_round = [100.0 * (value / base - 1.0) for value, base in zip(values, baseline)]
            paired[mode] = [statistics.median(per_round), min(per_round), max(per_round)]
    return paired


def run(quick: bool = False, device: str | None = None, widths: tuple[int, ...] = WIDTHS) -> dict[str, Any]:
    """Measure the monitor's overhead; ``quick`` uses fewer rounds and shorter blocks (``widths`` shrinks the
    model for tests). Returns a dict with the per-mode median step times (ms), overheads (%), all samples
    and the setup."""
    target = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    rounds, block = (3, 10) if quick else (9, 20)
    torch.manual_seed(0)
    inputs = torch.randn(BATCH_SIZE, widths[0], device=target)
    targets = torch.randn(BATCH_SIZE, widths[-1], device=target)
    setups: dict[str, tuple[nn.Module, torch.optim.Optimizer, OptimizerMonitor | None]] = {}
    for mode, every in MODES.items():
        torch.manual_seed(0)
        model = build_mlp(target, widths)
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
        monitor = OptimizerMonitor(optimizer, every=every, sinks=[MemorySink()]) if every else None
        _time_block(model, optimizer, WARMUP_STEPS, inputs, targets)
        setups[mode] = (model, optimizer, monitor)
    wall: dict[str, list[float]] = {mode: [] for mode in MODES}
    cpu: dict[str, list[float]] = {mode: [] for mode in MODES}
    names = list(MODES)
    load_before = os.getloadavg()[0]
    for round_index in range(rounds):
        for offset in range(len(names)):
            mode = names[(round_index + offset) % len(names)]
            model, optimizer, _ = setups[mode]
            wall_time, cpu_time = _time_block(model, optimizer, block, inputs, targets)
            wall[mode].append(wall_time)
            cpu[mode].append(cpu_time)
    for mode, (_, _, monitor) in setups.items():
        if monitor is not None:
            expected = (WARMUP_STEPS + rounds * block) // MODES[mode]
            if len(monitor.sinks[0].history) != expected:
                raise RuntimeError(f"{mode}: the monitor recorded {len(monitor.sinks[0].history)} of {expected} steps")
            monitor.remove()
    medians = {mode: statistics.median(values) for mode, values in wall.items()}
    cpu_medians = {mode: statistics.median(values) for mode, values in cpu.items()}
    return {
        "benchmark": "monitor_overhead",
        "quick": quick,
        "device": str(target),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
        "parameters": sum(p.numel() for p in setups["no monitor"][0].parameters()),
        "batch_size": BATCH_SIZE,
        "optimizer": "torch.optim.Adam (default implementation)",
        "rounds": rounds,
        "steps_per_block": block,
        "median_step_ms": {mode: 1e3 * value for mode, value in medians.items()},
        "overhead_percent": _overheads(medians),
        "median_step_cpu_ms": {mode: 1e3 * value for mode, value in cpu_medians.items()},
        "cpu_overhead_percent": _overheads(cpu_medians),
        "paired_overhead_percent": _paired_overheads(wall),
        "paired_cpu_overhead_percent": _paired_overheads(cpu),
        "load": [load_before, os.getloadavg()[0]],
        "samples_ms": {mode: [1e3 * v for v in values] for mode, values in wall.items()},
        "samples_cpu_ms": {mode: [1e3 * v for v in values] for mode, values in cpu.items()},
    }


def to_markdown(results: dict[str, Any]) -> str:
    """A markdown table of the results."""
    lines = [
        "## OptimizerMonitor overhead",
        "",
        f"{results['parameters']:,}-parameter MLP, batch {results['batch_size']}, {results['optimizer']}, "
        f"{results['device']} ({results['threads']} threads), torch {results['torch']}; {results['rounds']} "
        f"interleaved rounds of {results['steps_per_block']} steps per mode, medians"
        + (f"; load average {min(results['load']):.1f}-{max(results['load']):.1f}." if "load" in results else "."),
        "*paired*: the median over the rounds of each round's overhead (the mode's block against the unmonitored "
        "block of the same round), with its range.",
        "",
        "| mode | median step, wall (ms) | overhead, wall | paired, wall | median step, CPU (ms) | overhead, CPU "
        "| paired, CPU |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]

    def paired(key: str, mode: str) -> str:
        value = results.get(key, {}).get(mode)
        return "—" if value is None else f"{value[0]:+.1f}% ({value[1]:+.1f} to {value[2]:+.1f})"

    for mode, value in results["median_step_ms"].items():
        overhead = results["overhead_percent"].get(mode)
        cpu_overhead = results["cpu_overhead_percent"].get(mode)
        lines.append(f"| {mode} | {value:.2f} | {'—' if overhead is None else f'{overhead:+.1f}%'} | "
                     f"{paired('paired_overhead_percent', mode)} | {results['median_step_cpu_ms'][mode]:.2f} | "
                     f"{'—' if cpu_overhead is None else f'{cpu_overhead:+.1f}%'} | "
                     f"{paired('paired_cpu_overhead_percent', mode)} |")
    return "\n".join(lines) + "\n"


def write(results: dict[str, Any], out: str | Path) -> tuple[Path, Path]:
    """Write ``monitor_overhead.json`` and ``monitor_overhead.md`` into ``out`` (atomically); return both paths."""
    return write_json_and_markdown(out, "monitor_overhead", results, to_markdown(results))


def main(argv: list[str] | None = None) -> None:
    """Command line: ``--out DIR [--quick] [--device DEVICE]``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="docs", help="folder for monitor_overhead.json/.md (default: docs)")
    parser.add_argument("--quick", action="store_true", help="3 rounds of 10 steps instead of 9 of 20")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    args = parser.parse_args(argv)
    results = run(quick=args.quick, device=args.device)
    paths = write(results, args.out)
    print(to_markdown(results))
    print("wrote " + ", ".join(str(p) for p in paths))


if __name__ == "__main__":
    main()
