"""Helpers of the trainer tests: a tiny run configuration and a CLI runner."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from typer.testing import CliRunner, Result

from optimlab.cli import app
from optimlab.train.config import TrainConfig

REPO = Path(__file__).resolve().parents[2]


def tiny_config(out_dir: Path, data: Path, **overrides: Any) -> TrainConfig:
    """A run small enough for a test: 2 blocks of width 16, context 16, 12 steps, no TensorBoard or sample."""
    settings: dict[str, Any] = dict(out_dir=str(out_dir), data=str(data), block_size=16, n_layer=2, n_head=2,
                                    n_embd=16, batch_size=4, steps=12, lr=3e-3, log_every=3, eval_every=6,
                                    eval_batches=2, checkpoint_every=6, monitor_every=2, sample_chars=0,
                                    tensorboard=False, device="cpu", optimizer="adamw")
    settings.update(overrides)
    return TrainConfig(**settings)


def run_cli(*args: str, timeout: float = 120, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """``python -m optimlab <args>`` in a subprocess (one thread per process), capturing its output."""
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "optimlab", *args], cwd=REPO, env=full_env, capture_output=True,
                          text=True, timeout=timeout)


def run_two_ranks(worker: Path, *args: str, timeout: float = 400) -> subprocess.CompletedProcess:
    """``worker`` run by torchrun as 2 gloo processes (one thread each), from ``worker``'s folder; fails the
    test, with the end of the job's output, unless every rank ended cleanly."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(worker),
               *args]
    job = subprocess.run(command, cwd=worker.parent, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                         text=True, timeout=timeout)
    assert job.returncode == 0, job.stdout[-2000:] + job.stderr[-4000:]
    return job


def invoke(*args: str) -> Result:
    """``optimlab <args>`` in this process (typer's CliRunner), output captured; stderr kept apart."""
    return CliRunner().invoke(app, list(args))


DDP_STEPS = 26
"""Planned steps of the data-parallel scenarios (the schedule spans these)."""
DDP_STOP = 20
"""Where the data-parallel scenarios stop and checkpoint, to be resumed elsewhere."""

FSDP_OPTIMIZERS = ("adamw", "sgd-momentum", "lion", "muon", "adafactor", "lamb", "adamw-int8")
"""The optimizers of the FSDP2-vs-one-process test (issue 16's test 1)."""
FSDP_STEPS = 6
"""Steps of the FSDP2 scenarios."""
FSDP_STOP = 3
"""Where the FSDP2 resume scenario stops and checkpoints."""
