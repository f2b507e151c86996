r"""Curvature of the loss: Hessian-vector products, extreme eigenvalues, trace and spectral density.

* :class:`HessianOperator`: :math:`v \mapsto H v` with :math:`H = \nabla^2_\theta L` by double backpropagation,
  :math:`Hv = \nabla_\theta \langle \nabla_\theta L, v\rangle` (Pearlmutter 1994, "Fast exact multiplication
  by the Hessian"), never forming :math:`H`.
* :func:`lanczos_eigenvalues`: the largest and smallest eigenvalues by the Lanczos method (Lanczos 1950) with
  full reorthogonalization; the Ritz value :math:`\theta_i` of the tridiagonal :math:`T_m = S \Theta S^T` is
  accepted once its residual :math:`\lVert H y_i - \theta_i y_i\rVert = |\beta_m S_{m,i}|` is below
  ``tol`` x :math:`\max|\theta|`.
* :func:`hutchinson_trace`: :math:`\operatorname{tr} H \approx \frac1m\sum_{k=1}^m z_k^T H z_k` with Rademacher
  :math:`z_k` (Hutchinson 1989), reported with its standard error :math:`s/\sqrt m`.
* :func:`spectral_density`: stochastic Lanczos quadrature (Golub & Meurant 1994; Ghorbani et al. 2019,
  "An Investigation into Neural Net Optimization via Hessian Eigenvalue Density"):
  :math:`\phi(t) \approx \frac1R \sum_r \sum_j \tau_{rj}\, \mathcal N(t; \theta_{rj}, \sigma^2)` with the Ritz values
  :math:`\theta_{rj}` and weights :math:`\tau_{rj} = S_{1j}^2` of :math:`R` random starts.
* :func:`analyze_curvature`: the sign pattern of the extremes (all :math:`\lambda \ge 0`: locally convex; mixed
  signs: a saddle) and the stability bound of gradient descent, :math:`\eta < 2/\lambda_{\max}`
  (:math:`(2 + 2\beta)/\lambda_{\max}` with heavy-ball momentum :math:`\beta`), against the LR in use
  (the edge of stability, Cohen et al. 2021, "Gradient Descent on Neural Networks Typically Occurs at the
  Edge of Stability").
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure
from torch import Tensor, nn

from optimlab.analysis._params import LossFn, as_batches, evaluation_mode, flatten, trainable_parameters, unflatten
from optimlab.io import atomic_savefig

__all__ = [
    "HessianOperator",
    "LanczosResult",
    "lanczos",
    "lanczos_eigenvalues",
    "EigenEstimate",
    "TraceEstimate",
    "hutchinson_trace",
    "SpectralDensity",
    "spectral_density",
    "classify_curvature",
    "stability_bound",
    "CurvatureReport",
    "analyze_curvature",
    "plot_spectrum",
]

MatVec = Callable[[Tensor], Tensor]


class HessianOperator:
    r"""The Hessian of the mean loss over ``data`` as a linear operator on flat vectors.

    The first-derivative graph of each batch is built once (in ``eval`` mode) and reused by every
    :meth:`matvec`, so the operator is a snapshot: build a new one after the parameters change.
    Memory: one autograd graph per batch; pass a few batches (or one large one).

    Args:
        model: the model; ``params`` default to its trainable parameters.
        loss_fn: ``loss_fn(model, batch) -> scalar``; must be twice differentiable.
        data: one batch or a list of batches; the operator is the mean of the per-batch Hessians.
        params: the parameters to differentiate against (a subset of the model's), in order.
    """

    def __init__(self, model: nn.Module, loss_fn: LossFn, data: Any, params: Sequence[Tensor] | None = None) -> None:
        self.params = list(params) if params is not None else trainable_parameters(model)
        batches = as_batches(data)
        self._gradients: list[list[Tensor]] = []
        self.loss = 0.0
        with evaluation_mode(model), torch.enable_grad():
            for batch in batches:
                loss = loss_fn(model, batch)
                if loss.dim() != 0:
                    raise ValueError(f"Invalid loss_fn: it must return a scalar, got shape {tuple(loss.shape)}")
                self.loss += float(loss.detach()) / len(batches)
                grads = torch.autograd.grad(loss, self.params, create_graph=True, allow_unused=True)
                self._gradients.append([torch.zeros_like(p) if g is None else g for g, p in zip(grads, self.params)])
        first = self.params[0]
        self.dim = sum(p.numel() for p in self.params)
        self.dtype, self.device = first.dtype, first.device
        self.num_matvecs = 0

    def gradient(self) -> Tensor:
        """The flat gradient of the mean loss."""
        return sum(flatten([g.detach() for g in grads]) for grads in self._gradients) / len(self._gradients)

    def _batch_matvec(self, grads: list[Tensor], pieces: list[Tensor]) -> Tensor:
        r""":math:`\nabla_\theta \langle g, v\rangle` for one batch's gradient ``g`` (entries without a graph are constant)."""
        live = [i for i, g in enumerate(grads) if g.requires_grad]
        products: list[Tensor | None] = [None] * len(self.params)
        if live:
            products = list(torch.autograd.grad([grads[i] for i in live], self.params,
                                                grad_outputs=[pieces[i] for i in live], retain_graph=True,
                                                allow_unused=True))
        return flatten([torch.zeros_like(p) if h is None else h for h, p in zip(products, self.params)])

    def matvec(self, vector: Tensor) -> Tensor:
        r""":math:`H v` for a flat ``vector`` of :attr:`dim` elements (mean over the batches)."""
        pieces = unflatten(vector.to(dtype=self.dtype, device=self.device), self.params)
        total = sum(self._batch_matvec(grads, pieces) for grads in self._gradients)
        self.num_matvecs += 1
        return (total / len(self._gradients)).detach()

    __call__ = matvec


@dataclass(frozen=True)
class LanczosResult:
    r"""The tridiagonal :math:`T_m` (``alphas`` on the diagonal, ``betas`` beside it) and the basis ``basis`` (m x n);
    ``last_beta`` is :math:`\beta_m`, the norm of the residual after the last step (0 at an invariant subspace)."""

    alphas: np.ndarray
    betas: np.ndarray
    basis: Tensor
    last_beta: float

    def ritz(self) -> tuple[np.ndarray, np.ndarray]:
        """Eigenvalues (ascending) and eigenvectors ``S`` of :math:`T_m`."""
        matrix = np.diag(self.alphas) + np.diag(self.betas, 1) + np.diag(self.betas, -1)
        return np.linalg.eigh(matrix)


def _start_vector(dim: int, dtype: torch.dtype, device: torch.device, generator: torch.Generator | None) -> Tensor:
    """A Rademacher vector (entries +-1) on ``device``, drawn on the CPU from ``generator``."""
    signs = torch.randint(0, 2, (dim,), generator=generator, dtype=torch.int64).to(dtype) * 2 - 1
    return signs.to(device)


def lanczos(matvec: MatVec, start: Tensor, num_steps: int,
            stop: Callable[[LanczosResult], bool] | None = None) -> LanczosResult:
    r"""``num_steps`` Lanczos steps from ``start`` with full reorthogonalization (two Gram-Schmidt passes).

    :math:`w = H q_j - \beta_{j-1} q_{j-1}`, :math:`\alpha_j = q_j^T w`, :math:`w \leftarrow w - \alpha_j q_j`,
    reorthogonalize :math:`w` against :math:`q_1..q_j`, :math:`\beta_j = \lVert w\rVert`, :math:`q_{j+1} = w/\beta_j`.
    Stops early at an invariant subspace (:math:`\beta_j \approx 0`) or when ``stop(partial_result)`` is true.
    """
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"Invalid num_steps: {num_steps!r} (accepted range: an integer >= 1)")
    dim = start.numel()
    num_steps = min(num_steps, dim)
    basis = torch.zeros(num_steps, dim, dtype=start.dtype, device=start.device)
    basis[0] = start / start.norm()
    alphas: list[float] = []
    betas: list[float] = []
    beta = 0.0
    scale = 0.0
    for j in range(num_steps):
        w = matvec(basis[j])
        alpha = float(basis[j] @ w)
        w = w - alpha * basis[j] - (beta * basis[j - 1] if j > 0 else 0.0)
        for _ in range(2):
            w = w - basis[: j + 1].T @ (basis[: j + 1] @ w)
        alphas.append(alpha)
        beta = float(w.norm())
        scale = max(scale, abs(alpha), beta)
        result = LanczosResult(np.asarray(alphas), np.asarray(betas), basis[: j + 1], beta)
        if j + 1 == num_steps or beta <= 1e-12 * scale or (stop is not None and stop(result)):
            break
        betas.append(beta)
        basis[j + 1] = w / beta
    return result


