"""One rank of the trainer-under-FSDP2 test job (started by torchrun from test_fsdp_train.py).

Usage: ``torchrun --nproc-per-node 2 fsdp_worker.py ROOT DATA``. Joins one gloo group, then

* trains the tiny GPT with ``fsdp=True`` (per-rank batch 4, sharded checkpoints at steps 3 and 6) for each
  optimizer of ``FSDP_OPTIMIZERS``, in ``ROOT/<name>``;
* trains ``adamw`` with 2 micro-batches per step (``ROOT/adamw-accum2``);
* trains ``adamw`` and ``adafactor`` again, stopped at step ``FSDP_STOP`` and resumed (``ROOT/<name>-resumed``);
* resumes the one-process run ``ROOT/single-adamw``'s single-file checkpoint of step 3 (written by the test)
  under FSDP2 (``ROOT/adamw-from-single``);
* trains one step on ``ROOT/small.txt``, whose 9 validation windows split 5/4 over the ranks
  (``ROOT/small-eval``);
* checks clipping, the non-finite guard and the optimizer-state monitor on a sharded 2-layer MLP against an
  unsharded copy (:func:`agreement`), and writes ``ROOT/agreement-rank<r>.json``.
"""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import distribute_tensor

from train_helpers import FSDP_OPTIMIZERS, FSDP_STEPS, FSDP_STOP, tiny_config

from optimlab.clip import NormClipper, ValueClipper
from optimlab.guard import NonFiniteGuard
from optimlab.monitor import OptimizerMonitor
from optimlab.optim.registry import create_optimizer
from optimlab.train.distributed import end_worker, init_distributed, shutdown
from optimlab.train.trainer import Trainer


class Records:
    """A monitor sink keeping the records."""

    def __init__(self) -> None:
        self.records: list[dict] = []

    def write(self, step: int, record: dict) -> None:
        self.records.append(record)


def mlp() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 9), torch.nn.Tanh(), torch.nn.Linear(9, 5))


def set_grads(reference: torch.nn.Module, sharded: torch.nn.Module, grads: list[torch.Tensor]) -> None:
    """The same whole gradients on the unsharded copy and, as each rank's shard, on the sharded model."""
    for ref, param, grad in zip(reference.parameters(), sharded.parameters(), grads):
        ref.grad = grad.clone()
        param.grad = distribute_tensor(grad, param.device_mesh, param.placements, src_data_rank=None)


def agreement(rank: int) -> dict:
    """Clipping, the guard (skip and roll-back) and the monitor on sharded gradients vs the unsharded copy."""
    reference, sharded = mlp(), mlp()
    for layer in sharded:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer)
    fully_shard(sharded)
    generator = torch.Generator().manual_seed(1)
    grads = [torch.randn(p.shape, generator=generator) * 3 for p in reference.parameters()]
    out: dict = {}
    # clipping by global norm: the same total norm on every rank, the whole gradients clipped as the reference's
    set_grads(reference, sharded, grads)
    results = [NormClipper(model.parameters(), 1.0).step() for model in (reference, sharded)]
    out["norm"] = [results[0].norm, results[1].norm]
    out["clipped_grad_deviation"] = max(float((r.grad - p.grad.full_tensor()).abs().max())
                                        for r, p in zip(reference.parameters(), sharded.parameters()))
    set_grads(reference, sharded, grads)
    results = [ValueClipper(model.parameters(), 0.5).step() for model in (reference, sharded)]
    out["value_clip"] = [[r.norm, r.clipped] for r in results]
    # the monitor on one AdamW step: every figure of the record, sharded vs unsharded
    sinks = [Records(), Records()]
    optimizers = [create_optimizer(model, "adamw", lr=0.1) for model in (reference, sharded)]
    monitors = [OptimizerMonitor(opt, sinks=[sink]) for opt, sink in zip(optimizers, sinks)]
    set_grads(reference, sharded, grads)
    for optimizer in optimizers:
        optimizer.step()
    for monitor in monitors:
        monitor.remove()
    out["monitor"] = [sinks[0].records[0], sinks[1].records[0]]
    # the guard: an inf in rank 1's shard only (the last row of the first matrix) skips the step on every rank
    before = [p.full_tensor().clone() for p in sharded.parameters()]
    bad = [g.clone() for g in grads]
    bad[0][-1, 0] = float("inf")
    set_grads(reference, sharded, bad)
    guard = NonFiniteGuard(optimizers[1], log=False)
    guard.step()
    out["skipped"] = guard.last_step_skipped
    out["unchanged_after_skip"] = all(torch.equal(b, p.full_tensor()) for b, p in zip(before, sharded.parameters()))
    # check_update: a finite gradient that overflows in rank 1's shard only is rolled back on every rank
    sgd = create_optimizer(sharded, "sgd", lr=10.0)
    huge = [g.clone() for g in grads]
    huge[0][-1, 0] = 3e38
    set_grads(reference, sharded, huge)
    guard = NonFiniteGuard(sgd, log=False, check_update=True)
    guard.step()
    out["rolled_back"] = guard.last_step_skipped
    out["unchanged_after_rollback"] = all(torch.equal(b, p.full_tensor())
                                          for b, p in zip(before, sharded.parameters()))
    return out


def main(root: Path, data: Path) -> None:
    context = init_distributed("cpu", timeout_s=120)
    try:
        for name in FSDP_OPTIMIZERS:
            config = tiny_config(root / name, data, batch_size=4, steps=FSDP_STEPS, fsdp=True, optimizer=name,
                                 checkpoint_every=FSDP_STOP)
            trainer = Trainer(config, context, quiet=True)
            result = trainer.train()
            trainer.close()
            if context.is_main:
                (root / name / "losses.json").write_text(json.dumps(result.losses))
        trainer = Trainer(tiny_config(root / "adamw-accum2", data, batch_size=4, accum=2, steps=FSDP_STOP, fsdp=True),
                          context, quiet=True)
        (root / "adamw-accum2" / "losses.json").write_text(json.dumps(trainer.train().losses))
        trainer.close()
        for name in ("adamw", "adafactor"):
            config = tiny_config(root / f"{name}-resumed", data, batch_size=4, steps=FSDP_STEPS, fsdp=True,
                                 optimizer=name)
            for resume, stop_at in ((False, FSDP_STOP), (True, None)):
                trainer = Trainer(config, context, quiet=True, resume=resume)
                trainer.train(stop_at=stop_at)
                trainer.close()
                dist.barrier()  # rank 0 has written the checkpoint that the other ranks resume from
        config = tiny_config(root / "adamw-from-single", data, batch_size=4, steps=FSDP_STEPS, fsdp=True)
        trainer = Trainer(config, context, quiet=True, resume_from=root / "single-adamw" / f"checkpoint.step{FSDP_STOP}.pt")
        trainer.train()
        trainer.close()
        trainer = Trainer(tiny_config(root / "small-eval", root / "small.txt", batch_size=4, steps=1, fsdp=True),
                          context, quiet=True)
        trainer.train()
        trainer.close()
        (root / f"agreement-rank{context.rank}.json").write_text(json.dumps(agreement(context.rank)))
    finally:
        shutdown(context, process_ends=True)


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
    end_worker(0)
