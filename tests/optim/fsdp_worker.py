"""One rank of the FSDP2 optimizer test (started by torchrun from test_fsdp.py).

Usage: ``torchrun --nproc-per-node 2 fsdp_worker.py OUT``. For each optimizer configuration, each rank trains
a small MLP wrapped with ``fully_shard`` per layer and at the root (its parameters become DTensors sharded
over the 2 gloo ranks, one of them unevenly: 9 rows) on its own batches, and beside it an unsharded copy with
the same optimizer whose gradient is the mean of both ranks' batch gradients (what FSDP2's reduce-scatter
computes). Writes ``OUT/rank{r}.json``: per configuration the largest deviation of the full parameters (and, for the
low-precision configurations, of the gathered stored moments: bf16 values, int8 codes and block scales) from
the unsharded copy's (or the error raised), Newton-Schulz calls per rank, the parameters SOAP's and Shampoo's
per-tensor rule ran on per rank, the deviation of a per-shard orthogonalisation from the full matrix's, and a
DCP save/load round trip of SOAP and Shampoo (``get_state_dict``).
"""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import Replicate, Shard, distribute_tensor, init_device_mesh

from optimlab.optim import muon
from optimlab.optim.shampoo import Shampoo
from optimlab.optim.soap import SOAP
from optimlab.optim.registry import create_optimizer
from optimlab.train.distributed import end_worker

STEPS = 4
CONFIGS = {
    "adamw": ("adamw", {"foreach": False, "weight_decay": 0.1}),
    "adamw-foreach": ("adamw", {"foreach": True, "weight_decay": 0.1}),
    "adamw-fused": ("adamw", {"fused": True, "weight_decay": 0.1}),
    "sgd-momentum": ("sgd-momentum", {"foreach": True}),
    "lion": ("lion", {}),
    "schedule-free-adamw": ("schedule-free-adamw", {}),
    "muon": ("muon", {"weight_decay": 0.1}),
    "muon-float32": ("muon", {"ns_dtype": torch.float32}),
    "adafactor": ("adafactor", {}),
    "lamb": ("lamb", {"foreach": True}),
    "lamb-fused": ("lamb", {"fused": True}),
    "adafactor-fused": ("adafactor", {"fused": True}),
    "lars": ("lars", {}),
    # whole-matrix rules on owner ranks: a preconditioner refresh (frequency 2, or 1 with blocks of 5 rows and
    # columns, so blocks straddle the 5/4 shard boundary) within the 4 steps; a 1-D factor (precondition_1d)
    "soap": ("soap", {"precondition_frequency": 2}),
    "soap-1d": ("soap", {"precondition_frequency": 2, "precondition_1d": True}),
    "shampoo": ("shampoo", {"precondition_frequency": 2, "start_preconditioning_step": 2}),
    "shampoo-blocked": ("shampoo", {"precondition_frequency": 1, "start_preconditioning_step": 1, "block_size": 5,
                                    "grafting": "adagrad"}),
    "prodigy": ("prodigy", {}),
    # d's sums all-reduced over the shards; lr 1 and d0 small enough that d grows and the parameters move
    "dadapt-adam": ("dadapt-adam", {"lr": 1.0, "d0": 1e-3}),
    "dadapt-adam-coupled": ("dadapt-adam", {"lr": 1.0, "d0": 1e-3, "weight_decay": 0.1}),
    # low-precision state on shards (wide model: tensors of several int8 blocks, shard boundaries inside blocks)
    "adamw-bf16": ("adamw-bf16", {"foreach": False, "weight_decay": 0.1, "wide": True}),
    "adamw-bf16-fused": ("adamw-bf16", {"fused": True, "weight_decay": 0.1, "wide": True}),
    "adamw-int8": ("adamw-int8", {"weight_decay": 0.1, "wide": True}),
    "adamw-int8-foreach": ("adamw-int8", {"foreach": True, "wide": True}),
    "lion-int8": ("lion", {"state_dtype": "int8", "wide": True}),
}


def model(wide: bool = False) -> torch.nn.Module:
    """The 3-layer MLP; ``wide``: 40 and 30 hidden units, so that the weights (480, 1200 and 270 values) span
    several int8 blocks of 256 and their 2-rank shards start inside a block (offsets 240, 600, 150)."""
    torch.manual_seed(0)
    hidden = (40, 30) if wide else (16, 16)
    return torch.nn.Sequential(torch.nn.Linear(12, hidden[0]), torch.nn.Tanh(), torch.nn.Linear(*hidden),
                               torch.nn.Tanh(), torch.nn.Linear(hidden[1], 9))