@dataclass(frozen=True)
class EigenEstimate:
    """Ritz values of :func:`lanczos_eigenvalues`.

    Attributes:
        top: the ``k`` largest eigenvalues, descending.
        bottom: the ``k`` smallest eigenvalues, ascending (``bottom[0]`` is the minimum).
        top_residuals / bottom_residuals: the matching residual norms :math:`\\lVert Hy - \\theta y\\rVert`.
        iterations: Lanczos steps (= Hessian-vector products) used.
        converged: whether every reported value met the tolerance.
        ritz_values: every Ritz value of the final tridiagonal matrix (ascending).
    """

    top: list[float]
    bottom: list[float]
    top_residuals: list[float]
    bottom_residuals: list[float]
    iterations: int
    converged: bool
    ritz_values: list[float] = field(default_factory=list)

    @property
    def lambda_max(self) -> float:
        """The largest eigenvalue found (the sharpness)."""
        return self.top[0]

    @property
    def lambda_min(self) -> float:
        """The smallest eigenvalue found."""
        return self.bottom[0]


def _extremes(result: LanczosResult, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Ritz values (ascending), their residuals, and the indices of the ``k`` largest (descending) and smallest."""
    values, vectors = result.ritz()
    residuals = np.abs(result.last_beta * vectors[-1, :])
    count = min(k, values.size)
    return values, residuals, np.arange(values.size - count, values.size)[::-1], np.arange(count)


def lanczos_eigenvalues(operator: MatVec, dim: int, k: int = 5, *, max_iter: int = 200, tol: float = 1e-6,
                        dtype: torch.dtype = torch.float64, device: torch.device | str = "cpu",
                        generator: torch.Generator | None = None) -> EigenEstimate:
    r"""The ``k`` largest and ``k`` smallest eigenvalues of a symmetric operator by Lanczos.

    Runs until the residual of every requested Ritz value is at most ``tol`` x :math:`\max_i|\theta_i|`
    (checked every step) or ``max_iter`` steps; with ``max_iter >= dim`` the answer is exact up to rounding.
    Repeated eigenvalues are found once (a single start vector): ``k`` distinct values are reported.
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"Invalid k: {k!r} (accepted range: an integer >= 1)")
    if not (tol > 0):
        raise ValueError(f"Invalid tol: {tol} (accepted range: > 0)")
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
        raise ValueError(f"Invalid max_iter: {max_iter!r} (accepted range: an integer >= 1)")

    def converged(result: LanczosResult) -> bool:
        if result.alphas.size < min(2 * k, dim):
            return False
        values, residuals, top_idx, bottom_idx = _extremes(result, k)
        wanted = np.r_[top_idx, bottom_idx]
        return bool(np.all(residuals[wanted] <= tol * np.max(np.abs(values))))

    result = lanczos(operator, _start_vector(dim, dtype, torch.device(device), generator), max_iter, stop=converged)
    values, residuals, top_idx, bottom_idx = _extremes(result, k)
    exact = result.last_beta <= 1e-12 * max(1.0, float(np.max(np.abs(values))))
    return EigenEstimate(
        top=[float(v) for v in values[top_idx]],
        bottom=[float(v) for v in values[bottom_idx]],
        top_residuals=[float(r) for r in residuals[top_idx]],
        bottom_residuals=[float(r) for r in residuals[bottom_idx]],
        iterations=int(result.alphas.size),
        converged=exact or converged(result) or result.alphas.size == dim,
        ritz_values=[float(v) for v in values],
    )


