"""Shared helpers for the bench tests: small configurations and running the CLI in a subprocess."""

import os
import subprocess
import sys
from pathlib import Path

from optimlab.bench.runner import BenchConfig


def tiny_config(**overrides) -> BenchConfig:
    """A bench that takes a second or two: the quadratic, two optimizers, a few short trials."""
    values = dict(tasks=("quadratic",), optimizers=("sgd-momentum", "adam"), trials=3, seeds=2, steps=40)
    values.update(overrides)
    return BenchConfig(**values)


def cli_command(*args: str) -> list[str]:
    """The ``optimlab`` command line as a subprocess argument list."""
    return [sys.executable, "-m", "optimlab", *args]


def cli_env() -> dict[str, str]:
    """The environment for CLI subprocesses: one thread, this checkout's sources first."""
    src = str(Path(__file__).resolve().parents[2] / "src")
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": src, "MPLBACKEND": "Agg"}


def run_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run ``optimlab ARGS`` to completion and return the finished process (text output)."""
    return subprocess.run(cli_command(*args), env=cli_env(), capture_output=True, text=True, timeout=timeout)


def trial_keys(store, run_id):
    """Every stored trial of a run as (task, optimizer, schedule, clip, phase, index) → (params, final_metric)."""
    return {(t["task"], t["optimizer"], t["schedule"], t["clip"], t["phase"], t["trial_index"]):
            (t["params"], t["final_metric"]) for t in store.trials(run_id)}
