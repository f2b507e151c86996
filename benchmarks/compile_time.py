"""Compile time of the first fused steps, cold (empty kernel cache) and warm (the cache the cold run filled).

Each configuration runs twice in a fresh Python process with ``XDG_CACHE_HOME`` pointing at a new
folder, so optimlab's Inductor cache (``$XDG_CACHE_HOME/optimlab/inductor/threads-N``) starts empty
the first time and holds the first run's kernels the second time. What a warm run still pays is
TorchDynamo's tracing and Inductor's cache lookups, which are per process.

    python benchmarks/compile_time.py --out docs [--quick]
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from optimlab.io import benchmark_main, write_json_and_markdown

# (algorithm registry name, flat mode): the fused paths of the performance issue's table
CONFIGS = [("adamw", True), ("adamw", False), ("sgd-momentum", True)]
QUICK_CONFIGS = [("sgd-momentum", True)]

_CHILD = """
import json, sys, time
import torch
from optimlab.optim import create_optimizer, flatten_parameters
from optimlab.optim._fused import compile_stats
name, flat = sys.argv[1], sys.argv[2] == "1"
params = [torch.randn(64, 100) for _ in range(20)]
for p in params:
    p.grad = torch.randn_like(p)
optimizer = create_optimizer(params, name, fused=True)
if flat:
    flatten_parameters(optimizer)
start = time.perf_counter()
optimizer.step()
optimizer.step()  # SGD's first step creates its momentum buffers uncompiled: the second one compiles
first = time.perf_counter() - start
start = time.perf_counter()
optimizer.step()
third = time.perf_counter() - start
compiled = sum(entry["compile_seconds"] for entry in compile_stats().values())
print(json.dumps({"first_steps_s": first, "next_step_s": third, "compile_s": compiled}))
"""


def _first_step(name: str, flat: bool, cache_home: str) -> dict[str, float]:
    env = {key: value for key, value in os.environ.items() if key != "TORCHINDUCTOR_CACHE_DIR"}
    env.update({"XDG_CACHE_HOME": cache_home, "OMP_NUM_THREADS": env.get("OMP_NUM_THREADS", "2")})
    job = subprocess.run([sys.executable, "-c", _CHILD, name, "1" if flat else "0"], env=env, capture_output=True,
                         text=True, timeout=900, check=False)
    if job.returncode != 0:
        raise RuntimeError(f"compile-time child for {name} failed: {job.stderr[-2000:]}")
    return json.loads(job.stdout.strip().splitlines()[-1])


def run(quick: bool = False) -> dict[str, Any]:
    """Cold and warm first-step and compile seconds per configuration: ``{"rows": [...], "threads": n}``."""
    rows = []
    for name, flat in QUICK_CONFIGS if quick else CONFIGS:
        with tempfile.TemporaryDirectory(prefix="optimlab-compile-") as cache_home:
            cold = _first_step(name, flat, cache_home)
            warm = _first_step(name, flat, cache_home)
        rows.append({"algorithm": name, "path": "flat fused" if flat else "fused", "cold": cold, "warm": warm})
    return {"rows": rows, "threads": os.environ.get("OMP_NUM_THREADS", "2")}


def to_markdown(results: dict[str, Any]) -> str:
    lines = [f"The first two steps with `fused=True` in a new process ({results['threads']} threads), 20 tensors: "
             "cold = empty kernel cache, warm = the cache the cold run filled (the second process still traces "
             "with Dynamo); *compile s* is the part of them spent in calls that compiled.", "",
             "| algorithm | path | cold: first steps s | cold: compile s | warm: first steps s | warm: compile s "
             "| next step ms |", "|---|---|---:|---:|---:|---:|---:|"]
    for row in results["rows"]:
        cold, warm = row["cold"], row["warm"]
        lines.append(f"| {row['algorithm']} | {row['path']} | {cold['first_steps_s']:.1f} | {cold['compile_s']:.1f} | "
                     f"{warm['first_steps_s']:.1f} | {warm['compile_s']:.1f} | {1e3 * warm['next_step_s']:.2f} |")
    return "\n".join(lines) + "\n"


def write(results: dict[str, Any], out: str | Path) -> tuple[Path, Path]:
    """Write ``compile_time.json`` and ``compile_time.md`` into ``out`` (atomically); return both paths."""
    return write_json_and_markdown(out, "compile_time", results, to_markdown(results))


def main(argv: list[str] | None = None) -> None:
    """Command line: ``--out DIR`` (default docs) and ``--quick``."""
    benchmark_main(__doc__.splitlines()[0], run, write, to_markdown, argv)


if __name__ == "__main__":
    main()