@dataclass(frozen=True)
class TraceEstimate:
    r"""Hutchinson's estimate: ``value`` :math:`= \bar s`, ``standard_error`` :math:`= s_{\text{std}}/\sqrt m`,
    and every probe's :math:`z_k^T H z_k` in ``samples``."""

    value: float
    standard_error: float
    num_probes: int
    samples: list[float]


def hutchinson_trace(operator: MatVec, dim: int, num_probes: int = 100, *, dtype: torch.dtype = torch.float64,
                     device: torch.device | str = "cpu", generator: torch.Generator | None = None) -> TraceEstimate:
    r""":math:`\operatorname{tr} H \approx \frac1m \sum_k z_k^T H z_k`, :math:`z_k` Rademacher (unbiased; variance
    :math:`2\sum_{i\ne j} H_{ij}^2 / m`). The standard error uses the sample standard deviation (``num_probes`` >= 2)."""
    if isinstance(num_probes, bool) or not isinstance(num_probes, int) or num_probes < 2:
        raise ValueError(f"Invalid num_probes: {num_probes!r} (accepted range: an integer >= 2)")
    samples = []
    for _ in range(num_probes):
        probe = _start_vector(dim, dtype, torch.device(device), generator)
        samples.append(float(probe @ operator(probe)))
    values = np.asarray(samples)
    return TraceEstimate(float(values.mean()), float(values.std(ddof=1) / math.sqrt(num_probes)), num_probes, samples)


