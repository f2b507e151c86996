"""``OptimizerMonitor``: per-step optimizer diagnostics through the optimizer's step hooks."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from optimlab.monitor.metrics import (
    combine_norms,
    effective_lr_summary,
    per_tensor_norms,
    state_tensor_norms,
    to_floats,
)
from optimlab.monitor.sinks import Sink
from optimlab.optim._dtensor import local
from optimlab.optim.state import state_bytes

__all__ = ["OptimizerMonitor"]


class OptimizerMonitor:
    r"""Record what an optimizer does, every ``every`` steps, without touching the training loop.

    Attaches a step pre-hook and a step post-hook to ``optimizer`` (any ``torch.optim.Optimizer``:
    torch's and optimlab's). On optimizer steps :math:`t = k \cdot \text{every}` (counting from 1) it
    snapshots the parameters and the gradient norms before the step and, after it, records per param
    group ``g``:

    * ``grad_norm/group{g}``, ``param_norm/group{g}`` (after the step), ``update_norm/group{g}``
      (:math:`\lVert\theta^+ - \theta^-\rVert_2`), ``update_ratio/group{g}`` (update norm / param norm),
      ``lr/group{g}``;
    * ``{key}_norm/group{g}`` for every floating state tensor (``exp_avg``, ``exp_avg_sq``,
      ``momentum_buffer``, ``square_avg``, ...);
    * ``eff_lr_mean/group{g}``, ``eff_lr_min/group{g}``, ``eff_lr_max/group{g}`` for Adam-family groups:
      :math:`\eta/(\sqrt{\hat v}+\epsilon)` over all coordinates;

    plus ``grad_norm/total``, ``update_norm/total`` and ``state_bytes`` (:func:`optimlab.optim.state_bytes`),
    and with ``per_parameter=True`` the grad/param/update norms and ratio of each parameter, named by
    ``param_names`` (``model.named_parameters()``) or ``group{g}.param{i}``. Every record goes to each
    sink's ``write(step, record)``; :meth:`summary` returns the latest one as a flat dict.

    Gradient norms are taken in the pre-hook, i.e. the gradients as the step receives them (after
    clipping); for closure-driven optimizers (L-BFGS) that is the previous closure's gradient. A
    monitored step costs a copy of the parameters (kept in reusable buffers between records) and a few
    multi-tensor passes; the overhead is measured by ``benchmarks/monitor_overhead.py``.

    Sharded parameters (DTensors, e.g. under FSDP2's ``fully_shard``): the monitor works on each rank's shards
    and all-reduces the norms, sums and extremes, so every rank records the figures of the whole tensors (the
    unsharded optimizer's, up to float rounding). Attach a monitor on every rank then (the reductions are
    collectives), with sinks on one rank only; ``state_bytes`` counts the state of all ranks.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, every: int = 1, sinks: Sequence[Sink] | None = None,
                 per_parameter: bool = False, param_names: Iterable[tuple[str, Tensor]] | None = None) -> None:
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if not isinstance(every, int) or isinstance(every, bool) or every < 1:
            raise ValueError(f"Invalid every: {every!r} (accepted range: an int >= 1)")
        sinks = list(sinks or [])
        for sink in sinks:
            if not callable(getattr(sink, "write", None)):
                raise TypeError(f"each sink needs a write(step, record) method; got {type(sink).__name__}")
        self.optimizer = optimizer
        self.every = every
        self.sinks = sinks
        self.per_parameter = per_parameter
        self._names = {id(param): name for name, param in (param_names or [])}
        self.step = 0
        self.latest: dict[str, float] = {}
        self.latest_step = 0
        self._before: list[list[Tensor]] = []
        self._grad_norms: list[tuple[list[int], list[Tensor]]] | None = None
        self._handles = [optimizer.register_step_pre_hook(self._before_step),
                         optimizer.register_step_post_hook(self._after_step)]

    def _param_name(self, group_index: int, param_index: int, param: Tensor) -> str:
        return self._names.get(id(param), f"group{group_index}.param{param_index}")

    @torch.no_grad()
    def _before_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if (self.step + 1) % self.every != 0:
            self._grad_norms = None
            return
        groups = optimizer.param_groups
        shards = [[local(p.detach()) for p in group["params"]] for group in groups]  # a DTensor's local shard
        shapes_changed = len(self._before) != len(groups) or any(
            len(buffers) != len(params) or any(b.shape != p.shape or b.dtype != p.dtype or b.device != p.device
                                               for b, p in zip(buffers, params))
            for buffers, params in zip(self._before, shards))
        if shapes_changed:
            self._before = [[torch.empty_like(p, memory_format=torch.preserve_format) for p in params]
                            for params in shards]
        self._grad_norms = []
        for buffers, group, params in zip(self._before, groups, shards):
            if params:
                torch._foreach_copy_(buffers, params)
            with_grad = [i for i, p in enumerate(group["params"]) if p.grad is not None]
            grads = [group["params"][i].grad for i in with_grad]
            grads = [g.coalesce().values() if g.is_sparse else g for g in grads]
            self._grad_norms.append((with_grad, per_tensor_norms(grads)))

    @torch.no_grad()
    def _after_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        self.step += 1
        if self._grad_norms is None:
            return
        record: dict[str, float] = {}
        grad_total, update_total = [], []
        for g, (group, buffers, (with_grad, grad_norm_tensors)) in enumerate(
                zip(optimizer.param_groups, self._before, self._grad_norms)):
            params = [p.detach() for p in group["params"]]
            states = [optimizer.state.get(p, {}) for p in group["params"]]
            if params:
                torch._foreach_sub_(buffers, [local(p) for p in params])  # buffers: theta_before - theta_after
            param_norms = to_floats(per_tensor_norms(params))
            update_norms = to_floats(per_tensor_norms(buffers, like=params))
            grad_norms = to_floats(grad_norm_tensors)
            grad_total += grad_norms
            update_total += update_norms
            group_param_norm = combine_norms(param_norms)
            group_update_norm = combine_norms(update_norms)
            record[f"lr/group{g}"] = float(group["lr"]) if "lr" in group else float("nan")
            record[f"grad_norm/group{g}"] = combine_norms(grad_norms)
            record[f"param_norm/group{g}"] = group_param_norm
            record[f"update_norm/group{g}"] = group_update_norm
            record[f"update_ratio/group{g}"] = group_update_norm / group_param_norm if group_param_norm else 0.0
            for key, norms in state_tensor_norms(params, states).items():
                record[f"{key}_norm/group{g}"] = combine_norms(to_floats(norms))
            effective = effective_lr_summary(group, params, states)
            if effective is not None:
                mean, smallest, largest = to_floats(list(effective))
                record[f"eff_lr_mean/group{g}"] = mean
                record[f"eff_lr_min/group{g}"] = smallest
                record[f"eff_lr_max/group{g}"] = largest
            if self.per_parameter:
                grad_by_index = dict(zip(with_grad, grad_norms))
                for i, param in enumerate(group["params"]):
                    name = self._param_name(g, i, param)
                    if i in grad_by_index:
                        record[f"grad_norm/{name}"] = grad_by_index[i]
                    record[f"param_norm/{name}"] = param_norms[i]
                    record[f"update_norm/{name}"] = update_norms[i]
                    record[f"update_ratio/{name}"] = update_norms[i] / param_norms[i] if param_norms[i] else 0.0
        record["grad_norm/total"] = combine_norms(grad_total)
        record["update_norm/total"] = combine_norms(update_total)
        record["state_bytes"] = float(state_bytes(optimizer))
        self._grad_norms = None
        self.latest = record
        self.latest_step = self.step
        for sink in self.sinks:
            sink.write(self.step, record)

    def summary(self) -> dict[str, float]:
        """The latest record as a flat dict, with its ``step``; empty before the first monitored step."""
        return {"step": float(self.latest_step), **self.latest} if self.latest else {}

    def state_dict(self) -> dict[str, Any]:
        """The step counter (so that a resumed run records on the same steps)."""
        return {"step": self.step, "every": self.every}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore the step counter saved by :meth:`state_dict`."""
        self.step = int(state_dict["step"])

    def remove(self) -> None:
        """Detach the hooks, drop the parameter buffers and close the sinks. Idempotent."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._before = []
        for sink in self.sinks:
            close = getattr(sink, "close", None)
            if close is not None:
                close()
        self.sinks = []

    def __enter__(self) -> OptimizerMonitor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def __repr__(self) -> str:
        return (f"OptimizerMonitor({type(self.optimizer).__name__}, every={self.every}, "
                f"sinks={[type(s).__name__ for s in self.sinks]}, step={self.step})")
