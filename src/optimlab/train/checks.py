"""Every refusal of ``optimlab train`` that its options alone decide, in one place, checked before any write.

:func:`check_run_options` raises ``ValueError`` (``KeyError`` for an unknown optimizer name, listing the valid
ones) with one line naming the option(s) and what is accepted. The command line calls it as soon as it has the
run's configuration (with ``--resume``, once it has read the stored one), before ``--out`` is created, a
process group is joined or workers are launched; the
:class:`~optimlab.train.trainer.Trainer` calls it again (through :func:`~optimlab.train.trainer.prepare_run`),
so the library refuses the same runs with the same messages, before writing anything.

What is refused, and why (each would otherwise fail while the trainer builds the run or at its first step,
after ``--out`` was created, or silently compute something else):

* an unknown optimizer or schedule, a bad clipping spec, a schedule that cannot be built for ``steps``
  (e.g. ``onecycle`` with fewer steps than phases);
* ``fp16`` without a CUDA device, or with an optimizer stepped with a closure (torch's GradScaler refuses it);
* ``zero`` in one process; with an optimizer stepped with a closure (SAM's perturbation norm, L-BFGS's
  curvature pairs would be per shard), with a learning-rate-free one (Prodigy's and D-Adapt Adam's step size
  sums over all parameters) or with one that regroups its parameters (``muon``: ZeroRedundancyOptimizer keeps
  its own copy of the groups, matched by position);
* ``fsdp`` with ``zero``, ``ema``, ``fp16`` or ``agc`` clipping, and with an optimizer that has no sharded
  path (:func:`optimlab.optim._dtensor.sharded_refusal`; torch's ``Rprop``, whose masked in-place update
  fails on DTensors; L-BFGS);
* ``check_update`` without ``skip_nonfinite`` (the rollback is the guard's: it would be silently off);
* ``layer_decay`` (one learning rate per layer group) with a learning-rate-free optimizer (one step size for
  all groups) or with L-BFGS (one param group).
"""

from __future__ import annotations

import torch

from optimlab.clip import make_clipper
from optimlab.optim._dtensor import sharded_refusal
from optimlab.optim.lbfgs import LBFGS
from optimlab.optim.lr_free import LRFreeOptimizer
from optimlab.optim.registry import create_optimizer, get_spec, needs_closure
from optimlab.schedules import create_scheduler, list_schedules
from optimlab.train.config import TrainConfig
from optimlab.train.distributed import pick_device

__all__ = ["check_run_options", "takes_one_group"]

_NO_DTENSOR_TORCH = (torch.optim.Rprop,)
"""torch optimizers whose update fails on sharded (DTensor) parameters (Rprop's masked in-place writes)."""


def takes_one_group(optimizer_class: type) -> bool:
    """Whether ``optimizer_class`` accepts a single param group only (L-BFGS, optimlab's and torch's): the trainer
    gives it every parameter in one group. It takes no weight decay, so the decay / no-decay split would carry
    nothing; a per-group learning rate (``layer_decay``) is refused by :func:`check_run_options`."""
    return issubclass(optimizer_class, (LBFGS, torch.optim.LBFGS))


def check_run_options(config: TrainConfig, *, world_size: int = 1, device: torch.device | str | None = None) -> None:
    """Raise, with one line naming the option(s), when the trainer would refuse ``config`` (module docstring).

    Args:
        config: the run's settings (each field's own range is checked by :class:`TrainConfig` itself).
        world_size: processes of the job (``--nproc-per-node``, or ``WORLD_SIZE`` under a launcher).
        device: the device the run uses; ``None``: the one ``config.device`` picks here.
    """
    device_type = torch.device(device).type if device is not None else pick_device(config.device).type
    optimizer_class = get_spec(config.optimizer).resolve()  # KeyError naming the valid names
    closure = needs_closure(optimizer_class)
    _check_schedule(config)
    make_clipper(config.clip, [])
    if config.fsdp:
        _check_fsdp(config, optimizer_class)
    if config.precision == "fp16":
        if closure:
            raise ValueError(f"Invalid precision: 'fp16' with {config.optimizer}, which steps with a closure that "
                             "torch's GradScaler refuses; use --precision bf16 or fp32")
        if device_type != "cuda":
            raise ValueError("Invalid precision: 'fp16' needs a CUDA device (use 'bf16' on CPU)")
    if config.zero:
        _check_zero(config, optimizer_class, world_size, closure)
    if config.check_update and not config.skip_nonfinite:
        raise ValueError("Invalid check_update: --check-update rolls back through the non-finite guard, which "
                         "--no-skip-nonfinite turns off; drop one of them")
    lr_free = issubclass(optimizer_class, LRFreeOptimizer)
    if config.layer_decay is not None and (lr_free or takes_one_group(optimizer_class)):
        why = ("estimates one step size for all parameters and needs the same lr in every param group" if lr_free
               else "accepts a single param group (one lr for all parameters)")
        raise ValueError(f"Invalid layer_decay: --layer-decay {config.layer_decay:g} with --optimizer "
                         f"{config.optimizer}, which {why}; drop --layer-decay")