@dataclass(frozen=True)
class SpectralDensity:
    """Gauss quadrature nodes and weights of stochastic Lanczos quadrature, one row per random start."""

    nodes: list[np.ndarray]
    weights: list[np.ndarray]
    dim: int

    def density(self, grid: np.ndarray, sigma: float) -> np.ndarray:
        r""":math:`\phi(t) = \frac1R\sum_r\sum_j \tau_{rj}\,\mathcal N(t;\theta_{rj},\sigma^2)` on ``grid`` (integrates to 1)."""
        if not (sigma > 0):
            raise ValueError(f"Invalid sigma: {sigma} (accepted range: > 0)")
        grid = np.asarray(grid, dtype=np.float64)
        total = np.zeros_like(grid)
        for nodes, weights in zip(self.nodes, self.weights):
            gauss = np.exp(-0.5 * ((grid[:, None] - nodes[None, :]) / sigma) ** 2) / (sigma * math.sqrt(2 * math.pi))
            total += gauss @ weights
        return total / len(self.nodes)

    def trace(self) -> float:
        r""":math:`n \cdot \frac1R \sum_r \sum_j \tau_{rj}\theta_{rj}` (the SLQ trace estimate)."""
        return self.dim * float(np.mean([nodes @ weights for nodes, weights in zip(self.nodes, self.weights)]))


def spectral_density(operator: MatVec, dim: int, *, num_runs: int = 4, num_steps: int = 80,
                     dtype: torch.dtype = torch.float64, device: torch.device | str = "cpu",
                     generator: torch.Generator | None = None) -> SpectralDensity:
    """Stochastic Lanczos quadrature: ``num_runs`` Lanczos runs of ``num_steps`` from Rademacher starts."""
    if isinstance(num_runs, bool) or not isinstance(num_runs, int) or num_runs < 1:
        raise ValueError(f"Invalid num_runs: {num_runs!r} (accepted range: an integer >= 1)")
    nodes, weights = [], []
    for _ in range(num_runs):
        result = lanczos(operator, _start_vector(dim, dtype, torch.device(device), generator), num_steps)
        values, vectors = result.ritz()
        nodes.append(values)
        weights.append(vectors[0, :] ** 2)
    return SpectralDensity(nodes, weights, dim)


CURVATURE_CLASSES = {
    "positive-definite": "all eigenvalues > 0: a strict local minimum (locally strictly convex)",
    "positive-semidefinite": "eigenvalues >= 0 with flat directions: locally convex",
    "saddle": "eigenvalues of both signs: a saddle point (indefinite)",
    "negative-semidefinite": "eigenvalues <= 0 with flat directions: locally concave",
    "negative-definite": "all eigenvalues < 0: a strict local maximum",
    "zero": "all eigenvalues 0: flat to second order",
}


def classify_curvature(lambda_min: float, lambda_max: float, rel_tol: float = 1e-6) -> str:
    r"""The sign pattern of :math:`[\lambda_{\min}, \lambda_{\max}]`, a key of ``CURVATURE_CLASSES``.

    Values within ``rel_tol`` x :math:`\max(|\lambda_{\min}|, |\lambda_{\max}|)` of zero count as zero.
    """
    if lambda_min > lambda_max:
        raise ValueError(f"Invalid lambda_min: {lambda_min} > lambda_max={lambda_max}")
    zero = rel_tol * max(abs(lambda_min), abs(lambda_max))
    if lambda_max <= zero and lambda_min >= -zero:
        return "zero"
    if lambda_min > zero:
        return "positive-definite"
    if lambda_min >= -zero:
        return "positive-semidefinite"
    if lambda_max > zero:
        return "saddle"
    return "negative-definite" if lambda_max < -zero else "negative-semidefinite"


def stability_bound(lambda_max: float, momentum: float = 0.0) -> float:
    r"""Largest stable LR of (heavy-ball) gradient descent on a quadratic of sharpness :math:`\lambda_{\max}`:
    :math:`(2 + 2\beta)/\lambda_{\max}`; infinite when :math:`\lambda_{\max} \le 0`."""
    if not (0.0 <= momentum < 1.0):
        raise ValueError(f"Invalid momentum: {momentum} (accepted range: [0, 1))")
    return math.inf if lambda_max <= 0 else (2.0 + 2.0 * momentum) / lambda_max


