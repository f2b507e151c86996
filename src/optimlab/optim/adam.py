r"""Adam and AdamW: one rule, with L2 (coupled) or decoupled weight decay.

With learning rate :math:`\eta`, betas :math:`(\beta_1, \beta_2)`, :math:`\epsilon`, step :math:`t`
and gradient :math:`g_t` (after ``maximize`` and weight decay, see
:func:`optimlab.optim._base.prepare_grad`):

.. math::
    m_t &= \beta_1 m_{t-1} + (1 - \beta_1)\, g_t \\
    v_t &= \beta_2 v_{t-1} + (1 - \beta_2)\, g_t^2 \\
    \hat v_t &= \max(\hat v_{t-1}, v_t) \text{ with AMSGrad, else } v_t \\
    \theta_t &= \theta_{t-1} - \frac{\eta}{1 - \beta_1^t}\,
        \frac{m_t}{\sqrt{\hat v_t} / \sqrt{1 - \beta_2^t} + \epsilon}

With ``cautious=True`` the update :math:`u_t = m_t / (\sqrt{\hat v_t / (1-\beta_2^t)} + \epsilon)` is
masked to the components whose sign agrees with :math:`g_t` and rescaled
(:mod:`optimlab.optim.cautious`, Liang et al. 2024) before the step.

References: Kingma & Ba, "Adam: A Method for Stochastic Optimization" (2014); Reddi et al., "On the
Convergence of Adam and Beyond" (AMSGrad, 2018); Loshchilov & Hutter, "Decoupled Weight Decay
Regularization" (AdamW, 2019).

The rule functions take the moment buffers as plain tensors (no state-dict access), so storage
variants (e.g. low-precision moments) can wrap them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from optimlab.optim._base import (
    OptimlabOptimizer,
    ParamsT,
    as_float,
    check_betas,
    check_differentiable,
    check_lr,
    check_non_negative,
    foreach_groups,
    increment_steps,
    loop_pieces,
    new_step_tensor,
    prepare_grad,
    prepare_grads,
    real_views,
    reject_unsupported,
)
from optimlab.optim._fused import fused_step, resolve_fused, split_by_value
from optimlab.optim._lowp_native import adam_lowp_kernel
from optimlab.optim.cautious import cautious_
from optimlab.optim.lowp_state import (
    fused_lowp_step,
    init_moment,
    load_moments,
    resolve_state_dtype,
    restore_state_dtypes,
    store_moments,
)
from optimlab.optim.registry import preset, register

__all__ = ["Adam", "AdamW"]

# the moment buffers and whether each is signed (their storage may be bf16 / int8, see state_dtype)
_MOMENTS = (("exp_avg", True), ("exp_avg_sq", False), ("max_exp_avg_sq", False))


def _adam_single_tensor(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    max_exp_avg_sqs: list[Tensor],
    steps: list[float],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    amsgrad: bool,
    maximize: bool,
    decoupled_weight_decay: bool,
    cautious: bool = False,
) -> None:
    """Per-tensor reference path of the Adam rule (module docstring). ``steps`` are the already
    incremented step counts; ``max_exp_avg_sqs`` is empty unless ``amsgrad``. Large tensors are updated
    in slices (:func:`optimlab.optim._base.loop_pieces`; not with ``cautious``, whose mask reduces over
    the tensor)."""
    for i, param in enumerate(params):
        tensors = (param, grads[i], exp_avgs[i], exp_avg_sqs[i], max_exp_avg_sqs[i] if amsgrad else None)
        bias_correction1, bias_correction2_sqrt = 1 - beta1 ** steps[i], (1 - beta2 ** steps[i]) ** 0.5
        for piece in [tensors] if cautious else loop_pieces(*tensors):
            _adam_tensor(*piece, lr=lr, beta1=beta1, beta2=beta2, eps=eps, bias_correction1=bias_correction1,
                         bias_correction2_sqrt=bias_correction2_sqrt, weight_decay=weight_decay, amsgrad=amsgrad,
                         maximize=maximize, decoupled_weight_decay=decoupled_weight_decay, cautious=cautious)


def _adam_tensor(
    param: Tensor,
    grad: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    max_exp_avg_sq: Tensor | None = None,
    *,
    lr: float | Tensor,
    beta1: float | Tensor,
    beta2: float | Tensor,
    eps: float | Tensor,
    bias_correction1: float | Tensor,
    bias_correction2_sqrt: float | Tensor,
    weight_decay: float,
    amsgrad: bool,
    maximize: bool,
    decoupled_weight_decay: bool,
    cautious: bool = False,
) -> None:
    """The Adam rule (module docstring) for one tensor, in place: what the per-tensor path loops over and
    the fused path compiles (:mod:`optimlab.optim._fused`, where the float arguments arrive as 0-dim tensors)."""
    grad = prepare_grad(param, grad, maximize=maximize, weight_decay=weight_decay, lr=lr,
                        decoupled=decoupled_weight_decay)
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    if amsgrad:
        if torch.is_grad_enabled():  # differentiable=True: out= is not differentiable, maximum saves its inputs
            max_exp_avg_sq.copy_(torch.maximum(max_exp_avg_sq.clone(), exp_avg_sq))
        else:
            torch.maximum(max_exp_avg_sq, exp_avg_sq, out=max_exp_avg_sq)
        second_moment = max_exp_avg_sq
    else:
        second_moment = exp_avg_sq
    denom = (second_moment.sqrt() / bias_correction2_sqrt).add_(eps)
    if cautious:
        param.add_(cautious_(exp_avg / denom, grad), alpha=-(lr / bias_correction1))
    else:
        param.addcdiv_(exp_avg, denom, value=-(lr / bias_correction1))


def _adam_multi_tensor(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    max_exp_avg_sqs: list[Tensor],
    steps: list[float],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    amsgrad: bool,
    maximize: bool,
    decoupled_weight_decay: bool,
    cautious: bool = False,
) -> None:
    """Multi-tensor (``torch._foreach_*``) path of the same rule as :func:`_adam_single_tensor`; the
    cautious mask, a per-tensor reduction, is applied tensor by tensor."""
    for (device_params, device_grads, device_exp_avgs, device_exp_avg_sqs, device_max_exp_avg_sqs), (
        device_steps,
    ) in foreach_groups([params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs], [steps]):
        device_grads = prepare_grads(device_params, device_grads, maximize=maximize, weight_decay=weight_decay,
                                     lr=lr, decoupled=decoupled_weight_decay)
        torch._foreach_lerp_(device_exp_avgs, device_grads, 1 - beta1)
        torch._foreach_mul_(device_exp_avg_sqs, beta2)
        torch._foreach_addcmul_(device_exp_avg_sqs, device_grads, device_grads, 1 - beta2)
        bias_correction2_sqrts = [(1 - beta2**step) ** 0.5 for step in device_steps]
        step_sizes = [-(lr / (1 - beta1**step)) for step in device_steps]
        if amsgrad:
            torch._foreach_maximum_(device_max_exp_avg_sqs, device_exp_avg_sqs)
            denoms = torch._foreach_sqrt(device_max_exp_avg_sqs)
        else:
            denoms = torch._foreach_sqrt(device_exp_avg_sqs)
        torch._foreach_div_(denoms, bias_correction2_sqrts)
        torch._foreach_add_(denoms, eps)
        if cautious:
            updates = torch._foreach_div(device_exp_avgs, denoms)
            for update, grad in zip(updates, device_grads):
                cautious_(update, grad)
            torch._foreach_mul_(updates, step_sizes)
            torch._foreach_add_(device_params, updates)
        else:
            torch._foreach_addcdiv_(device_params, device_exp_avgs, denoms, step_sizes)


def _adam_static(weight_decay: float, amsgrad: bool, maximize: bool, decoupled_weight_decay: bool,
                 cautious: bool) -> dict[str, Any]:
    # the compile-time constants of the fused rule (the rule branches on them)
    static = {"weight_decay": weight_decay, "amsgrad": amsgrad, "maximize": maximize,
              "decoupled_weight_decay": decoupled_weight_decay}
    return {**static, "cautious": True} if cautious else static  # absent when off: the rule's default


def _native_kernel(group: dict[str, Any]) -> Callable[..., None] | None:
    # the hand-written low-precision kernel covers the plain rule: no amsgrad maximum, no cautious mask
    if group["amsgrad"] or group["cautious"]:
        return None
    return adam_lowp_kernel(group["state_dtype"])


def _adam_scalars(lr: float, beta1: float, beta2: float, eps: float, step: float) -> dict[str, float]:
    # the data arguments of the fused rule at step count `step` (the bias corrections depend on it)
    return {"lr": lr, "beta1": beta1, "beta2": beta2, "eps": eps,
            "bias_correction1": 1 - beta1**step, "bias_correction2_sqrt": (1 - beta2**step) ** 0.5}


def _adam_fused(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    max_exp_avg_sqs: list[Tensor],
    steps: list[float],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    amsgrad: bool,
    maximize: bool,
    decoupled_weight_decay: bool,
    cautious: bool = False,
) -> None:
    """Fused path of the same rule: :func:`_adam_tensor` compiled by :mod:`optimlab.optim._fused`, the
    step-dependent bias corrections computed once per distinct step count and passed as 0-dim tensors.
    The cautious mask reduces over each tensor, so with ``cautious`` the rule is not elementwise (no packing)."""
    tensor_lists = [params, grads, exp_avgs, exp_avg_sqs] + ([max_exp_avg_sqs] if amsgrad else [])
    static = _adam_static(weight_decay, amsgrad, maximize, decoupled_weight_decay, cautious)
    for step, lists in split_by_value(tensor_lists, steps):
        fused_step(_adam_tensor, static, elementwise=not cautious)(lists, _adam_scalars(lr, beta1, beta2, eps, step))


@register(
    names={
        "adam": "Adam (Kingma & Ba 2014)",
        "amsgrad": preset("Adam with AMSGrad (Reddi et al. 2018)", amsgrad=True),
        "adam-bf16": preset("Adam with both moments stored in bfloat16 (4 B/param)", state_dtype="bfloat16"),
        "adam-int8": preset("Adam with 8-bit block-wise quantised moments (Dettmers et al. 2022; ~2 B/param)",
                            state_dtype="int8"),
    },
    lr_bounds=(1e-5, 1e-1), default_lr=1e-3, reference=torch.optim.Adam, state_bytes=8, fused=True,
    complex="supported",
    checks={
        "default": {"lr": 0.01},
        "amsgrad": {"lr": 0.01, "amsgrad": True},
        "wd": {"lr": 0.01, "weight_decay": 0.1},
        "decoupled": {"lr": 0.01, "weight_decay": 0.1, "decoupled_weight_decay": True},
        "amsgrad-wd-maximize": {"lr": 0.01, "amsgrad": True, "weight_decay": 0.05, "maximize": True},
        "betas-eps": {"lr": 0.02, "betas": (0.8, 0.9), "eps": 1e-3},
    },
    fused_check={"lr": 1e-2, "amsgrad": True, "weight_decay": 0.1},
)
class Adam(OptimlabOptimizer):
    r"""Adam (Kingma & Ba 2014), with optional AMSGrad (Reddi et al. 2018) and decoupled weight decay.

    .. math::
        m_t = \beta_1 m_{t-1} + (1-\beta_1) g_t,\quad v_t = \beta_2 v_{t-1} + (1-\beta_2) g_t^2,\quad
        \theta_t = \theta_{t-1} - \frac{\eta}{1-\beta_1^t}\,\frac{m_t}{\sqrt{\hat v_t/(1-\beta_2^t)} + \epsilon}

    with :math:`\hat v_t = \max_{s \le t} v_s` under AMSGrad (else :math:`v_t`), and
    :math:`g_t = \pm\nabla f + \lambda\theta` (coupled) or :math:`\theta \leftarrow \theta(1-\eta\lambda)`
    first (``decoupled_weight_decay=True``, Loshchilov & Hutter 2019).

    Same arguments, defaults and state (``step``, ``exp_avg``, ``exp_avg_sq``, ``max_exp_avg_sq``)
    as ``torch.optim.Adam``, plus the keyword-only ``state_dtype`` extension.

    Args:
        params: parameters, named parameters or param-group dicts.
        lr: :math:`\eta` (float or 0-dim tensor, >= 0). Default 1e-3.
        betas: :math:`(\beta_1, \beta_2)`, each in [0, 1). Default (0.9, 0.999).
        eps: :math:`\epsilon` (>= 0). Default 1e-8.
        weight_decay: :math:`\lambda` (>= 0). Default 0.
        amsgrad: use the running maximum of :math:`v_t`. Default False.
        foreach: multi-tensor path (default: see :func:`optimlab.optim._base.default_foreach`).
        maximize: ascend the objective. Default False.
        fused: the compiled fused step (:mod:`optimlab.optim._fused`); ``None`` (default) means off.
            With a bf16 / int8 ``state_dtype``, decoding the moments, the rule and their
            stochastically rounded store are one compiled step
            (:func:`optimlab.optim.lowp_state.fused_lowp_step`).
        capturable, differentiable: not supported (``NotImplementedError`` when true).
        decoupled_weight_decay: AdamW-style decay. Default False.
        cautious: optimlab extension (keyword-only): mask the update to the components whose sign
            agrees with the gradient and rescale (:mod:`optimlab.optim.cautious`, Liang et al. 2024).
            ``None`` (default) or False: off. Kept in ``defaults``, so a param group may override it.
        state_dtype: optimlab extension (keyword-only, after torch's arguments): storage of the
            moments, ``None``/``"float32"`` (the parameter's dtype, default), ``"bfloat16"``/``"bf16"``
            or ``"int8"`` (block-wise quantised, :mod:`optimlab.optim.lowp_state`): 8, 4 or about
            2.03 bytes per parameter. Updates are computed in the parameter's dtype either way. Kept
            in ``defaults``, so a param group may override it (``{"params": ..., "state_dtype": None}``).
            A loaded state_dict's groups bring their own ``state_dtype`` (``None`` when absent, as in
            ``torch.optim`` checkpoints, whose moments are full precision).
    """

    def __init__(
        self,
        params: ParamsT,
        lr: float | Tensor = 1e-3,
        betas: tuple[float | Tensor, float | Tensor] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0,
        amsgrad: bool = False,
        *,
        foreach: bool | None = None,
        maximize: bool = False,
        capturable: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
        decoupled_weight_decay: bool = False,
        state_dtype: str | torch.dtype | None = None,
        cautious: bool | None = None,
    ) -> None:
        reject_unsupported(type(self).__name__, capturable=capturable)
        check_differentiable(differentiable, foreach=foreach, fused=fused)
        check_lr(lr)
        check_betas(betas)
        check_non_negative("eps", eps)
        check_non_negative("weight_decay", weight_decay)
        defaults = {
            "lr": lr,
            "betas": tuple(betas),
            "eps": eps,
            "weight_decay": weight_decay,
            "amsgrad": amsgrad,
            "maximize": maximize,
            "foreach": foreach,
            "capturable": capturable,
            "differentiable": differentiable,
            "fused": fused,
            "decoupled_weight_decay": decoupled_weight_decay,
            "state_dtype": resolve_state_dtype(state_dtype),
            "cautious": cautious,
        }
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a param group (``torch.optim`` semantics), validating its ``state_dtype``."""
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        group["state_dtype"] = resolve_state_dtype(group["state_dtype"])
        if group["state_dtype"] is not None:
            if any(p.is_complex() for p in group["params"]):
                raise ValueError("Invalid state_dtype: low-precision state needs real parameters (got complex ones)")

    def __setstate__(self, state: dict[str, Any]) -> None:
        # groups without state_dtype (torch.optim checkpoints) hold full-precision moments: None, not
        # this optimizer's default, which the base class would otherwise fill in
        for group in state.get("param_groups", []):
            group.setdefault("state_dtype", None)
        super().__setstate__(state)

    def _after_load_state_dict(self) -> None:
        """After ``load_state_dict`` (``torch.optim`` semantics): bf16 / int8 moments keep their storage dtype."""
        super()._after_load_state_dict()
        restore_state_dtypes(self, _MOMENTS)

    def _init_group(self, group: dict[str, Any], params: list[Tensor]) -> None:
        for param in params:
            state = self.state[param]
            if not state:
                state["step"] = new_step_tensor()
                for key, signed in _MOMENTS if group["amsgrad"] else _MOMENTS[:2]:
                    init_moment(state, key, param, group["state_dtype"], signed=signed)

    def _update_group(
        self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor], states: list[dict[str, Any]]
    ) -> None:
        beta1, beta2 = group["betas"]
        moments = _MOMENTS if group["amsgrad"] else _MOMENTS[:2]
        fused = resolve_fused(group["fused"], params, type(self).__name__)
        if fused and group["state_dtype"] is not None:
            # low-precision moments: decode, rule and stochastic-rounding store in one compiled pass
            lr, beta1, beta2, eps = as_float(group["lr"]), as_float(beta1), as_float(beta2), group["eps"]
            fused_lowp_step(
                _adam_tensor,
                _adam_static(group["weight_decay"], group["amsgrad"], group["maximize"],
                             group["decoupled_weight_decay"], bool(group["cautious"])),
                moments, group["state_dtype"], params, grads, states, increment_steps(states),
                lambda step: _adam_scalars(lr, beta1, beta2, eps, step),
                native=_native_kernel(group))
            return
        if fused:
            rule = _adam_fused
        else:
            rule = _adam_multi_tensor if self._use_foreach(group, params) else _adam_single_tensor
        buffers = {key: load_moments(states, key, params, signed=signed) for key, signed in moments}
        steps = increment_steps(states)
        rule(
            real_views(params),
            real_views(grads),
            real_views(buffers["exp_avg"]),
            real_views(buffers["exp_avg_sq"]),
            real_views(buffers["max_exp_avg_sq"]) if group["amsgrad"] else [],
            steps,
            lr=as_float(group["lr"]),
            beta1=as_float(beta1),
            beta2=as_float(beta2),
            eps=group["eps"],
            weight_decay=group["weight_decay"],
            amsgrad=group["amsgrad"],
            maximize=group["maximize"],
            decoupled_weight_decay=group["decoupled_weight_decay"],
            cautious=bool(group["cautious"]),
        )
        for key, signed in moments:
            store_moments(states, key, buffers[key], signed=signed, steps=steps)


