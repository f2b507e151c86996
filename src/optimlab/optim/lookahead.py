r"""Lookahead (Zhang, Lucas, Hinton & Ba, "Lookahead Optimizer: k steps forward, 1 step back", NeurIPS 2019).

Any inner optimizer updates the *fast* weights :math:`\theta`; every :math:`k` inner steps the *slow*
weights :math:`\phi` move part of the way towards them and the fast weights restart from there:

.. math::
    \theta_{t,0} = \phi_{t-1}, \quad \theta_{t,i} = \text{inner step}(\theta_{t,i-1}) \ (i = 1..k), \quad
    \phi_t = \phi_{t-1} + \alpha\,(\theta_{t,k} - \phi_{t-1}), \quad \theta_{t+1,0} = \phi_t.

The inner optimizer's state (momenta, ...) is kept across the synchronisation, as in the paper.
The synchronisation is one ``torch._foreach_lerp_`` and one ``torch._foreach_copy_`` per (device, dtype)
over all parameters. The inner optimizer's own choices (``foreach``, ``fused``, ...) live in the
param groups the wrapper shares with it, so a fused inner optimizer keeps its fused step. Optimizers
with train/eval modes (schedule-free ones) are switched through :meth:`Lookahead.train` /
:meth:`Lookahead.eval` and :func:`optimlab.optim.modes.eval_weights`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from optimlab.optim._base import check_in_range, foreach_groups
from optimlab.optim._wrapper import load_wrapper_state, per_param_entries
from optimlab.optim.modes import set_mode

__all__ = ["Lookahead"]


class Lookahead(torch.optim.Optimizer):
    r"""Wrap ``optimizer`` with Lookahead's slow weights (Zhang et al. 2019).

    The wrapper shares ``param_groups`` with the inner optimizer, so LR schedulers, ``zero_grad`` and
    ``add_param_group`` act on both. Its ``state`` holds the slow weights (``slow_param``, one copy of
    each parameter: +4 bytes per float32 parameter); ``state_dict()`` holds the inner optimizer's
    state dict, the slow weights and the step counter. The inner optimizer's path (``foreach``,
    ``fused``) is its own setting, in those shared groups: ``Lookahead(AdamW(params, fused=True))``
    takes AdamW's fused step. ``train()``/``eval()`` reach an inner optimizer with modes (schedule-free).

    Args:
        optimizer: any ``torch.optim.Optimizer`` (optimlab's or torch's).
        k: synchronisation period, an integer >= 1.
        alpha: slow-weights step size :math:`\alpha` in (0, 1].
    """

    def __init__(self, optimizer: torch.optim.Optimizer, k: int = 5, alpha: float = 0.5) -> None:
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"Invalid optimizer: expected a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise ValueError(f"Invalid k: {k!r} (accepted range: an integer >= 1)")
        check_in_range("alpha", alpha, 0.0, 1.0, low_inclusive=False, high_inclusive=True)
        self.optimizer = optimizer
        self.k = k
        self.alpha = float(alpha)
        self.inner_steps = 0
        super().__init__(optimizer.param_groups, {})
        self.param_groups = optimizer.param_groups
        self.defaults = optimizer.defaults

    def __getstate__(self) -> dict[str, Any]:
        # torch.optim.Optimizer pickles only defaults/state/param_groups; keep the wrapper's own fields too
        return {**super().__getstate__(), "optimizer": self.optimizer, "k": self.k, "alpha": self.alpha,
                "inner_steps": self.inner_steps}

    def __repr__(self) -> str:
        return f"Lookahead(k={self.k}, alpha={self.alpha}, optimizer={self.optimizer!r})"

    @torch.no_grad()
    def _init_slow_params(self) -> None:
        for group in self.param_groups:
            for param in group["params"]:
                state = self.state[param]
                if "slow_param" not in state:
                    state["slow_param"] = param.detach().clone(memory_format=torch.preserve_format)

    @torch.no_grad()
    def _synchronize(self) -> None:
        r""":math:`\phi \leftarrow \phi + \alpha(\theta - \phi)`, then :math:`\theta \leftarrow \phi`, for every
        parameter: one foreach lerp and one foreach copy per (device, dtype)."""
        params = [param for group in self.param_groups for param in group["params"]]
        slows = [self.state[param]["slow_param"] for param in params]
        for (device_slows, device_params), _ in foreach_groups([slows, params]):
            torch._foreach_lerp_(device_slows, device_params, self.alpha)
            torch._foreach_copy_(device_params, device_slows)

    def train(self) -> None:
        """Put an inner optimizer that has train/eval modes (e.g. ``ScheduleFreeAdamW``) in train mode
        (:func:`optimlab.optim.modes.set_mode`); a no-op for other inner optimizers."""
        set_mode(self.optimizer, "train")

    def eval(self) -> None:
        """Put an inner optimizer that has train/eval modes in eval mode (its evaluation weights, e.g.
        schedule-free averages, go into the parameters); a no-op for other inner optimizers."""
        set_mode(self.optimizer, "eval")

    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """One inner step; every ``k``-th also moves the slow weights and resets the fast ones to them."""
        self._init_slow_params()
        loss = self.optimizer.step(closure)
        self.inner_steps += 1
        if self.inner_steps % self.k == 0:
            self._synchronize()
        return loss

    def state_dict(self) -> dict[str, Any]:
        """``{"optimizer": inner state dict, "slow_params": {index: tensor}, "inner_steps", "k", "alpha"}``;
        parameters are numbered in ``param_groups`` order, like ``torch.optim``'s state dicts."""
        return {"optimizer": self.optimizer.state_dict(), "slow_params": per_param_entries(self, "slow_param"),
                "inner_steps": self.inner_steps, "k": self.k, "alpha": self.alpha}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict` (the inner optimizer's part through its own ``load_state_dict``)."""
        load_wrapper_state(self, state_dict, kind="Lookahead", entries="slow_params", key="slow_param",
                           fields=("inner_steps", "k", "alpha"))
        self.inner_steps = int(state_dict["inner_steps"])
        self.k = int(state_dict["k"])
        self.alpha = float(state_dict["alpha"])
