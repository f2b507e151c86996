"""Cost of :class:`optimlab.guard.NonFiniteGuard` on a 10M-parameter MLP training step, with and without
``check_update=True`` (the post-update check: a copy of parameters and state before each step, a finiteness
pass over both after it).

The same setup as ``monitor_overhead.py`` (its MLP and timing loop): three identical models with Adam —
plain ``optimizer.step()``, the guard (gradient check), the guard with ``check_update=True`` — trained in
blocks of steps, interleaved round-robin with the starting mode rotated each round; per mode the median
per-step wall and CPU time, and the overhead ``median(mode) / median(plain) - 1``.

    python benchmarks/guard_overhead.py --out docs [--quick]
"""

from __future__ import annotations

import platform
import statistics
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from monitor_overhead import BATCH_SIZE, WARMUP_STEPS, WIDTHS, _time_block, build_mlp  # noqa: E402

from optimlab.guard import NonFiniteGuard  # noqa: E402
from optimlab.io import benchmark_main, write_json_and_markdown  # noqa: E402

MODES: dict[str, dict[str, bool] | None] = {"optimizer.step": None, "guard": {"check_update": False},
                                           "guard, check_update": {"check_update": True}}


def run(quick: bool = False, widths: tuple[int, ...] = WIDTHS) -> dict[str, Any]:
    """Measure the guard's overhead (``quick``: 3 rounds of 10 steps instead of 9 of 20; ``widths`` shrinks the
    model for tests). Returns the per-mode medians (ms), overheads (%) and the setup."""
    rounds, block = (3, 10) if quick else (9, 20)
    torch.manual_seed(0)
    inputs, targets = torch.randn(BATCH_SIZE, widths[0]), torch.randn(BATCH_SIZE, widths[-1])
    setups = {}
    for mode, options in MODES.items():
        torch.manual_seed(0)
        model = build_mlp(torch.device("cpu"), widths)
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
        stepper = optimizer if options is None else NonFiniteGuard(optimizer, **options)
        _time_block(model, stepper, WARMUP_STEPS, inputs, targets)
        setups[mode] = (model, stepper)
    wall: dict[str, list[float]] = {mode: [] for mode in MODES}
    cpu: dict[str, list[float]] = {mode: [] for mode in MODES}
    names = list(MODES)
    for round_index in range(rounds):
        for offset in range(len(names)):
            mode = names[(round_index + offset) % len(names)]
            wall_time, cpu_time = _time_block(*setups[mode], block, inputs, targets)
            wall[mode].append(wall_time)
            cpu[mode].append(cpu_time)
    for mode, (_, stepper) in setups.items():
        if isinstance(stepper, NonFiniteGuard) and stepper.skipped_steps:
            raise RuntimeError(f"{mode}: {stepper.skipped_steps} steps were skipped; the timing would be wrong")
    medians = {mode: statistics.median(v) for mode, v in wall.items()}
    cpu_medians = {mode: statistics.median(v) for mode, v in cpu.items()}
    return {
        "benchmark": "guard_overhead", "quick": quick, "torch": torch.__version__, "threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
        "parameters": sum(p.numel() for p in setups["optimizer.step"][0].parameters()), "batch_size": BATCH_SIZE,
        "rounds": rounds, "steps_per_block": block,
        "median_step_ms": {mode: 1e3 * v for mode, v in medians.items()},
        "overhead_percent": {mode: 100.0 * (v / medians["optimizer.step"] - 1.0) for mode, v in medians.items()},
        "median_step_cpu_ms": {mode: 1e3 * v for mode, v in cpu_medians.items()},
        "cpu_overhead_percent": {mode: 100.0 * (v / cpu_medians["optimizer.step"] - 1.0)
                                 for mode, v in cpu_medians.items()},
    }


def to_markdown(results: dict[str, Any]) -> str:
    """A markdown table of the results."""
    lines = [f"{results['parameters']:,}-parameter MLP, batch {results['batch_size']}, torch.optim.Adam, CPU "
             f"({results['threads']} threads), torch {results['torch']}; {results['rounds']} interleaved rounds of "
             f"{results['steps_per_block']} training steps per mode, medians.", "",
             "| mode | median step, wall (ms) | overhead, wall | median step, CPU (ms) | overhead, CPU |",
             "|---|---:|---:|---:|---:|"]
    for mode, value in results["median_step_ms"].items():
        lines.append(f"| {mode} | {value:.2f} | {results['overhead_percent'][mode]:+.1f}% | "
                     f"{results['median_step_cpu_ms'][mode]:.2f} | {results['cpu_overhead_percent'][mode]:+.1f}% |")
    return "\n".join(lines) + "\n"


def write(results: dict[str, Any], out: str | Path) -> tuple[Path, Path]:
    """Write ``guard_overhead.json`` and ``guard_overhead.md`` into ``out`` (atomically); return both paths."""
    return write_json_and_markdown(out, "guard_overhead", results, to_markdown(results))


def main(argv: list[str] | None = None) -> None:
    """Command line: ``--out DIR`` (default docs) and ``--quick``."""
    benchmark_main(__doc__.splitlines()[0], run, write, to_markdown, argv)


if __name__ == "__main__":
    main()