def _check_schedule(config: TrainConfig) -> None:
    """The schedule's name, and that it can be built for ``config.steps`` (on the optimizer's class, over one
    stand-in parameter: what the schedule reads of an optimizer is its groups' lr and momentum settings)."""
    if config.schedule == "none":
        return
    if config.schedule.lower() not in list_schedules():
        raise ValueError(f"Unknown schedule {config.schedule!r} (valid: none, {', '.join(list_schedules())})")
    stand_in = create_optimizer([torch.nn.Parameter(torch.zeros(2, 2))], config.optimizer, lr=config.lr)
    try:
        create_scheduler(config.schedule, stand_in, total_steps=config.steps)
    except ValueError as error:
        raise ValueError(f"Invalid schedule: {config.schedule!r} with steps={config.steps}: {error}") from None


def _check_fsdp(config: TrainConfig, optimizer_class: type) -> None:
    """The options and optimizers ``fsdp`` cannot be combined with, each refused by name."""
    if config.zero:
        raise ValueError("Invalid fsdp: --fsdp and --zero are mutually exclusive (FSDP2 already shards the "
                         "optimizer state, with the parameters and gradients); drop one of them")
    if config.ema is not None:
        raise ValueError("Invalid ema: --ema is not supported with --fsdp yet (the averaged copy of the weights "
                         "is not sharded); drop --ema or --fsdp")
    if config.precision == "fp16":
        raise ValueError("Invalid precision: 'fp16' is not supported with --fsdp (its GradScaler does not "
                         "agree across shards); use --precision bf16")
    if config.clip.strip().lower().startswith("agc"):
        raise ValueError(f"Invalid clip: {config.clip!r} is not supported with --fsdp (unit-wise clipping has no "
                         "sharded path yet); use norm:C, value:C, adaptive:P, autoclip:P or none")
    refusal = sharded_refusal(optimizer_class)
    if refusal is None and issubclass(optimizer_class, _NO_DTENSOR_TORCH):
        refusal = (f"torch's {optimizer_class.__name__} cannot update sharded (DTensor) parameters (its masked "
                   f"in-place update needs whole tensors); use optimlab's {optimizer_class.__name__.lower()} or "
                   "train without FSDP")
    if refusal is None and takes_one_group(optimizer_class):
        refusal = "L-BFGS treats all parameters as one flat vector and has no sharded path; train it without --fsdp"
    if refusal is not None:
        raise ValueError(f"Invalid optimizer: {config.optimizer!r} with --fsdp: {refusal}")


def _check_zero(config: TrainConfig, optimizer_class: type, world_size: int, closure: bool) -> None:
    """What ``zero`` (ZeroRedundancyOptimizer: each rank steps its own shard of the parameters) needs."""
    if world_size < 2:
        raise ValueError("Invalid zero: ZeroRedundancyOptimizer shards state across processes; "
                         "use it with --nproc-per-node >= 2 (or under torchrun)")
    if closure:
        raise ValueError(f"Invalid zero: {config.optimizer} steps with a closure, which ZeroRedundancyOptimizer "
                         "runs on each rank's shard alone (SAM's perturbation norm would be per shard); drop --zero")
    if issubclass(optimizer_class, LRFreeOptimizer):
        raise ValueError(f"Invalid zero: {config.optimizer}'s step size sums over all parameters, which "
                         "ZeroRedundancyOptimizer would compute on each rank's shard alone (each rank another "
                         "step size); drop --zero")
    groups = [{"params": [torch.nn.Parameter(torch.zeros(2, 2)), torch.nn.Parameter(torch.zeros(2))]}
              for _ in range(2)]
    if len(create_optimizer(groups, config.optimizer, lr=config.lr).param_groups) != len(groups):
        raise ValueError(f"Invalid zero: {config.optimizer} splits the param groups it is given (e.g. matrices "
                         "and vectors apart), which ZeroRedundancyOptimizer cannot keep in step with its own; drop "
                         "--zero, or use --fsdp")
