"""Flat mode under DistributedDataParallel (2 gloo processes): gradients averaged into the flat buffer."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


@pytest.mark.slow
def test_flat_optimizer_under_ddp_equals_the_ordinary_one(tmp_path: Path) -> None:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               str(HERE / "flat_ddp_worker.py"), str(tmp_path)]
    job = subprocess.run(command, cwd=HERE, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                         text=True, timeout=300)
    assert job.returncode == 0, f"stdout:\n{job.stdout[-2000:]}\nstderr:\n{job.stderr[-4000:]}"
    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    for rank in ranks:
        assert rank["equal"] and rank["still_flat"]
        assert rank["in_buffer"] == [True] * 6  # re-pointed after zero_grad(set_to_none=True), then kept in place
    assert ranks[0]["checksum"] == ranks[1]["checksum"]  # the averaged gradients kept the ranks in step
