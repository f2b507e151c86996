r"""Limited-memory BFGS with an optional strong-Wolfe line search, as ``torch.optim.LBFGS``.

All parameters are treated as one flat vector :math:`x` (complex ones as real pairs). One ``step(closure)``
runs up to ``max_iter`` iterations of

.. math::
    d_k = -H_k g_k, \qquad x_{k+1} = x_k + t_k d_k,

where :math:`H_k g_k` comes from the two-loop recursion over the last ``history_size`` pairs
:math:`s_i = t_i d_i`, :math:`y_i = g_{i+1} - g_i` (a pair is kept only when :math:`y_i^\top s_i > 10^{-10}`),
with the initial scaling :math:`H^0 = (y^\top s)/(y^\top y)` of the newest pair (Nocedal & Wright,
*Numerical Optimization*, 2nd ed., Alg. 7.4). The first iteration ever uses
:math:`d = -g`, :math:`t = \min(1, 1/\lVert g\rVert_1)\,\eta`; later ones :math:`t = \eta`. With
``line_search_fn="strong_wolfe"``, :math:`t` is instead found by a line search satisfying the strong
Wolfe conditions (:math:`c_1 = 10^{-4}`, :math:`c_2 = 0.9`; bracketing then zoom with safeguarded cubic
interpolation: Nocedal & Wright Alg. 3.5–3.6, as in minFunc and torch).

The iterations stop early when :math:`\max|g| \le` ``tolerance_grad``, when :math:`g^\top d >
-`\ ``tolerance_change``, when :math:`\max|t d|` or the loss change falls below ``tolerance_change``, or
when ``max_eval`` closure evaluations have been spent. The state (``d``, ``t``, ``old_dirs``, ``old_stps``,
``ro``, ``H_diag``, ``prev_flat_grad``, ``prev_loss``, ``al``, ``func_evals``, ``n_iter``) carries over to
the next ``step`` and is kept under the first parameter, with torch's keys, so state_dicts move between
torch and optimlab. Reference: Liu & Nocedal, "On the limited memory BFGS method for large scale
optimization" (Math. Programming 1989).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from optimlab.optim._base import OptimlabOptimizer, ParamsT, check_lr, check_non_negative, scalar_hyperparameter
from optimlab.optim.registry import register

__all__ = ["LBFGS"]

LINE_SEARCHES = (None, "strong_wolfe")
#: The line search's own settings (torch passes none of the optimizer's tolerances to it).
WOLFE_C1, WOLFE_C2, WOLFE_TOLERANCE_CHANGE = 1e-4, 0.9, 1e-9

# A point on the search line: (step t, loss f, flat gradient g, directional derivative g·d).
Point = tuple[Any, float, Tensor, Any]


def cubic_minimizer(x1: Any, f1: float, g1: Any, x2: Any, f2: float, g2: Any,
                    bounds: tuple[Any, Any] | None = None) -> Any:
    r"""The minimizer of the cubic through :math:`(x_1, f_1)`, :math:`(x_2, f_2)` with slopes :math:`g_1, g_2`
    (Nocedal & Wright eq. 3.59), clamped to ``bounds`` (default: the interval between the two points); the
    middle of ``bounds`` when the cubic has no real minimizer."""
    low, high = bounds if bounds is not None else ((x1, x2) if x1 <= x2 else (x2, x1))
    d1 = g1 + g2 - 3 * (f1 - f2) / (x1 - x2)
    discriminant = d1**2 - g1 * g2
    if not discriminant >= 0:
        return (low + high) / 2.0
    d2 = discriminant.sqrt()
    if x1 <= x2:  # measured from the right end point, whichever of the two it is
        minimizer = x2 - (x2 - x1) * ((g2 + d2 - d1) / (g2 - g1 + 2 * d2))
    else:
        minimizer = x1 - (x1 - x2) * ((g1 + d2 - d1) / (g1 - g2 + 2 * d2))
    return min(max(minimizer, low), high)


def strong_wolfe(evaluate: Callable[[Any], tuple[float, Tensor]], d: Tensor, start: Point, t: Any,
                 max_evals: int) -> tuple[float, Tensor, Any, int]:
    r"""Find a step :math:`t` along ``d`` meeting the strong Wolfe conditions
    :math:`f(t) \le f(0) + c_1 t\, g_0^\top d` and :math:`|g(t)^\top d| \le c_2 |g_0^\top d|`.

    ``evaluate(t)`` returns the loss and flat gradient at :math:`x + t d` (and leaves :math:`x` unchanged);
    ``start`` is the point at :math:`t = 0`. Returns ``(loss, gradient, t, evaluations)`` of the best point
    found within ``max_evals`` evaluations.
    """
    _, f0, g0, gtd0 = start
    d_norm = d.abs().max()
    g0 = g0.clone(memory_format=torch.contiguous_format)

    def sufficient_decrease(step: Any, loss: float) -> bool:
        return not loss > f0 + WOLFE_C1 * step * gtd0

    def curvature(slope: Any) -> bool:
        return abs(slope) <= -WOLFE_C2 * gtd0

    loss, grad = evaluate(t)
    evals, iteration = 1, 0
    current: Point = (t, loss, grad, grad.dot(d))
    previous: Point = (0, f0, g0, gtd0)
    bracket: list[Point] | None = None
    done = False
    # phase 1: extrapolate until an interval [previous, current] contains a Wolfe point
    while iteration < max_evals:
        t, loss, grad, gtd = current
        if not sufficient_decrease(t, loss) or (iteration > 1 and loss >= previous[1]):
            bracket = [previous, (t, loss, grad.clone(memory_format=torch.contiguous_format), gtd)]
            break
        if curvature(gtd):
            bracket, done = [current], True
            break
        if gtd >= 0:
            bracket = [previous, (t, loss, grad.clone(memory_format=torch.contiguous_format), gtd)]
            break
        t_next = cubic_minimizer(previous[0], previous[1], previous[3], t, loss, gtd,
                                 bounds=(t + 0.01 * (t - previous[0]), t * 10))
        previous = (t, loss, grad.clone(memory_format=torch.contiguous_format), gtd)
        loss, grad = evaluate(t_next)
        evals += 1
        iteration += 1
        current = (t_next, loss, grad, grad.dot(d))
    if iteration == max_evals:
        t, loss, grad, gtd = current
        bracket = [(0, f0, g0, gtd0), (t, loss, grad, gtd)]
    assert bracket is not None

    # phase 2: zoom into the bracket with safeguarded cubic steps
    def low_high() -> tuple[int, int]:
        return (0, 1) if bracket[0][1] <= bracket[-1][1] else (1, 0)

    low, high = low_high()
    insufficient_progress = False
    while not done and iteration < max_evals:
        (a, f_a, _, gtd_a), (b, f_b, _, gtd_b) = bracket
        if abs(b - a) * d_norm < WOLFE_TOLERANCE_CHANGE:
            break
        t = cubic_minimizer(a, f_a, gtd_a, b, f_b, gtd_b)
        left, right = min(a, b), max(a, b)
        margin = 0.1 * (right - left)
        if min(right - t, t - left) < margin:  # too close to an end: move inside, or note the lack of progress
            if insufficient_progress or t >= right or t <= left:
                t = right - margin if abs(t - right) < abs(t - left) else left + margin
                insufficient_progress = False
            else:
                insufficient_progress = True
        else:
            insufficient_progress = False
        loss, grad = evaluate(t)
        evals += 1
        iteration += 1
        gtd = grad.dot(d)
        point = (t, loss, grad.clone(memory_format=torch.contiguous_format), gtd)
        if not sufficient_decrease(t, loss) or loss >= bracket[low][1]:
            bracket[high] = point
            low, high = low_high()
        else:
            if curvature(gtd):
                done = True
            elif gtd * (bracket[high][0] - bracket[low][0]) >= 0:
                bracket[high] = bracket[low]
            bracket[low] = point
    t, loss, grad, _ = bracket[low]
    return loss, grad, t, evals


def two_loop_direction(flat_grad: Tensor, old_dirs: list[Tensor], old_stps: list[Tensor], ro: list[Any],
                       h_diag: Any, al: list[Any]) -> Tensor:
    r""":math:`-H g` by the two-loop recursion (Nocedal & Wright Alg. 7.4), with ``old_dirs`` the :math:`y_i`,
    ``old_stps`` the :math:`s_i`, ``ro`` the :math:`1/(y_i^\top s_i)` and :math:`H^0 =` ``h_diag``; ``al`` is
    the caller's scratch list for the :math:`\alpha_i` (kept in the state, as torch does)."""
    q = flat_grad.neg()
    for i in range(len(old_dirs) - 1, -1, -1):
        al[i] = old_stps[i].dot(q) * ro[i]
        q.add_(old_dirs[i], alpha=-al[i])
    r = torch.mul(q, h_diag)
    for i in range(len(old_dirs)):
        beta = old_dirs[i].dot(r) * ro[i]
        r.add_(old_stps[i], alpha=al[i] - beta)
    return r