def deviation(name: str, options: dict, rank: int) -> float:
    options = dict(options)
    wide, lr = options.pop("wide", False), options.pop("lr", 0.01)
    reference, sharded = model(wide), shard(model(wide))
    optimizers = [create_optimizer(net, name, lr=lr, **options) for net in (reference, sharded)]
    initial = [param.detach().clone() for param in reference.parameters()]
    generator = torch.Generator().manual_seed(7)  # the same batches on every rank; each rank trains on its own
    for _ in range(STEPS):
        batches = [(torch.randn(6, 12, generator=generator), torch.randn(6, 9, generator=generator)) for _ in (0, 1)]
        torch.nn.functional.mse_loss(sharded(batches[rank][0]), batches[rank][1]).backward()
        per_batch = []
        for inputs, targets in batches:
            reference.zero_grad()
            torch.nn.functional.mse_loss(reference(inputs), targets).backward()
            per_batch.append([p.grad.clone() for p in reference.parameters()])
        for param, first, second in zip(reference.parameters(), *per_batch):
            param.grad = (first + second) / 2
        for optimizer in optimizers:
            optimizer.step()
            optimizer.zero_grad()
    with torch.no_grad():
        worst = max(float((a - b.full_tensor()).abs().max()) for a, b in zip(reference.parameters(), sharded.parameters()))
        if hasattr(optimizers[0], "d"):  # learning-rate free: the estimates agree, and it grew (the parameters moved)
            worst = max(worst, abs(optimizers[0].d - optimizers[1].d))
            assert optimizers[0].d > options.get("d0", 1e-6), optimizers[0].d
            assert max(float((a - b).abs().max()) for a, b in zip(reference.parameters(), initial)) > 1e-3
        if wide:  # low-precision state: the gathered stored moments (bf16 values, int8 codes, block scales) too
            for a, b in zip(reference.parameters(), sharded.parameters()):
                whole, shards = optimizers[0].state[a], optimizers[1].state[b]
                assert whole.keys() == shards.keys(), (whole.keys(), shards.keys())
                for key, stored in whole.items():
                    gathered = shards[key].full_tensor() if hasattr(shards[key], "full_tensor") else shards[key]
                    assert gathered.dtype == stored.dtype and gathered.shape == stored.shape, key
                    worst = max(worst, float((gathered.double() - stored.double()).abs().max()))
        return worst


def shard(net: torch.nn.Module) -> torch.nn.Module:
    for layer in net:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer)
    fully_shard(net)
    return net


