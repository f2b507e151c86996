"""Sharded-checkpoint scenarios on a small GPT with ``fully_shard`` per block and at the root (test_dcp_checkpoint.py).

``torchrun --nproc-per-node 2 dcp_worker.py ROOT OPTIMIZER[,OPTIMIZER...]``, for each optimizer in ``ROOT/<name>``:
every rank trains the same global batches (8
sequences per step, rank r the r-th half) for ``STEPS`` steps, saving a sharded checkpoint at ``SAVE_AT``; then a
fresh, differently initialised model loads it and trains the same steps again (same world size); then another one
loads ``ROOT/single/checkpoint.dcp`` (written by one unsharded process, :func:`single_process`) and continues it
(1 -> 2 ranks). Rank 0 writes ``ROOT/sharded.pt``: the losses of each continuation, the final full parameters, and
the whole model and optimizer state when saving and right after loading the single process's checkpoint.

:func:`single_process` (run in the test's own process) trains the same steps unsharded on the whole batch, saving
``ROOT/single/checkpoint.dcp`` at ``SAVE_AT``; :func:`single_from_sharded` continues the 2-rank checkpoint in one
unsharded process (2 -> 1).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist

from optimlab.optim.groups import param_groups
from optimlab.optim.registry import create_optimizer
from optimlab.train.dcp_checkpoint import load_sharded, save_sharded
from optimlab.train.distributed import end_worker
from optimlab.train.model import GPT, GPTConfig

STEPS, SAVE_AT, GLOBAL_BATCH = 6, 3, 8
CONFIG = GPTConfig(vocab_size=24, block_size=16, n_layer=2, n_head=2, n_embd=16)


def build(optimizer: str, seed: int, shard: bool) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """The model (initialised from ``seed``), sharded with ``fully_shard`` when ``shard``, and its optimizer."""
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(seed)
    model = GPT(CONFIG)
    if shard:
        for block in model.blocks:
            fully_shard(block)
        fully_shard(model)
    return model, create_optimizer(param_groups(model, 0.1, lr=3e-3), optimizer, lr=3e-3)


def batch(step: int, rank: int, world_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's share of the global batch of ``step`` (the same sequences for any world size)."""
    tokens = torch.randint(0, CONFIG.vocab_size, (GLOBAL_BATCH, CONFIG.block_size + 1),
                           generator=torch.Generator().manual_seed(1000 + step))
    share = GLOBAL_BATCH // world_size
    mine = tokens[rank * share:(rank + 1) * share]
    return mine[:, :-1], mine[:, 1:]


def train(model: torch.nn.Module, optimizer: torch.optim.Optimizer, steps: range, rank: int = 0,
          world_size: int = 1) -> list[float]:
    """The global mean loss of each step (the ranks' equal shares averaged)."""
    losses = []
    for step in steps:
        _, loss = model(*batch(step, rank, world_size))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        mean = loss.detach().clone()
        if world_size > 1:
            dist.all_reduce(mean)
            mean /= world_size
        losses.append(float(mean))
    return losses


def full_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """Model and optimizer state as whole tensors, keyed by parameter name (a collective under FSDP2)."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    def whole(value: object) -> object:  # (StateDictOptions(full_state_dict=True) fails on Muon's ns_dtype)
        if isinstance(value, dict):
            return {key: whole(item) for key, item in value.items()}
        if isinstance(value, list):
            return [whole(item) for item in value]
        if isinstance(value, torch.Tensor):  # a copy (the full tensor of a replicated DTensor is its local one)
            return (value.full_tensor() if hasattr(value, "full_tensor") else value).detach().clone()
        return value

    model_state, optimizer_state = get_state_dict(model, optimizer)
    return whole({"model": model_state, "optimizer": optimizer_state})


def full_parameters(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
            for name, p in model.named_parameters()}


def extra(step: int) -> dict:
    """What a trainer would keep beside the model: the step, a RNG state, a data position."""
    return {"step": step, "rng": torch.get_rng_state(), "position": {"epoch": 1, "batch": 7 + step}}


def single_process(root: Path, optimizer: str) -> tuple[list[float], dict]:
    """One unsharded process on the whole batch: the losses of the run, saving ROOT/single at SAVE_AT, and its
    state there."""
    model, opt = build(optimizer, 0, shard=False)
    head = train(model, opt, range(SAVE_AT))
    save_sharded(root / "single" / "checkpoint.dcp", model, opt, extra(SAVE_AT))
    saved = full_state(model, opt)
    return head + train(model, opt, range(SAVE_AT, STEPS)), saved


def single_from_sharded(root: Path, optimizer: str) -> tuple[list[float], dict, dict]:
    """One unsharded process continuing the 2-rank checkpoint: its losses, the extra state loaded, and the model
    and optimizer state right after loading."""
    model, opt = build(optimizer, 5, shard=False)
    loaded = load_sharded(root / "sharded" / "checkpoint.dcp", model, opt)
    state = full_state(model, opt)
    return train(model, opt, range(SAVE_AT, STEPS)), loaded, state


def main(root: Path, optimizers: list[str]) -> None:
    dist.init_process_group("gloo")
    for optimizer in optimizers:
        scenario(root / optimizer, optimizer)
    dist.barrier()
    end_worker(0)  # no teardown of gloo's threads (optimlab.train.distributed.shutdown says why)


def scenario(root: Path, optimizer: str) -> None:
    rank, world_size = dist.get_rank(), dist.get_world_size()
    model, opt = build(optimizer, 0, shard=True)
    losses = train(model, opt, range(SAVE_AT), rank, world_size)
    written = save_sharded(root / "sharded" / "checkpoint.dcp", model, opt, extra(SAVE_AT))
    saved = full_state(model, opt)
    losses += train(model, opt, range(SAVE_AT, STEPS), rank, world_size)
    reference = full_parameters(model)

    model, opt = build(optimizer, 1, shard=True)  # another initialisation: everything must come from the checkpoint
    loaded = load_sharded(root / "sharded" / "checkpoint.dcp", model, opt)
    resumed = train(model, opt, range(SAVE_AT, STEPS), rank, world_size)
    resumed_parameters = full_parameters(model)

    model, opt = build(optimizer, 2, shard=True)
    load_sharded(root / "single" / "checkpoint.dcp", model, opt)
    loaded_from_single = full_state(model, opt)
    from_single = train(model, opt, range(SAVE_AT, STEPS), rank, world_size)
    if rank == 0:
        torch.save({"losses": losses, "resumed": resumed, "from_single": from_single, "extra": loaded, "saved": saved,
                    "loaded_from_single": loaded_from_single,
                    "written": str(written), "parameters": reference, "resumed_parameters": resumed_parameters},
                   root / "sharded.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2].split(","))
