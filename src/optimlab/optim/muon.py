r"""Muon: MomentUm Orthogonalized by Newton–Schulz (Jordan et al. 2024, "Muon: An optimizer for hidden
layers in neural networks", https://kellerjordan.github.io/posts/muon/).

For a 2-D weight :math:`W \in \mathbb{R}^{A\times B}` with gradient :math:`G_t`:

.. math::
    B_t &= \mu B_{t-1} + (1-\mu) G_t \\
    \tilde B_t &= (1-\mu) G_t + \mu B_t \ \text{(Nesterov)} \quad\text{or}\quad B_t \\
    O_t &= \mathrm{NS}_k(\tilde B_t) \approx U V^\top \quad (\tilde B_t = U \Sigma V^\top) \\
    W_t &= W_{t-1}(1 - \eta\lambda) - \eta\, s(A, B)\, O_t

:math:`\mathrm{NS}_k` is :math:`k` steps of the quintic Newton–Schulz iteration
:math:`X \leftarrow aX + (bS + cS^2)X`, :math:`S = XX^\top`, started from
:math:`X_0 = \tilde B / \max(\|\tilde B\|_F, \epsilon)` (transposed so that :math:`X` is wide), with
:math:`(a, b, c) = (3.4445, -4.7750, 2.0315)`: in 5 steps it maps every singular value that is not
tiny into roughly [0.68, 1.19] rather than exactly 1, which trains as well (Jordan et al. 2024). The scale :math:`s` is :math:`\sqrt{\max(1, A/B)}` (``"original"``),
:math:`0.2\sqrt{\max(A, B)}` (``"match_rms_adamw"``, Liu et al. 2025, "Muon is Scalable for LLM
Training"), as in ``torch.optim.Muon``.

Muon is for the hidden weight matrices only; embeddings, the output head, biases and normalisation
gains go to AdamW (:func:`muon_param_split`, the modded-nanogpt recipe).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from optimlab.optim._base import (
    OptimlabOptimizer,
    ParamsT,
    as_float,
    check_betas,
    check_in_range,
    check_lr,
    check_non_negative,
    increment_steps,
    prepare_grad,
)
from optimlab.optim._dtensor import has_dtensor, local, owner_compute
from optimlab.optim._fused import fused_step, resolve_fused
from optimlab.optim.adam import _adam_fused, _adam_multi_tensor, _adam_single_tensor
from optimlab.optim.registry import register

__all__ = ["Muon", "MuonWithAdamW", "muon_step", "muon_step_fused", "muon_step_sharded", "muon_tensor", "newton_schulz_orthogonalize",
           "muon_param_split", "NS_COEFFICIENTS"]

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
ADJUST_LR_FNS = (None, "original", "match_rms_adamw")


def newton_schulz_orthogonalize(
    matrix: Tensor, steps: int = 5, coefficients: tuple[float, float, float] = NS_COEFFICIENTS,
    eps: float = 1e-7, dtype: torch.dtype = torch.bfloat16,
) -> Tensor:
    r"""Approximate the orthogonal factor :math:`UV^\top` of ``matrix`` (2-D) by ``steps`` quintic
    Newton–Schulz iterations :math:`X \leftarrow aX + (bXX^\top + c(XX^\top)^2)X` computed in ``dtype``
    (bfloat16 by default, as Jordan et al. 2024 and ``torch.optim.Muon`` do). Returns a tensor of ``dtype``."""
    if matrix.dim() != 2:
        raise ValueError(f"Invalid matrix: Newton-Schulz needs a 2-D tensor, got shape {tuple(matrix.shape)}")
    a, b, c = coefficients
    x = matrix.to(dtype)
    tall = matrix.size(0) > matrix.size(1)
    if tall:
        x = x.T
    x = x.div(x.norm().clamp(min=eps))
    for _ in range(steps):
        gram = x @ x.T
        polynomial = torch.addmm(gram, gram, gram, beta=b, alpha=c)
        x = torch.addmm(x, polynomial, x, beta=a)
    return x.T if tall else x


def _lr_scale(adjust_lr_fn: str | None, shape: torch.Size) -> float:
    rows, cols = shape
    if adjust_lr_fn == "match_rms_adamw":
        return 0.2 * math.sqrt(max(rows, cols))
    return math.sqrt(max(1.0, rows / cols))


def muon_tensor(
    param: Tensor, grad: Tensor, momentum_buffer: Tensor, *,
    lr: float | Tensor, momentum: float | Tensor, weight_decay: float, nesterov: bool,
    ns_coefficients: tuple[float, float, float], ns_steps: int, eps: float, adjust_lr_fn: str | None,
    ns_dtype: torch.dtype, maximize: bool, shape: tuple[int, int],
) -> None:
    """The Muon rule (module docstring) for one 2-D parameter of ``shape``, in place.

    What :func:`muon_step` loops over and the fused path compiles (:mod:`optimlab.optim._fused`, where
    ``lr`` and ``momentum`` arrive as 0-dim tensors and the tensors flattened to 1-D: they are viewed
    as ``shape`` again, a compile-time constant like ``ns_steps``, since the Newton–Schulz products
    depend on the matrix shape).
    """
    if param.dim() == 1:
        param, grad, momentum_buffer = (tensor.view(shape) for tensor in (param, grad, momentum_buffer))
    direction = _muon_direction(param, grad, momentum_buffer, lr=lr, momentum=momentum, weight_decay=weight_decay,
                                nesterov=nesterov, maximize=maximize)
    orthogonal = newton_schulz_orthogonalize(direction, ns_steps, ns_coefficients, eps, ns_dtype)
    param.add_(orthogonal, alpha=-lr * _lr_scale(adjust_lr_fn, param.shape))


def _muon_direction(param: Tensor, grad: Tensor, momentum_buffer: Tensor, *, lr: float | Tensor,
                    momentum: float | Tensor, weight_decay: float, nesterov: bool, maximize: bool) -> Tensor:
    """The elementwise half of the rule, in place: decoupled decay of ``param``, the momentum update; returns
    the direction :math:`\tilde B_t` that Newton–Schulz orthogonalises."""
    grad = prepare_grad(param, grad, maximize=maximize, weight_decay=weight_decay, lr=lr, decoupled=True)
    momentum_buffer.lerp_(grad, 1 - momentum)
    return grad.lerp(momentum_buffer, momentum) if nesterov else momentum_buffer


def muon_step(
    params: Sequence[Tensor], grads: Sequence[Tensor], momentum_buffers: Sequence[Tensor], *,
    lr: float, momentum: float, **static: Any,
) -> None:
    """Per-tensor reference path: :func:`muon_tensor` on each 2-D parameter, updating ``momentum_buffers``
    in place. ``static`` holds the rule's other settings (``weight_decay``, ``nesterov``,
    ``ns_coefficients``, ``ns_steps``, ``eps``, ``adjust_lr_fn``, ``ns_dtype``, ``maximize``)."""
    for param, grad, buffer in zip(params, grads, momentum_buffers):
        muon_tensor(param, grad, buffer, lr=lr, momentum=momentum, shape=tuple(param.shape), **static)


def muon_step_fused(
    params: Sequence[Tensor], grads: Sequence[Tensor], momentum_buffers: Sequence[Tensor], *,
    lr: float, momentum: float, **static: Any,
) -> None:
    """Fused path of the same rule: :func:`muon_tensor` compiled by :mod:`optimlab.optim._fused`
    (``elementwise=False``: Newton–Schulz multiplies whole matrices), one compiled graph per distinct
    matrix shape taking one matrix per call (the step is bound by the matrix products, so batching calls
    saves nothing and would only multiply the graph's size), with ``lr`` and ``momentum`` passed as data
    (a schedule never recompiles)."""
    shapes: dict[tuple[int, int], list[int]] = {}
    for index, param in enumerate(params):
        shapes.setdefault(tuple(param.shape), []).append(index)  # type: ignore[arg-type]
    for shape, chosen in shapes.items():
        lists = [[tensors[i] for i in chosen] for tensors in (params, grads, momentum_buffers)]
        step = fused_step(muon_tensor, {**static, "shape": shape}, 1, elementwise=False)
        step(lists, {"lr": lr, "momentum": momentum})


def muon_step_sharded(
    params: Sequence[Tensor], grads: Sequence[Tensor], momentum_buffers: Sequence[Tensor], *,
    lr: float, momentum: float, weight_decay: float, nesterov: bool, ns_coefficients: tuple[float, float, float],
    ns_steps: int, eps: float, adjust_lr_fn: str | None, ns_dtype: torch.dtype, maximize: bool,
) -> None:
    """The same rule on sharded (DTensor, FSDP2) matrices: decay and momentum on each rank's local shards,
    Newton–Schulz on each whole matrix once, by its owner rank, the result scattered back
    (:func:`optimlab.optim._dtensor.owner_compute`); equal to :func:`muon_step` on the unsharded matrices.
    Every rank calls it with the same parameters in the same order."""
    directions = [_muon_direction(local(p), local(g), local(b), lr=lr, momentum=momentum, weight_decay=weight_decay,
                                  nesterov=nesterov, maximize=maximize)
                  for p, g, b in zip(params, grads, momentum_buffers)]
    orthogonals = owner_compute(directions, params, lambda full: newton_schulz_orthogonalize(
        full, ns_steps, ns_coefficients, eps, ns_dtype), ns_dtype)
    for param, orthogonal in zip(params, orthogonals):
        local(param).add_(orthogonal, alpha=-lr * _lr_scale(adjust_lr_fn, param.shape))


def _check_muon_args(lr: float | Tensor, weight_decay: float, momentum: float, ns_coefficients: Sequence[float],
                     eps: float, ns_steps: int, adjust_lr_fn: str | None, ns_dtype: torch.dtype) -> None:
    check_lr(lr, torch_phrase="Learning rate should be >= 0 but is: {value}")
    check_non_negative("weight_decay", weight_decay, torch_phrase="weight decay should be >= 0 but is: {value}")
    check_non_negative("momentum", momentum, torch_phrase="momentum should be >= 0 but is: {value}")
    check_in_range("momentum", momentum, 0.0, 1.0)
    if len(ns_coefficients) != 3:
        raise ValueError(f"Coefficients must be a tuple of exactly 3 values (Invalid ns_coefficients: "
                         f"{ns_coefficients!r}; expected three floats (a, b, c))")
    check_non_negative("eps", eps)
    if not isinstance(ns_steps, int) or not (1 <= ns_steps < 100):
        raise ValueError(f"Number of steps must be less than 100 for computational efficiency (Invalid ns_steps: "
                         f"{ns_steps!r}; accepted range: an integer in [1, 99])")
    if adjust_lr_fn not in ADJUST_LR_FNS:
        raise ValueError(f"Adjust learning rate function {adjust_lr_fn} is not supported (Invalid adjust_lr_fn: "
                         f"{adjust_lr_fn!r}; accepted: {ADJUST_LR_FNS})")
    if not (isinstance(ns_dtype, torch.dtype) and ns_dtype.is_floating_point):
        raise ValueError(f"Invalid ns_dtype: {ns_dtype!r} (accepted: a floating torch.dtype)")


def _muon_update(group: dict[str, Any], params: list[Tensor], grads: list[Tensor], states: list[dict[str, Any]],
                 optimizer_name: str) -> None:
    if has_dtensor(params):  # sharded matrices (FSDP2): Newton-Schulz on whole matrices, uncompiled
        rule = muon_step_sharded
    else:
        rule = muon_step_fused if resolve_fused(group["fused"], params, optimizer_name) else muon_step
    rule(
        params, grads, [state["momentum_buffer"] for state in states], lr=as_float(group["lr"]),
        weight_decay=group["weight_decay"], momentum=group["momentum"], nesterov=group["nesterov"],
        ns_coefficients=group["ns_coefficients"], ns_steps=group["ns_steps"], eps=group["eps"],
        adjust_lr_fn=group["adjust_lr_fn"], ns_dtype=group["ns_dtype"], maximize=group["maximize"],
    )


@register(
    names={},
    lr_bounds=(1e-4, 1.0), default_lr=2e-2, reference=torch.optim.Muon, state_bytes=4, fused=True,
    complex="rejected", matrices_only=True, checks={},
    fused_check={"lr": 2e-2, "weight_decay": 0.1, "momentum": 0.9, "ns_dtype": torch.float64,
                 "adjust_lr_fn": "match_rms_adamw"},
    matrix_exempt="2-D parameters only; the matrix's properties are checked in tests/optim/test_modern_muon.py",
)
class Muon(OptimlabOptimizer):
    r"""Muon (Jordan et al. 2024) for 2-D weight matrices: momentum, then Newton–Schulz orthogonalisation.

    Same arguments and defaults as ``torch.optim.Muon`` plus ``ns_dtype`` (the precision of the
    Newton–Schulz iteration; bfloat16 like torch's) and ``maximize``.

    Args:
        params: 2-D parameters or param-group dicts (anything else raises ``ValueError``; route it to
            AdamW with :func:`muon_param_split`).
        lr: learning rate :math:`\eta` (>= 0).
        weight_decay: decoupled weight decay :math:`\lambda` (>= 0).
        momentum: :math:`\mu` in [0, 1).
        nesterov: use the Nesterov look-ahead direction.
        ns_coefficients: :math:`(a, b, c)` of the quintic iteration.
        eps: floor of the Frobenius norm in the normalisation (>= 0).
        ns_steps: Newton–Schulz iterations :math:`k`, 1..99.
        adjust_lr_fn: ``None``/``"original"`` or ``"match_rms_adamw"`` (see module docstring).
        ns_dtype: floating dtype of the iteration.
        maximize: ascend the objective instead.
        fused: the compiled step (:mod:`optimlab.optim._fused`): momentum, Newton–Schulz and the update
            of each matrix in one compiled call (one graph per matrix shape); ``None`` (default) means off.
    """

    def __init__(
        self,
        params: ParamsT,
        lr: float | Tensor = 1e-3,
        weight_decay: float = 0.1,
        momentum: float = 0.95,
        nesterov: bool = True,
        ns_coefficients: tuple[float, float, float] = NS_COEFFICIENTS,
        eps: float = 1e-7,
        ns_steps: int = 5,
        adjust_lr_fn: str | None = None,
        *,
        ns_dtype: torch.dtype = torch.bfloat16,
        maximize: bool = False,
        fused: bool | None = None,
    ) -> None:
        _check_muon_args(lr, weight_decay, momentum, ns_coefficients, eps, ns_steps, adjust_lr_fn, ns_dtype)
        defaults = dict(lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=nesterov,
                        ns_coefficients=tuple(ns_coefficients), eps=eps, ns_steps=ns_steps,
                        adjust_lr_fn=adjust_lr_fn, ns_dtype=ns_dtype, maximize=maximize, fused=fused)
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a param group (``torch.optim`` semantics); every parameter must be a 2-D matrix."""
        super().add_param_group(param_group)
        for param in self.param_groups[-1]["params"]:
            if param.dim() != 2:
                raise ValueError(
                    f"Muon only supports 2D parameters whereas we found a parameter with size: {param.size()} "
                    f"(Invalid params: Muon takes 2-D weight matrices, got a tensor of shape {tuple(param.shape)}); "
                    "send embeddings, heads, biases and norms to AdamW (optimlab.optim.muon.muon_param_split)"
                )

    def _state_keys(self, group: dict[str, Any]) -> tuple[str, ...]:
        return ("momentum_buffer",)

    def _update_group(
        self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor], states: list[dict[str, Any]]
    ) -> None:
        _muon_update(group, params, grads, states, type(self).__name__)


def muon_param_split(
    model: nn.Module, *, adamw_names: Iterable[str] = ("head",),
) -> tuple[list[Tensor], list[Tensor]]:
    """Split ``model``'s trainable parameters into ``(muon_params, adamw_params)``, the modded-nanogpt recipe.

    A parameter goes to Muon when it is a 2-D hidden weight matrix: ``ndim == 2``, not owned by an
    ``nn.Embedding``/``nn.EmbeddingBag``, and no entry of ``adamw_names`` occurs in its qualified name
    (default ``("head",)`` catches ``head``/``lm_head``, the output projection). Everything else
    (embeddings, the head, biases, normalisation gains, other shapes) goes to AdamW. Tied parameters
    are listed once.

    Example:
        >>> muon_params, adamw_params = muon_param_split(model)
        >>> optimizers = [Muon(muon_params, lr=0.02, momentum=0.95),
        ...               AdamW(adamw_params, lr=3e-4, betas=(0.9, 0.95), weight_decay=0.0)]
        >>> # each step: loss.backward(); for opt in optimizers: opt.step(); opt.zero_grad()
    """
    markers = tuple(adamw_names)
    embedding_params = {
        id(p) for module in model.modules() if isinstance(module, (nn.Embedding, nn.EmbeddingBag))
        for p in module.parameters(recurse=False)
    }
    muon_params: list[Tensor] = []
    adamw_params: list[Tensor] = []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        hidden_matrix = param.dim() == 2 and id(param) not in embedding_params and not any(m in name for m in markers)
        (muon_params if hidden_matrix else adamw_params).append(param)
    return muon_params, adamw_params


@register(
    names={"muon": "Muon for 2-D weights + AdamW for the rest (Jordan et al. 2024)"},
    lr_bounds=(1e-4, 1.0), default_lr=2e-2, state_bytes=4, fused=True, complex="rejected", checks={},
    fused_check={"lr": 2e-2, "weight_decay": 0.1, "ns_dtype": torch.float64, "adamw_weight_decay": 0.1},
    matrix_exempt="splits each param group in two (Muon part, AdamW part), which the matrix's assumptions do not "
                  "fit; its properties are checked in tests/optim/test_modern_muon.py",
)
class MuonWithAdamW(OptimlabOptimizer):
    r"""Muon for hidden 2-D matrices and AdamW for every other parameter, in one optimizer.

    Each param group is either a Muon group or an AdamW group (its ``"use_muon"`` flag). A group given
    without the flag is split by shape: 2-D tensors to Muon, the rest (biases, norm gains, scalars) to
    AdamW. Shape cannot tell embeddings and the output head from hidden matrices, so for the full
    modded-nanogpt recipe pass the groups from :func:`muon_param_split`::

        hidden, other = muon_param_split(model)
        opt = MuonWithAdamW([{"params": hidden, "use_muon": True}, {"params": other, "use_muon": False}])

    ``lr`` and ``weight_decay`` (arguments or keys of an unflagged group) are Muon's; AdamW groups
    store theirs as ``lr``/``weight_decay`` too, taken from ``adamw_lr``/``adamw_weight_decay`` (or
    set directly in a ``use_muon=False`` group), so an LR scheduler scales both kinds alike. The AdamW rule is
    :class:`optimlab.optim.AdamW`'s (decoupled weight decay, bias correction); its state keys are
    torch's (``step``, ``exp_avg``, ``exp_avg_sq``), Muon's is ``momentum_buffer``.

    Args:
        params: parameters or param-group dicts (optionally with ``"use_muon"``).
        lr, weight_decay, momentum, nesterov, ns_coefficients, eps, ns_steps, adjust_lr_fn, ns_dtype:
            the Muon groups' settings, as in :class:`Muon` (defaults as modded-nanogpt: lr 0.02, no decay).
        adamw_lr: learning rate of the AdamW groups (>= 0).
        adamw_betas: :math:`(\beta_1, \beta_2)` of the AdamW groups.
        adamw_eps: :math:`\epsilon` of the AdamW groups (>= 0).
        adamw_weight_decay: decoupled weight decay of the AdamW groups (>= 0).
        maximize: ascend the objective instead.
        fused: the compiled steps (:mod:`optimlab.optim._fused`) for both kinds of group: Muon's
            (:func:`muon_step_fused`) and AdamW's (``optimlab.optim.AdamW(fused=True)``'s); ``None``
            (default) means off. A group may override it.
    """

    def __init__(
        self,
        params: ParamsT,
        lr: float | Tensor = 0.02,
        weight_decay: float = 0.0,
        momentum: float = 0.95,
        nesterov: bool = True,
        ns_coefficients: tuple[float, float, float] = NS_COEFFICIENTS,
        eps: float = 1e-7,
        ns_steps: int = 5,
        adjust_lr_fn: str | None = None,
        *,
        ns_dtype: torch.dtype = torch.bfloat16,
        adamw_lr: float = 3e-4,
        adamw_betas: tuple[float, float] = (0.9, 0.95),
        adamw_eps: float = 1e-8,
        adamw_weight_decay: float = 0.0,
        maximize: bool = False,
        fused: bool | None = None,
    ) -> None:
        _check_muon_args(lr, weight_decay, momentum, ns_coefficients, eps, ns_steps, adjust_lr_fn, ns_dtype)
        check_lr(adamw_lr, "adamw_lr")
        check_betas(adamw_betas, ("adamw_beta1", "adamw_beta2"))
        check_non_negative("adamw_eps", adamw_eps)
        check_non_negative("adamw_weight_decay", adamw_weight_decay)
        defaults = dict(lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=nesterov,
                        ns_coefficients=tuple(ns_coefficients), eps=eps, ns_steps=ns_steps, adjust_lr_fn=adjust_lr_fn,
                        ns_dtype=ns_dtype, adamw_lr=adamw_lr, adamw_betas=tuple(adamw_betas), adamw_eps=adamw_eps,
                        adamw_weight_decay=adamw_weight_decay, maximize=maximize, fused=fused)
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group; without ``"use_muon"`` it is split into a Muon part (2-D) and an AdamW part."""
        params = param_group["params"]
        params = [params] if isinstance(params, Tensor) else list(params)
        if "use_muon" not in param_group:
            matrices = [p for p in params if p.dim() == 2]
            others = [p for p in params if p.dim() != 2]
            if matrices:
                self.add_param_group({**param_group, "params": matrices, "use_muon": True})
            if others:
                adamw_part = {k: v for k, v in param_group.items() if k not in ("lr", "weight_decay")}
                self.add_param_group({**adamw_part, "params": others, "use_muon": False})
            return
        group = dict(param_group, params=params)
        if group["use_muon"]:
            for param in params:
                if param.dim() != 2:
                    raise ValueError(f"Invalid params: a use_muon group takes 2-D matrices, got shape {tuple(param.shape)}")
        else:
            group.setdefault("lr", group.get("adamw_lr", self.defaults["adamw_lr"]))
            group.setdefault("weight_decay", group.get("adamw_weight_decay", self.defaults["adamw_weight_decay"]))
        super().add_param_group(group)

    def _state_keys(self, group: dict[str, Any]) -> tuple[str, ...]:
        return ("momentum_buffer",) if group["use_muon"] else ("step", "exp_avg", "exp_avg_sq")

    def _update_group(
        self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor], states: list[dict[str, Any]]
    ) -> None:
        if group["use_muon"]:
            _muon_update(group, params, grads, states, type(self).__name__)
            return
        beta1, beta2 = group["adamw_betas"]
        if resolve_fused(group["fused"], params, type(self).__name__):
            rule = _adam_fused
        else:
            rule = _adam_multi_tensor if self._use_foreach(group, params) else _adam_single_tensor
        rule(
            params, grads, [state["exp_avg"] for state in states], [state["exp_avg_sq"] for state in states], [],
            increment_steps(states), lr=as_float(group["lr"]), beta1=as_float(beta1), beta2=as_float(beta2),
            eps=group["adamw_eps"], weight_decay=group["weight_decay"], amsgrad=False, maximize=group["maximize"],
            decoupled_weight_decay=True,
        )
