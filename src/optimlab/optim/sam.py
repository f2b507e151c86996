r"""SAM: Sharpness-Aware Minimization (Foret et al., "Sharpness-Aware Minimization for Efficiently
Improving Generalization", ICLR 2021) and ASAM, its adaptive variant (Kwon et al., "ASAM: Adaptive
Sharpness-Aware Minimization for Scale-Invariant Learning of Deep Neural Networks", ICML 2021).

A wrapper around any base optimizer. Each step takes two gradients: at the weights :math:`w` and at
the worst-case neighbour :math:`w + \hat\epsilon(w)` inside a ball of radius :math:`\rho`:

.. math::
    \hat\epsilon(w) = \rho\, \frac{T_w^2\, \nabla L(w)}{\|T_w \nabla L(w)\|_2 + \delta}, \qquad
    w \leftarrow \operatorname{base\_step}\big(w,\ \nabla L(w + \hat\epsilon(w))\big)

with :math:`T_w = I` for SAM and :math:`T_w = \operatorname{diag}(|w|)` for ASAM (``adaptive=True``;
the norm and the scaling are per parameter group, as in the authors' code), :math:`\delta` =
``perturb_eps``, and the norm taken over every parameter with a gradient. The base optimizer's step
uses the second gradient at the original weights (saved before the perturbation and restored
exactly, not by subtracting :math:`\hat\epsilon`).

Two ways to step:

* ``first_step()`` (gradients at :math:`w` already computed: perturb), recompute the loss and
  gradients, ``second_step()`` (restore :math:`w`, base step): the authors' two-pass API;
* ``step(closure)``: the closure must clear the gradients and recompute loss and gradients (as for
  ``torch.optim.LBFGS``); it is called twice (at :math:`w`, then at :math:`w + \hat\epsilon`), and the
  loss at :math:`w` is returned. pytorch-optimizer's ``SAM.step(closure)`` instead expects the first
  gradients before the call and calls the closure once; its ``first_step``/``second_step`` are the same
  as these, except that it sums the squared norms in float32 (here: in the parameters' dtype).

Registry names (each searches its base optimizer's learning-rate range and uses its default lr, since
``lr`` is the base optimizer's): ``sam`` (the class with its defaults: SGD-momentum as the base, any
other through ``base_optimizer=``), ``sam-sgd`` and ``sam-adamw`` (SAM, rho 0.05, around ``sgd-momentum``
/ ``adamw``), ``asam-sgd`` and ``asam-adamw`` (ASAM, rho 0.5 as in Kwon et al.). The registry marks SAM
``needs_closure``, so the bench's trial loop and the trainer call ``step(closure)`` and count two
gradient evaluations per step.

A step costs two forward-backward passes. The parameter groups and state are the base optimizer's
(``state_dict`` is the base optimizer's, with ``rho``/``adaptive`` in each group); the saved weights
live only between ``first_step`` and ``second_step``. Memory: the base optimizer's state plus one
copy of the parameters during a step.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from optimlab.optim._base import ParamsT, check_non_negative
from optimlab.optim.registry import get_spec, register, register_optimizer

__all__ = ["SAM", "SAM_NAMES"]


@register(
    names={},  # registered below with their base optimizer's learning-rate range (SAM_NAMES)
    lr_bounds=(1e-4, 1.0), default_lr=1e-2, complex="rejected", checks={}, needs_closure=True,
    matrix_exempt="a wrapper whose step needs a closure (two gradient evaluations), which the generic matrix does "
                  "not give; its properties and parity are checked in tests/optim/test_frontier_sam.py",
    graph_breaks="its closure recomputes the loss and calls backward() inside step (two gradient evaluations)",
)
class SAM(torch.optim.Optimizer):
    r"""SAM / ASAM (Foret et al. 2021; Kwon et al. 2021) around a base optimizer (module docstring).

    Args:
        params: parameters or param-group dicts (a group may set its own ``rho`` and ``adaptive``).
        base_optimizer: an optimizer class, or a registry name (``"sgd-momentum"``, the default, ``"adamw"``, ...).
        rho: neighbourhood radius :math:`\rho` (>= 0). Default 0.05 (ASAM papers use larger, e.g. 0.5).
        adaptive: ASAM's scale-invariant neighbourhood :math:`T_w = |w|`. Default False.
        perturb_eps: :math:`\delta` (>= 0) added to the gradient norm. Default 1e-12.
        **base_kwargs: the base optimizer's arguments (``lr``, ``weight_decay``, ...).
    """

    supports_complex = False

    def __init__(self, params: ParamsT, base_optimizer: type[torch.optim.Optimizer] | str = "sgd-momentum",
                 rho: float = 0.05, adaptive: bool = False, perturb_eps: float = 1e-12, **base_kwargs: Any) -> None:
        check_non_negative("rho", rho)
        check_non_negative("perturb_eps", perturb_eps)
        if isinstance(base_optimizer, str):
            spec = get_spec(base_optimizer)
            base_cls, base_kwargs = spec.resolve(), {**spec.preset, **base_kwargs}
            base_kwargs.setdefault("lr", spec.default_lr)
        elif isinstance(base_optimizer, type) and issubclass(base_optimizer, torch.optim.Optimizer):
            base_cls = base_optimizer
        else:
            raise TypeError(f"Invalid base_optimizer: {base_optimizer!r} (accepted: a torch.optim.Optimizer subclass "
                            "or a registry name such as 'sgd-momentum')")
        self.perturb_eps = perturb_eps
        super().__init__(params, {"rho": rho, "adaptive": adaptive})
        self.base_optimizer = base_cls(self.param_groups, **base_kwargs)
        self.param_groups = self.base_optimizer.param_groups
        self.state = self.base_optimizer.state
        self._saved: dict[Tensor, Tensor] = {}

    def _with_grad(self) -> list[tuple[dict[str, Any], list[Tensor]]]:
        groups = [(group, [p for p in group["params"] if p.grad is not None]) for group in self.param_groups]
        for _, params in groups:
            for param in params:
                if param.is_complex():
                    raise RuntimeError(f"SAM does not support complex parameters (got one of shape {tuple(param.shape)})")
        return groups

    @torch.no_grad()
    def first_step(self, zero_grad: bool = False) -> None:
        r"""Save the weights and move them to :math:`w + \hat\epsilon(w)` using the current gradients."""
        groups = self._with_grad()
        squares = [((param.abs() * param.grad) if group["adaptive"] else param.grad).square().sum()
                   for group, params in groups for param in params]
        if not squares:
            return
        norm = torch.stack(squares).sum().sqrt() + self.perturb_eps
        for group, params in groups:
            scale = group["rho"] / norm
            for param in params:
                self._saved[param] = param.clone()
                perturbation = param.grad * scale.to(param.dtype)
                if group["adaptive"]:
                    perturbation.mul_(param.square())
                param.add_(perturbation)
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False) -> None:
        """Restore the saved weights and take the base optimizer's step with the current (perturbed) gradients."""
        for param, saved in self._saved.items():
            param.copy_(saved)
        self._saved.clear()
        self.base_optimizer.step()
        if zero_grad:
            self.zero_grad()

    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """Both passes: ``closure()`` at :math:`w`, perturb, ``closure()`` again, restore and step; returns
        the first loss. The closure must clear and recompute the gradients."""
        for group in self.param_groups:
            for param in group["params"]:
                if param.is_complex():
                    raise RuntimeError(f"SAM does not support complex parameters (got one of shape {tuple(param.shape)})")
        if closure is None:
            raise RuntimeError("SAM.step needs a closure that clears the gradients and recomputes the loss and "
                               "gradients (it is called twice); or call first_step() and second_step() yourself")
        with torch.enable_grad():
            loss = closure()
        self.first_step(zero_grad=True)
        with torch.enable_grad():
            closure()
        self.second_step()
        return loss

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """The base optimizer's ``load_state_dict``; the wrapper then shares its new groups and state."""
        self.base_optimizer.load_state_dict(state_dict)
        self.param_groups = self.base_optimizer.param_groups
        self.state = self.base_optimizer.state

    def state_dict(self) -> dict[str, Any]:
        """The base optimizer's ``state_dict`` (its groups carry ``rho`` and ``adaptive``)."""
        return self.base_optimizer.state_dict()


SAM_NAMES: dict[str, tuple[str, dict[str, Any]]] = {
    "sam": ("sgd-momentum", {}),
    "sam-sgd": ("sgd-momentum", {"base_optimizer": "sgd-momentum"}),
    "sam-adamw": ("adamw", {"base_optimizer": "adamw"}),
    "asam-sgd": ("sgd-momentum", {"base_optimizer": "sgd-momentum", "adaptive": True, "rho": 0.5}),
    "asam-adamw": ("adamw", {"base_optimizer": "adamw", "adaptive": True, "rho": 0.5}),
}
"""Registry name -> (base optimizer whose lr range and default lr the name takes, the name's fixed arguments)."""

for _name, (_base, _preset) in SAM_NAMES.items():
    _spec = get_spec(_base)
    _kind = "ASAM" if _preset.get("adaptive") else "SAM"
    register_optimizer(_name, f"{SAM.__module__}:{SAM.__qualname__}", preset=_preset, lr_bounds=_spec.lr_bounds,
                       default_lr=_spec.default_lr,
                       description=f"{_kind} (rho={_preset.get('rho', 0.05)}) around {_base}: two gradient "
                                   "evaluations per step" + ("; base_optimizer=NAME for another" if not _preset else ""))