def train(net: torch.nn.Module, optimizer: torch.optim.Optimizer, steps: int, seed: int, rank: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        batches = [(torch.randn(6, 12, generator=generator), torch.randn(6, 9, generator=generator)) for _ in (0, 1)]
        torch.nn.functional.mse_loss(net(batches[rank][0]), batches[rank][1]).backward()
        optimizer.step()
        optimizer.zero_grad()


def round_trip(name: str, options: dict, folder: Path, rank: int) -> dict:
    """Train a sharded model 3 steps, save ``get_state_dict`` with DCP, load it into a fresh sharded model and
    optimizer (``set_state_dict``), take one more step with both: the largest deviation of the loaded state
    and of the parameters after that step (full tensors), and the layout of the 9x16 weight's state (uneven)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    nets = [shard(model()), shard(model())]
    optimizers = [create_optimizer(net, name, lr=0.01, **options) for net in nets]
    train(nets[0], optimizers[0], 3, 11, rank)
    model_state, optimizer_state = get_state_dict(nets[0], optimizers[0])
    dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=str(folder))
    model_state, optimizer_state = get_state_dict(nets[1], optimizers[1])  # a state template (one lr=0 step)
    loaded = {"model": model_state, "optimizer": optimizer_state}
    dcp.load(loaded, checkpoint_id=str(folder))
    set_state_dict(nets[1], optimizers[1], model_state_dict=loaded["model"], optim_state_dict=loaded["optimizer"])
    worst = 0.0
    with torch.no_grad():
        for a, b in zip(nets[0].parameters(), nets[1].parameters()):
            first, second = optimizers[0].state[a], optimizers[1].state[b]
            assert first.keys() == second.keys(), (first.keys(), second.keys())
            for key, value in first.items():
                other = second[key]
                if hasattr(value, "full_tensor"):
                    assert value.placements == other.placements, key
                    value, other = value.full_tensor(), other.full_tensor()
                worst = max(worst, float((value.double() - other.double()).abs().max()))
    loaded_state = worst
    for net, optimizer in zip(nets, optimizers):
        train(net, optimizer, 1, 12, rank)
    with torch.no_grad():
        worst = max(float((a.full_tensor() - b.full_tensor()).abs().max())
                    for a, b in zip(nets[0].parameters(), nets[1].parameters()))
    last = list(nets[1].parameters())[4]
    layout = {key: [str(value.placements), list(value.to_local().shape)]
              for key, value in optimizers[1].state[last].items() if hasattr(value, "placements")}
    return {"state": loaded_state, "params": worst, "layout": layout}


def per_shard_deviation() -> float:
    """How far the local shard of NS(full matrix) is from NS(local shard): what a per-shard Muon would do."""
    matrix = torch.randn(16, 16, generator=torch.Generator().manual_seed(3))
    shard = distribute_tensor(matrix, init_device_mesh("cpu", (2,)), [Shard(0)]).to_local()
    whole = muon.newton_schulz_orthogonalize(matrix, dtype=torch.float32)
    return float((whole[:8] if dist.get_rank() == 0 else whole[8:]).sub(
        muon.newton_schulz_orthogonalize(shard, dtype=torch.float32)).abs().max())


def owner_compute_layouts() -> dict:
    """owner_compute on one 7x10 matrix in each layout (rows 4/3, columns 5/5, replicated): whether each rank's
    result equals its shard of the function of the whole matrix, and the shapes it computed on."""
    from optimlab.optim._dtensor import owner_compute

    mesh = init_device_mesh("cpu", (2,))
    matrix = torch.randn(7, 10, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    layouts = [distribute_tensor(matrix, mesh, [placement]) for placement in (Shard(0), Shard(1), Replicate())]
    computed = []

    def whole_matrix_function(full: torch.Tensor) -> torch.Tensor:
        computed.append(list(full.shape))
        return full.flip(0) * full.sum(1, keepdim=True)

    results = owner_compute([layout.to_local() for layout in layouts], layouts, whole_matrix_function, torch.float64)
    expected = matrix.flip(0) * matrix.sum(1, keepdim=True)
    equal = [torch.equal(result, distribute_tensor(expected, mesh, layout.placements).to_local())
             for result, layout in zip(results, layouts)]
    return {"equal": equal, "computed": computed}


def unsupported_layout_error() -> str:
    """Low-precision state on a column-sharded (Shard(1)) parameter: its shard is not one range of the flattened
    tensor, so the global noise index and int8 blocks are undefined; the step must refuse by name."""
    from optimlab.optim import AdamW

    mesh = init_device_mesh("cpu", (2,))
    param = torch.nn.Parameter(distribute_tensor(torch.randn(4, 6), mesh, [Shard(1)]))
    param.grad = distribute_tensor(torch.ones(4, 6), mesh, [Shard(1)])
    try:
        AdamW([param], state_dtype="int8").step()
    except NotImplementedError as error:
        return str(error)
    return "no error"


def main(out: Path) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    calls = []
    orthogonalize = muon.newton_schulz_orthogonalize
    rule_calls: dict[str, list] = {"soap": [], "shampoo": []}
    rules = {label: cls._update_group for label, cls in (("soap", SOAP), ("shampoo", Shampoo))}

    def counting(label: str):
        def update(self, group, params, grads, states):  # the parameters each call of the rule gets, as shapes
            rule_calls[label].append([type(params[0]).__name__, [list(p.shape) for p in params]])
            return rules[label](self, group, params, grads, states)
        return update

    def counted(*args, **kwargs):
        calls.append(tuple(args[0].shape))
        return orthogonalize(*args, **kwargs)

    results = {}
    for label, (name, options) in CONFIGS.items():
        muon.newton_schulz_orthogonalize = counted if label == "muon" else orthogonalize
        for rule, cls in (("soap", SOAP), ("shampoo", Shampoo)):
            cls._update_group = counting(rule) if label == rule else rules[rule]
        try:
            results[label] = deviation(name, options, rank)
        except NotImplementedError as error:
            results[label] = f"error: {error}"
    muon.newton_schulz_orthogonalize = orthogonalize
    for rule, cls in (("soap", SOAP), ("shampoo", Shampoo)):
        cls._update_group = rules[rule]
    trips = {label: round_trip(*CONFIGS[label], out / f"dcp-{label}", rank) for label in ("soap", "shampoo-blocked")}
    # every call of the "muon" configuration: the unsharded copy's 3 matrices a step, plus the sharded one's owned
    (out / f"rank{rank}.json").write_text(json.dumps({"results": results, "ns_calls": calls,
                                                      "rule_calls": rule_calls, "round_trips": trips,
                                                      "per_shard": per_shard_deviation(),
                                                      "layouts": owner_compute_layouts(),
                                                      "unsupported_layout": unsupported_layout_error()}))
    dist.barrier()
    end_worker(0)  # no teardown of gloo's threads (optimlab.train.distributed.shutdown says why)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