@register(
    names={
        "adamw": "AdamW (Loshchilov & Hutter 2019)",
        "adamw-bf16": preset("AdamW with both moments stored in bfloat16 (4 B/param)", state_dtype="bfloat16"),
        "adamw-int8": preset("AdamW with 8-bit block-wise quantised moments (Dettmers et al. 2022; ~2 B/param)",
                             state_dtype="int8"),
        "adamw-cautious": preset("AdamW with the cautious mask (Liang et al. 2024)", cautious=True),
    },
    lr_bounds=(1e-5, 1e-1), default_lr=1e-3, reference=torch.optim.AdamW, state_bytes=8, fused=True,
    complex="supported",
    checks={
        "default": {"lr": 0.01},
        "amsgrad": {"lr": 0.01, "amsgrad": True, "weight_decay": 0.1},
        "maximize": {"lr": 0.01, "weight_decay": 0.2, "maximize": True},
        "cautious-amsgrad": {"lr": 0.01, "weight_decay": 0.1, "amsgrad": True, "cautious": True},
    },
    fused_check={"lr": 1e-2, "betas": (0.8, 0.99), "maximize": True},
)
class AdamW(Adam):
    r"""AdamW (Loshchilov & Hutter 2019): Adam (Kingma & Ba 2014) with decoupled weight decay.

    .. math::
        \theta \leftarrow \theta\,(1 - \eta\lambda), \quad
        m_t = \beta_1 m_{t-1} + (1-\beta_1) g_t,\quad v_t = \beta_2 v_{t-1} + (1-\beta_2) g_t^2,\quad
        \theta_t = \theta - \frac{\eta}{1-\beta_1^t}\,\frac{m_t}{\sqrt{\hat v_t/(1-\beta_2^t)} + \epsilon}

    The same rule as :class:`Adam` with ``decoupled_weight_decay=True`` (so ``isinstance(opt, Adam)``
    holds, as in torch). Same arguments, defaults (``weight_decay=1e-2``) and state as
    ``torch.optim.AdamW``, plus the keyword-only ``state_dtype`` and ``cautious`` extensions; see :class:`Adam` for the arguments.
    """

    def __init__(
        self,
        params: ParamsT,
        lr: float | Tensor = 1e-3,
        betas: tuple[float | Tensor, float | Tensor] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        capturable: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
        state_dtype: str | torch.dtype | None = None,
        cautious: bool | None = None,
    ) -> None:
        super().__init__(
            params,
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            amsgrad=amsgrad,
            foreach=foreach,
            maximize=maximize,
            capturable=capturable,
            differentiable=differentiable,
            fused=fused,
            decoupled_weight_decay=True,
            state_dtype=state_dtype,
            cautious=cautious,
        )

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            group["decoupled_weight_decay"] = True