@register(
    names={"lbfgs": "L-BFGS (Liu & Nocedal 1989), torch's defaults: no line search, max_iter 20 per step"},
    lr_bounds=(1e-3, 10.0), default_lr=1.0, reference=torch.optim.LBFGS, complex="supported", checks={},
    needs_closure=True,
    matrix_exempt="step() needs a closure and the parameters form one vector (the generic matrix steps without "
                  "one); parity, state, semantics and torch's OptimizerInfo inputs in "
                  "tests/optim/test_torch_extras_parity.py",
    graph_breaks="the line search and stopping tests branch on tensor values (data-dependent control flow; torch's LBFGS too)",
)
class LBFGS(OptimlabOptimizer):
    r"""L-BFGS (module docstring): a quasi-Newton method over all parameters as one vector; ``step(closure)``
    needs a closure that zeroes the gradients, recomputes the loss, calls ``backward()`` and returns the loss.

    Same arguments, defaults, state and stopping rules as ``torch.optim.LBFGS``: one param group only, every
    parameter on one device, memory ``(2 · history_size + 3) ×`` the parameter count. Returns the loss of the
    closure's first evaluation.

    Args:
        params: parameters (one group).
        lr: step length :math:`\eta` (>= 0). Default 1.
        max_iter: iterations per ``step`` (>= 1). Default 20.
        max_eval: closure evaluations per ``step`` (>= 1). Default ``max_iter * 5 // 4``.
        tolerance_grad: stop when :math:`\max|g|` is at most this (>= 0). Default 1e-7.
        tolerance_change: stop when the step or the loss change is below this (>= 0). Default 1e-9.
        history_size: curvature pairs kept (>= 1). Default 100.
        line_search_fn: ``None`` (fixed step) or ``"strong_wolfe"``. Default None.
    """

    supports_sparse = True

    def __init__(
        self,
        params: ParamsT,
        lr: float | Tensor = 1,
        max_iter: int = 20,
        max_eval: int | None = None,
        tolerance_grad: float = 1e-7,
        tolerance_change: float = 1e-9,
        history_size: int = 100,
        line_search_fn: str | None = None,
    ) -> None:
        check_lr(lr)
        if max_eval is None:
            max_eval = max_iter * 5 // 4 if _is_count(max_iter) else max_iter
        for name, value in (("max_iter", max_iter), ("max_eval", max_eval), ("history_size", history_size)):
            if not _is_count(value):
                raise ValueError(f"Invalid {name}: {value!r} (accepted: an integer >= 1)")
        check_non_negative("tolerance_grad", tolerance_grad)
        check_non_negative("tolerance_change", tolerance_change)
        if line_search_fn not in LINE_SEARCHES:
            raise ValueError(f"Invalid line_search_fn: {line_search_fn!r} (accepted: None, 'strong_wolfe'; "
                             "only 'strong_wolfe' is supported)")
        defaults = {"lr": lr, "max_iter": max_iter, "max_eval": max_eval, "tolerance_grad": tolerance_grad,
                    "tolerance_change": tolerance_change, "history_size": history_size,
                    "line_search_fn": line_search_fn}
        super().__init__(params, defaults)
        if len(self.param_groups) != 1:
            raise ValueError("LBFGS doesn't support per-parameter options (parameter groups): pass one list "
                             f"of parameters, got {len(self.param_groups)} param groups")

    # ----------------------------------------------------------------------------------------------
    # the parameters as one flat vector
    def _params(self) -> list[Tensor]:
        if len(self.param_groups) != 1:
            raise ValueError(f"LBFGS needs exactly one param group, got {len(self.param_groups)} "
                             "(add_param_group is not supported)")
        return self.param_groups[0]["params"]

    def _flat_grad(self) -> Tensor:
        """All gradients as one vector (zeros for a parameter without one; sparse ones densified; a
        non-contiguous one copied, where torch's ``view`` fails)."""
        views = []
        for param in self._params():
            if param.grad is None:
                view = param.new_zeros(param.numel())
            else:
                view = (param.grad.to_dense() if param.grad.is_sparse else param.grad).reshape(-1)
            views.append(torch.view_as_real(view).reshape(-1) if view.is_complex() else view)
        return torch.cat(views, 0)

    def _move(self, t: Any, direction: Tensor) -> None:
        """``x ← x + t · direction`` on the parameters."""
        offset = 0
        for param in self._params():
            real = torch.view_as_real(param) if param.is_complex() else param
            real.add_(direction[offset:offset + real.numel()].view_as(real), alpha=t)
            offset += real.numel()

    def _evaluate_at(self, closure: Callable[[], Any], x: list[Tensor], t: Any, direction: Tensor
                     ) -> tuple[float, Tensor]:
        """Loss and flat gradient at ``x + t · direction``; the parameters are put back to ``x``."""
        self._move(t, direction)
        loss = _loss_value(closure())
        grad = self._flat_grad()
        for param, value in zip(self._params(), x, strict=True):
            param.copy_(value)
        return loss, grad

    # ----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """Run up to ``max_iter`` L-BFGS iterations; returns the loss of the closure's first evaluation."""
        if closure is None:
            raise TypeError("LBFGS.step() needs a closure that re-evaluates the model and returns the loss "
                            "(it is called several times per step): optimizer.step(closure)")
        closure = torch.enable_grad()(closure)
        group = self.param_groups[0]
        lr, tolerance_change = scalar_hyperparameter(group["lr"]), group["tolerance_change"]
        state = self.state[self._params()[0]]
        state.setdefault("func_evals", 0)
        state.setdefault("n_iter", 0)

        first_loss = closure()
        loss = _loss_value(first_loss)
        evals = 1
        state["func_evals"] += 1
        flat_grad = self._flat_grad()
        if flat_grad.abs().max() <= group["tolerance_grad"]:
            return first_loss

        d, t = state.get("d"), state.get("t")
        old_dirs, old_stps, ro = state.get("old_dirs"), state.get("old_stps"), state.get("ro")
        h_diag, prev_flat_grad, prev_loss = state.get("H_diag"), state.get("prev_flat_grad"), state.get("prev_loss")
        iteration = 0
        while iteration < group["max_iter"]:
            iteration += 1
            state["n_iter"] += 1
            if state["n_iter"] == 1:
                d, old_dirs, old_stps, ro, h_diag = flat_grad.neg(), [], [], [], 1
            else:
                y = flat_grad.sub(prev_flat_grad)
                s = d.mul(t)
                ys = y.dot(s)
                if ys > 1e-10:  # keep the pair only under positive curvature
                    if len(old_dirs) == group["history_size"]:
                        old_dirs.pop(0), old_stps.pop(0), ro.pop(0)
                    old_dirs.append(y)
                    old_stps.append(s)
                    ro.append(1.0 / ys)
                    h_diag = ys / y.dot(y)
                al = state.setdefault("al", [None] * group["history_size"])
                d = two_loop_direction(flat_grad, old_dirs, old_stps, ro, h_diag, al)
            if prev_flat_grad is None:
                prev_flat_grad = flat_grad.clone(memory_format=torch.contiguous_format)
            else:
                prev_flat_grad.copy_(flat_grad)
            prev_loss = loss
            t = min(1.0, 1.0 / flat_grad.abs().sum()) * lr if state["n_iter"] == 1 else lr
            gtd = flat_grad.dot(d)
            if gtd > -tolerance_change:  # not a descent direction
                break

            if group["line_search_fn"] not in LINE_SEARCHES:
                raise ValueError(f"Invalid line_search_fn: {group['line_search_fn']!r} (accepted: None, "
                                 "'strong_wolfe'; only 'strong_wolfe' is supported)")
            if group["line_search_fn"] == "strong_wolfe":
                x = [p.clone(memory_format=torch.contiguous_format) for p in self._params()]
                loss, flat_grad, t, used = strong_wolfe(
                    lambda step, x=x, d=d: self._evaluate_at(closure, x, step, d), d, (0, loss, flat_grad, gtd), t,
                    group["max_eval"] - evals)
                self._move(t, d)
                converged = flat_grad.abs().max() <= group["tolerance_grad"]
            else:
                self._move(t, d)
                used, converged = 0, False
                if iteration != group["max_iter"]:  # the last iteration's loss is the next step's first
                    loss = _loss_value(closure())
                    flat_grad = self._flat_grad()
                    converged = flat_grad.abs().max() <= group["tolerance_grad"]
                    used = 1
            evals += used
            state["func_evals"] += used
            if (iteration == group["max_iter"] or evals >= group["max_eval"] or converged
                    or d.mul(t).abs().max() <= tolerance_change or abs(loss - prev_loss) < tolerance_change):
                break

        state.update({"d": d, "t": t, "old_dirs": old_dirs, "old_stps": old_stps, "ro": ro, "H_diag": h_diag,
                      "prev_flat_grad": prev_flat_grad, "prev_loss": prev_loss})
        return first_loss


def _loss_value(loss: Any) -> float:
    """The closure's loss as a Python float (detached first, so no autograd warning)."""
    return float(loss.detach()) if isinstance(loss, Tensor) else float(loss)


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1
