r"""Gradient accumulation as an optimizer wrapper: optax's ``MultiSteps`` for torch.

``MultiSteps(optimizer, every_k=k)`` is stepped once per micro-batch, like any optimizer. The gradients of
``k`` consecutive calls are accumulated; on the ``k``-th call the inner optimizer steps once with

.. math::
    \bar g = \frac{1}{k}\sum_{i=1}^{k} g_i \quad (\text{or } \textstyle\sum_i g_i \text{ with } ``use\_grad\_mean=False``),

and the parameters do not change in between. With mean-reduced losses over equal micro-batches, :math:`\bar g`
is the gradient of the ``k``-times larger batch, so training matches large-batch training (exactly in exact
arithmetic; tested bit for bit on a linear model with dyadic data). Reference: the optax library's
``optax.MultiSteps`` (DeepMind), which this mirrors for ``torch.optim``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from optimlab.optim._wrapper import load_wrapper_state, per_param_entries, wrapped_params

__all__ = ["MultiSteps"]


class MultiSteps(torch.optim.Optimizer):
    r"""Accumulate gradients over ``every_k`` calls of :meth:`step` and step ``optimizer`` once with their mean
    (module docstring).

    The wrapper shares ``param_groups`` with the inner optimizer, so ``zero_grad`` and LR schedulers act on
    both (step a schedule when :attr:`last_step_applied` is true, i.e. once per inner step). Call
    ``zero_grad()`` after every ``step()`` as usual: the wrapper keeps its own accumulator (``acc_grad`` in its
    state, one gradient-sized buffer per parameter) and puts each parameter's own ``.grad`` back after the
    inner step. A parameter without gradient in some micro-steps counts zero there (and is left to the inner
    optimizer as without gradient if it had none in all ``k``). ``state_dict()`` holds the inner state, the
    accumulators and the position in the cycle, so a run resumes exactly, also mid-accumulation. The inner
    optimizer must not need a closure (LBFGS): a closure given to ``step`` is evaluated once per micro-step.

    Args:
        optimizer: any ``torch.optim.Optimizer`` (optimlab's or torch's).
        every_k: micro-steps per inner step, an integer >= 1.
        use_grad_mean: step with the mean of the ``k`` gradients (default) or their sum.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, every_k: int, use_grad_mean: bool = True) -> None:
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"Invalid optimizer: expected a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if not isinstance(every_k, int) or isinstance(every_k, bool) or every_k < 1:
            raise ValueError(f"Invalid every_k: {every_k!r} (accepted range: an integer >= 1)")
        self.optimizer = optimizer
        self.every_k = every_k
        self.use_grad_mean = bool(use_grad_mean)
        self.mini_steps = 0
        self.last_step_applied = False
        super().__init__(optimizer.param_groups, {})
        self.param_groups = optimizer.param_groups
        self.defaults = optimizer.defaults

    def __getstate__(self) -> dict[str, Any]:
        # torch.optim.Optimizer pickles only defaults/state/param_groups; keep the wrapper's own fields too
        return {**super().__getstate__(), "optimizer": self.optimizer, "every_k": self.every_k,
                "use_grad_mean": self.use_grad_mean, "mini_steps": self.mini_steps,
                "last_step_applied": self.last_step_applied}

    def __repr__(self) -> str:
        return f"MultiSteps(every_k={self.every_k}, use_grad_mean={self.use_grad_mean}, optimizer={self.optimizer!r})"

    @torch.no_grad()
    def _accumulate(self) -> None:
        for param in wrapped_params(self):
            if param.grad is None:
                continue
            state = self.state[param]
            if "acc_grad" not in state:
                state["acc_grad"] = torch.zeros_like(param, memory_format=torch.preserve_format)
            state["acc_grad"].add_(param.grad)

    @torch.no_grad()
    def _inner_step(self) -> None:
        """Step the inner optimizer with the accumulated gradients as ``.grad``, then restore each ``.grad`` and
        clear the accumulators (parameters that got no gradient in the whole cycle keep ``.grad``)."""
        own_grads: dict[Tensor, Tensor | None] = {}
        for param in wrapped_params(self):
            accumulated = self.state[param].get("acc_grad")
            if accumulated is None:
                continue
            own_grads[param] = param.grad
            param.grad = accumulated.div_(self.every_k) if self.use_grad_mean else accumulated
        try:
            self.optimizer.step()
        finally:
            for param, grad in own_grads.items():
                param.grad = grad
                del self.state[param]["acc_grad"]

    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """Add the current gradients to the accumulators; every ``every_k``-th call also steps the inner
        optimizer with their mean. Returns the closure's loss when a closure is given."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._accumulate()
        self.mini_steps += 1
        self.last_step_applied = self.mini_steps == self.every_k
        if self.last_step_applied:
            self.mini_steps = 0
            self._inner_step()
        return loss

    def state_dict(self) -> dict[str, Any]:
        """``{"optimizer": inner state dict, "acc_grads": {index: tensor}, "mini_steps", "every_k",
        "use_grad_mean"}``; parameters are numbered in ``param_groups`` order, as in ``torch.optim``."""
        return {"optimizer": self.optimizer.state_dict(), "acc_grads": per_param_entries(self, "acc_grad"),
                "mini_steps": self.mini_steps, "every_k": self.every_k, "use_grad_mean": self.use_grad_mean}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict` (the inner optimizer's part through its own ``load_state_dict``)."""
        load_wrapper_state(self, state_dict, kind="MultiSteps", entries="acc_grads", key="acc_grad",
                           fields=("mini_steps", "every_k", "use_grad_mean"))
        self.mini_steps = int(state_dict["mini_steps"])
        self.every_k = int(state_dict["every_k"])
        self.use_grad_mean = bool(state_dict["use_grad_mean"])
        self.last_step_applied = False
