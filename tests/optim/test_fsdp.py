"""optimlab's optimizers on FSDP2's sharded (DTensor) parameters: 2 gloo processes, see fsdp_worker.py.

Each configuration trains the same 3-layer MLP wrapped with ``fully_shard`` beside an unsharded copy whose
gradient is the mean of the two ranks' batch gradients. Tolerances:

* elementwise rules (any path, the fused one included) and Muon's owner-rank Newton–Schulz: **bit for bit**
  (0). So are bf16 and int8 state (eager, foreach, and bf16's native fused kernel): the rounding noise is keyed
  by each element's global index and the int8 block scales are all-reduced (MAX) over the ranks that share a
  block, so every rank stores exactly its part of what the unsharded run stores. The forward/backward of a gathered layer is the unsharded one's (same shapes, same kernels, one
  thread), FSDP2's reduce-scatter of two gradients is order-free (``a + b == b + a``) and halving is exact,
  so every rank's shard update sees the reference's numbers; Muon's owner computes on the very matrix an
  unsharded run orthogonalises, and SOAP's and Shampoo's owners run the unsharded per-tensor rule on the
  gathered parameter, gradient and state (SOAP's bases stored row-major, as gathered ones are: with LAPACK's
  column-major bases the products took other kernels and SOAP drifted by 3e-8 after a refresh, 5e-3 with a
  1-D factor, whose null space makes the eigenbasis ill-determined).
* rules with reductions over a tensor that DTensor performs across shards (Adafactor's row/column means,
  LAMB's trust-ratio norms), or over all parameters (D-Adapt Adam's two sums for d, each rank's shards summed
  and all-reduced once): **2e-7** absolute on parameters of magnitude < 1 after 4 steps (and on d), about two
  float32 ulps: the partial sums of the two shards are added in another order than one pass over the
  matrix (measured: 1.5e-8 Adafactor, 3.0e-8 LAMB, 3.0e-8 and 1.1e-9 D-Adapt Adam, whose d grows from 1e-3
  and whose parameters move by > 1e-3, checked in the worker).
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
           "lars", "adamw-bf16", "adamw-bf16-fused", "adamw-int8", "adamw-int8-foreach", "lion-int8",
           "soap", "soap-1d", "shampoo", "shampoo-blocked")
REDUCTION_ORDER = {"adafactor": 2e-7, "adafactor-fused": 2e-7, "lamb": 2e-7, "lamb-fused": 2e-7, "dadapt-adam": 2e-7,
                   "dadapt-adam-coupled": 2e-7}
REFUSED = {"prodigy": "Prodigy cannot update sharded (DTensor) parameters"}


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
    # per step: the unsharded copy's three matrices on every rank, then the sharded optimizer's matrices, each by
    # its owner, balanced by size: the largest (16x16, 256 values) to rank 0, then 16x12 (192) and 9x16 (144)
    # to rank 1, the less loaded
    first, second, third = [16, 12], [16, 16], [9, 16]
    assert ranks[0]["ns_calls"] == [first, second, third, second] * 4
    assert ranks[1]["ns_calls"] == [first, second, third, first, third] * 4


@pytest.mark.slow
def test_soap_and_shampoo_run_each_parameters_rule_once_on_its_owner(ranks: list[dict]) -> None:
    # per step: the unsharded copy's rule on the whole group, the sharded optimizer's on the DTensors, which hands
    # each parameter to its owner's unsharded rule alone: by size, the 16x16 weight to rank 0, the 16x12 and 9x16
    # ones to rank 1 (192 + 144 values), then the biases to rank 0, now the less loaded
    shapes = [[16, 12], [16], [16, 16], [16], [9, 16], [9]]
    owned = ([[[16], [16, 16], [16], [9]], [[16, 12], [9, 16]]])
    for label in ("soap", "shampoo"):
        for rank, mine in zip(ranks, owned):
            step = [["Parameter", shapes], ["DTensor", shapes]] + [["Tensor", [shape]] for shape in mine]
            assert rank["rule_calls"][label] == step * 4, (label, rank["rule_calls"][label])


@pytest.mark.slow
def test_soap_and_shampoo_state_stays_sharded_and_round_trips_through_dcp(ranks: list[dict]) -> None:
    # the 9x16 weight (rows 5/4): state shaped like it sharded like it; its factors, bases and roots on dim 0
    # (SOAP's 9x9: rows 5/4; Shampoo's 5x5 of the first block: rows 3/2); a DCP save and load of get_state_dict
    # restores every state entry in its layout and the next step bit for bit
    for rank_index, rank in enumerate(ranks):
        for label, square, size in (("soap", ["GG0", "Q0"], (9, 5, 4)),
                                    ("shampoo-blocked", ["L0_0", "P0_0"], (5, 3, 2))):
            trip = rank["round_trips"][label]
            assert trip["state"] == 0.0 and trip["params"] == 0.0, (label, trip)
            layout = trip["layout"]
            for key in square:
                assert layout[key] == ["(Shard(dim=0),)", [size[1 + rank_index], size[0]]], (key, layout)
            for key in ("exp_avg", "exp_avg_sq" if label == "soap" else "graft_sq"):
                assert layout[key] == ["(Shard(dim=0),)", [(5, 4)[rank_index], 16]], (key, layout)


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