@dataclass(frozen=True)
class CurvatureReport:
    """What :func:`analyze_curvature` found: eigenvalue extremes, trace, sign pattern and the stability check."""

    loss: float
    eigen: EigenEstimate
    trace: TraceEstimate | None
    sign_pattern: str
    lr: float | None
    momentum: float

    @property
    def stability_bound(self) -> float:
        """:func:`stability_bound` of the largest eigenvalue and the momentum."""
        return stability_bound(self.eigen.lambda_max, self.momentum)

    @property
    def stable(self) -> bool | None:
        """Whether ``lr`` is below the bound (``None`` without an LR)."""
        return None if self.lr is None else self.lr < self.stability_bound

    def lines(self) -> list[str]:
        """The report as printable lines."""
        eig = self.eigen
        out = [
            f"loss: {self.loss:.6g}",
            f"top-{len(eig.top)} eigenvalues: " + ", ".join(f"{v:.6g}" for v in eig.top),
            f"smallest eigenvalue: {eig.lambda_min:.6g}  (Lanczos steps: {eig.iterations}, converged: {eig.converged})",
            f"sign pattern: {self.sign_pattern} ({CURVATURE_CLASSES[self.sign_pattern]})",
        ]
        if self.trace is not None:
            out.append(f"trace (Hutchinson, {self.trace.num_probes} probes): {self.trace.value:.6g} "
                       f"± {self.trace.standard_error:.3g} (standard error)")
        out.append(self.verdict())
        return out

    def verdict(self) -> str:
        """One sentence on the learning rate: the stability bound (2+2β)/λmax, and where ``lr`` stands."""
        beta = f", momentum {self.momentum:g}" if self.momentum else ""
        sentence = f"stability bound (2+2β)/λmax{beta}: {self.stability_bound:.6g}"
        if self.lr is None:
            return sentence
        if math.isinf(self.stability_bound):
            return f"{sentence}; lr {self.lr:.6g} is stable (no positive curvature)"
        ratio = self.lr / self.stability_bound
        where = "below" if self.stable else "above"
        state = "stable" if self.stable else "beyond the edge of stability"
        return f"{sentence}; lr {self.lr:.6g} is {where} it ({ratio:.3g} x the bound): {state}"


def analyze_curvature(model: nn.Module, loss_fn: LossFn, data: Any, *, k: int = 5, lr: float | None = None,
                      momentum: float = 0.0, num_probes: int | None = 100, max_iter: int = 200, tol: float = 1e-6,
                      generator: torch.Generator | None = None) -> CurvatureReport:
    """Eigenvalue extremes (Lanczos), Hutchinson trace (skipped when ``num_probes`` is ``None``), sign pattern
    and stability check of ``lr`` for the model's loss over ``data``."""
    operator = HessianOperator(model, loss_fn, data)
    eigen = lanczos_eigenvalues(operator, operator.dim, k, max_iter=max_iter, tol=tol, dtype=operator.dtype,
                                device=operator.device, generator=generator)
    trace = None if num_probes is None else hutchinson_trace(operator, operator.dim, num_probes, dtype=operator.dtype,
                                                             device=operator.device, generator=generator)
    pattern = classify_curvature(eigen.lambda_min, eigen.lambda_max)
    return CurvatureReport(operator.loss, eigen, trace, pattern, lr, momentum)


def plot_spectrum(density: SpectralDensity, path: str | Path, *, report: CurvatureReport | None = None,
                  sigma: float | None = None, title: str = "Hessian eigenvalue density (SLQ)") -> Path:
    """Plot the SLQ density (log y) with the extreme eigenvalues of ``report`` marked; save a PNG."""
    all_nodes = np.concatenate(density.nodes)
    low, high = float(all_nodes.min()), float(all_nodes.max())
    span = max(high - low, 1e-12)
    sigma = sigma if sigma is not None else span / 200
    grid = np.linspace(low - 0.05 * span, high + 0.05 * span, 2000)
    values = density.density(grid, sigma)
    fig = Figure(figsize=(7, 4.5))
    ax = fig.add_subplot()
    ax.semilogy(grid, np.maximum(values, 1e-12), color="C0", label=f"density (σ = {sigma:.3g})")
    if report is not None:
        ax.axvline(report.eigen.lambda_max, color="C3", ls="--", label=f"λmax = {report.eigen.lambda_max:.4g}")
        ax.axvline(report.eigen.lambda_min, color="C2", ls="--", label=f"λmin = {report.eigen.lambda_min:.4g}")
        title = f"{title}\nsign pattern: {report.sign_pattern}"
    ax.set_ylim(bottom=max(1e-8, float(values.max()) * 1e-7))
    ax.set_xlabel("eigenvalue")
    ax.set_ylabel("density (log scale)")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    return atomic_savefig(fig, path)
