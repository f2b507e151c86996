"""The default path (no ``foreach``/``fused`` argument) against torch.optim's CPU default, its for-loop, at one thread.

The step-throughput benchmark compares them with the machine's threads; on a machine shared by more
processes than cores, those ratios are dominated by scheduling (each multi-threaded operation waits at an
OpenMP barrier for a thread that may be off its core for a time slice), whatever the work. With one thread
there are no barriers, so the ratio measures the work each path does. Same parameters (GPT-2 small's 148
shapes, float32), AdamW, Adam and SGD-momentum, interleaved rounds of one step each, every ratio the median
of the rounds' paired ratios with their range (``step_throughput.measure`` and ``paired_ratio``).

    python benchmarks/default_path.py --out docs [--quick]
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from optimlab.io import benchmark_main, write_json_and_markdown

ALGORITHMS = ("adamw", "adam", "sgd-momentum")
LABELS = ("optimlab default", "torch for-loop")


def _step_throughput() -> ModuleType:
    name = "optimlab_benchmarks_step_throughput"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().parent / "step_throughput.py")
        assert spec is not None and spec.loader is not None
        sys.modules[name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules[name])
    return sys.modules[name]


def run(quick: bool = False, rounds: int | None = None) -> dict[str, Any]:
    """Measure at one thread; ``quick``: 20 small tensors and two rounds (checks the bookkeeping only)."""
    st = _step_throughput()
    shapes = [(40, 25)] * 20 if quick else st.gpt2_small_shapes()
    rounds = rounds or (2 if quick else 7)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    entries = []
    try:
        table = st.algorithms(include_compiled=False)
        for name in ALGORITHMS:
            algorithm = st.Algorithm(name, [impl for impl in table[name].impls if impl.label in LABELS])
            rows = {row["impl"]: row for row in st.measure(algorithm, 1, 1, torch.float32, rounds=rounds, steps=1,
                                                           bandwidth=1.0, shapes=shapes)}
            ours, theirs = rows["optimlab default"], rows["torch for-loop"]
            ratio, low, high = st.paired_ratio(theirs, ours)
            entries.append({"algorithm": name, "optimlab_ms": ours["ms_per_step"], "torch_ms": theirs["ms_per_step"],
                            "ratio": ratio, "range": [low, high], "load": ours["load"]})
    finally:
        torch.set_num_threads(threads)
    return {"shapes": "tiny (20 tensors of 1,000 values)" if quick else "gpt2-small (148 tensors, 124M params)", "rounds": rounds,
            "cores": os.cpu_count(), "torch": torch.__version__, "rows": entries}


def to_markdown(results: dict[str, Any]) -> str:
    """One row per algorithm: both medians, the paired ratio with its range and the verdict (>= 1.0)."""
    st = _step_throughput()
    loads = [value for row in results["rows"] for value in row["load"]]
    lines = [f"{results['shapes']}, float32, 1 thread, {results['rounds']} interleaved rounds of one step, torch "
             f"{results['torch']}; load average {min(loads):.1f}-{max(loads):.1f} on {results['cores']} cores.", "",
             "| algorithm | optimlab default ms | torch for-loop ms | torch / optimlab (range) | met (>= 1.0) |",
             "|---|---:|---:|---:|---|"]
    for row in results["rows"]:
        lines.append(f"| {row['algorithm']} | {row['optimlab_ms']:.1f} | {row['torch_ms']:.1f} | "
                     f"{st._ratio_cell(row['ratio'], *row['range'], suffix='x')} | "
                     f"{'yes' if row['ratio'] >= 1.0 else '**no**'} |")
    return "\n".join(lines) + "\n"


def write(results: dict[str, Any], out: str | Path) -> tuple[Path, Path]:
    """Write ``default_path.json`` and ``default_path.md`` into ``out``; return both paths."""
    return write_json_and_markdown(out, "default_path", results, to_markdown(results))


def main(argv: list[str] | None = None) -> None:
    """Command line: ``--out DIR`` (default docs) and ``--quick``."""
    benchmark_main(__doc__.splitlines()[0], run, write, to_markdown, argv)


if __name__ == "__main__":
    main()
