"""optimlab's optimizers on FSDP2's sharded (DTensor) parameters: 2 gloo processes, see fsdp_worker.py.

Each configuration trains the same 3-layer MLP wrapped with ``fully_shard`` beside an unsharded copy whose
gradient is the mean of the two ranks' batch gradients. Tolerances:

* elementwise rules (any path, the fused one included) and Muon's owner-rank Newton–Schulz: **bit for bit**
  (0). So are bf16 and int8 state (eager, foreach, and bf16's native fused kernel): the rounding noise is keyed
  by each element's global index and the int8 block scales are all-reduced (MAX) over the ranks that share a
  block, so every rank stores exactly its part of what the unsharded run stores. The forward/backward of a gathered layer is the unsharded one's (same shapes, same kernels, one
  thread), FSDP2's reduce-scatter of two gradients is order-free (``a + b == b + a``) and halving is exact,
  so every rank's shard update sees the reference's numbers; Muon's owner computes on the very matrix an
  unsharded run orthogonalises.
* rules with reductions over a tensor that DTensor performs across shards (Adafactor's row/column means,
  LAMB's trust-ratio norms): **2e-7** absolute on parameters of magnitude < 1 after 4 steps, about two
  float32 ulps: the partial sums of the two shards are added in another order than one pass over the
  matrix (measured: 1.5e-8 Adafactor, 3.0e-8 LAMB).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
BITWISE = ("adamw", "adamw-foreach", "adamw-fused", "sgd-momentum", "lion", "schedule-free-adamw", "muon", "muon-float32",
           "lars", "adamw-bf16", "adamw-bf16-fused", "adamw-int8", "adamw-int8-foreach", "lion-int8")
REDUCTION_ORDER = {"adafactor": 2e-7, "adafactor-fused": 2e-7, "lamb": 2e-7, "lamb-fused": 2e-7}
REFUSED = {"soap": "SOAP cannot update sharded (DTensor) parameters",
           "prodigy": "Prodigy cannot update sharded (DTensor) parameters",
           "dadapt-adam": "DAdaptAdam cannot update sharded (DTensor) parameters"}


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    out = tmp_path_factory.mktemp("fsdp")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               str(HERE / "fsdp_worker.py"), str(out)]
    job = subprocess.run(command, cwd=HERE, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                         text=True, timeout=300)
    assert job.returncode == 0, job.stderr[-4000:]
    return [json.loads((out / f"rank{rank}.json").read_text()) for rank in (0, 1)]


@pytest.mark.slow
def test_sharded_parameters_equal_the_unsharded_run(ranks: list[dict]) -> None:
    for rank in ranks:
        results = rank["results"]
        assert set(results) == {*BITWISE, *REDUCTION_ORDER, *REFUSED}
        for label in BITWISE:
            assert results[label] == 0.0, (label, results[label])
        for label, tolerance in REDUCTION_ORDER.items():
            assert isinstance(results[label], float) and results[label] <= tolerance, (label, results[label])


@pytest.mark.slow
def test_optimizers_without_a_sharded_path_are_refused_by_name(ranks: list[dict]) -> None:
    for rank in ranks:
        for label, message in REFUSED.items():
            assert rank["results"][label].startswith(f"error: {message}"), rank["results"][label]


@pytest.mark.slow
def test_each_matrix_is_orthogonalised_once_by_its_owner_rank(ranks: list[dict]) -> None:
    # per step: the unsharded copy's three matrices on every rank, then the sharded optimizer's matrices owned
    # round-robin (matrix i by rank i mod 2): rank 0 the first and third, rank 1 the second
    first, second, third = [16, 12], [16, 16], [9, 16]
    assert ranks[0]["ns_calls"] == [first, second, third, first, third] * 4
    assert ranks[1]["ns_calls"] == [first, second, third, second] * 4


@pytest.mark.slow
def test_a_per_shard_orthogonalisation_would_differ(ranks: list[dict]) -> None:
    # the orthogonal factor of an 8x16 half is not the half of the 16x16 matrix's: O(1) apart, not rounding
    for rank in ranks:
        assert rank["per_shard"] > 0.1


@pytest.mark.slow
def test_owner_compute_takes_every_layout(ranks: list[dict]) -> None:
    # a 7x10 matrix sharded by rows (4/3), by columns (5/5) and replicated: matrices 0 and 2 owned by rank 0,
    # matrix 1 by rank 1; each rank's result is exactly its shard of the function of the whole matrix
    assert [rank["layouts"]["computed"] for rank in ranks] == [[[7, 10], [7, 10]], [[7, 10]]]
    for rank in ranks:
        assert rank["layouts"]["equal"] == [True, True, True]


@pytest.mark.slow
def test_low_precision_state_refuses_a_layout_without_global_indices(ranks: list[dict]) -> None:
    for rank in ranks:
        assert rank["unsupported_layout"].startswith("low-precision optimizer state on a DTensor laid out as "
                                                     "(Shard(dim=1),) on a 1-D mesh: only Shard(0)"), rank
