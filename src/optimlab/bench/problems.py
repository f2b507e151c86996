"""Classic optimization test functions, each with its start point and known minimum.

Every function takes a tensor ``x`` whose last dimension holds the coordinates and returns the loss
reduced over that dimension, so the same function evaluates one point (shape ``(dim,)`` → scalar)
or a whole grid for contour plots (shape ``(H, W, dim)`` → ``(H, W)``).

Problems are looked up by name with :func:`get_problem`; :func:`list_problems` lists the names.
Two-dimensional problems carry plot bounds for contour pictures.

Example:
    >>> problem = get_problem("rosenbrock")
    >>> x = problem.start_tensor().requires_grad_()
    >>> loss = problem(x)
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "Problem",
    "rosenbrock",
    "rastrigin",
    "beale",
    "ill_conditioned_quadratic",
    "nonconvex_sum",
    "get_problem",
    "list_problems",
]

Bounds2D = tuple[tuple[float, float], tuple[float, float]]


@dataclass(frozen=True)
class Problem:
    """A test function with everything needed to run and picture an optimizer on it.

    Attributes:
        name: registry name, e.g. ``"rosenbrock"``.
        dim: number of coordinates.
        start: the conventional start point.
        minima: the global minimiser(s).
        min_value: the loss at the global minimum.
        fn: ``x -> loss`` over the last dimension of ``x`` (see the module docstring).
        bounds: ``((x_low, x_high), (y_low, y_high))`` for contour plots of 2-D problems, else ``None``.
        description: the formula in one line, with its reference.
    """

    name: str
    dim: int
    start: tuple[float, ...]
    minima: tuple[tuple[float, ...], ...]
    min_value: float
    fn: Callable[[Tensor], Tensor] = field(repr=False)
    bounds: Bounds2D | None = None
    description: str = ""

    def __call__(self, x: Tensor) -> Tensor:
        """Evaluate the loss at ``x`` (last dimension = coordinates)."""
        if x.shape[-1] != self.dim:
            raise ValueError(f"Invalid x for problem {self.name!r}: last dimension {x.shape[-1]}, expected {self.dim}")
        return self.fn(x)

    def start_tensor(self, dtype: torch.dtype = torch.float64) -> Tensor:
        """A fresh tensor holding :attr:`start`."""
        return torch.tensor(self.start, dtype=dtype)

    def distance_to_minimum(self, x: Tensor) -> float:
        """Euclidean distance from ``x`` to the nearest of :attr:`minima`."""
        point = x.detach().to(torch.float64).reshape(-1)
        return min(float(torch.linalg.vector_norm(point - torch.tensor(m, dtype=torch.float64))) for m in self.minima)


def _rosenbrock_fn(a: float, b: float) -> Callable[[Tensor], Tensor]:
    def fn(x: Tensor) -> Tensor:
        head, tail = x[..., :-1], x[..., 1:]
        return ((a - head) ** 2 + b * (tail - head**2) ** 2).sum(-1)

    return fn


def rosenbrock(a: float = 1.0, b: float = 100.0, start: tuple[float, float] = (-2.0, 2.0)) -> Problem:
    r"""Rosenbrock's banana valley (Rosenbrock, 1960).

    :math:`f(x, y) = (a - x)^2 + b\,(y - x^2)^2`, minimum 0 at :math:`(a, a^2)`.
    """
    if b <= 0:
        raise ValueError(f"Invalid b: {b} (accepted range: > 0)")
    return Problem(
        name="rosenbrock",
        dim=2,
        start=tuple(float(s) for s in start),
        minima=((a, a * a),),
        min_value=0.0,
        fn=_rosenbrock_fn(a, b),
        bounds=((-2.5, 2.5), (-1.5, 4.0)),
        description=f"(a - x)^2 + b (y - x^2)^2 with a={a:g}, b={b:g} (Rosenbrock 1960)",
    )


def rastrigin(amplitude: float = 10.0, start: tuple[float, float] = (-2.0, 3.5)) -> Problem:
    r"""Rastrigin's highly multimodal function (Rastrigin, 1974).

    :math:`f(x) = A\,n + \sum_i \left(x_i^2 - A \cos(2\pi x_i)\right)`, minimum 0 at the origin.
    """
    if amplitude < 0:
        raise ValueError(f"Invalid amplitude: {amplitude} (accepted range: >= 0)")

    def fn(x: Tensor) -> Tensor:
        return amplitude * x.shape[-1] + (x**2 - amplitude * torch.cos(2 * math.pi * x)).sum(-1)

    return Problem(
        name="rastrigin",
        dim=2,
        start=tuple(float(s) for s in start),
        minima=((0.0, 0.0),),
        min_value=0.0,
        fn=fn,
        bounds=((-5.12, 5.12), (-5.12, 5.12)),
        description=f"A n + sum(x^2 - A cos(2 pi x)) with A={amplitude:g} (Rastrigin 1974)",
    )


def _beale_fn(x: Tensor) -> Tensor:
    u, v = x[..., 0], x[..., 1]
    return (1.5 - u + u * v) ** 2 + (2.25 - u + u * v**2) ** 2 + (2.625 - u + u * v**3) ** 2


def beale(start: tuple[float, float] = (1.0, 1.5)) -> Problem:
    r"""Beale's function (Beale, 1958).

    :math:`f(x, y) = (1.5 - x + xy)^2 + (2.25 - x + xy^2)^2 + (2.625 - x + xy^3)^2`, minimum 0 at (3, 0.5).
    """
    return Problem(
        name="beale",
        dim=2,
        start=tuple(float(s) for s in start),
        minima=((3.0, 0.5),),
        min_value=0.0,
        fn=_beale_fn,
        bounds=((-4.5, 4.5), (-4.5, 4.5)),
        description="(1.5 - x + xy)^2 + (2.25 - x + xy^2)^2 + (2.625 - x + xy^3)^2 (Beale 1958)",
    )


def _householder(dim: int) -> Tensor:
    """The reflection :math:`Q = I - 2 v v^T / \\|v\\|^2` with :math:`v = (1, 2, ..., n)`: orthogonal and not axis-aligned."""
    v = torch.arange(1, dim + 1, dtype=torch.float64)
    return torch.eye(dim, dtype=torch.float64) - 2.0 * torch.outer(v, v) / v.dot(v)


def ill_conditioned_quadratic(condition_number: float = 100.0, dim: int = 2,
                              start: tuple[float, ...] | None = None) -> Problem:
    r"""A rotated quadratic bowl with a chosen condition number.

    :math:`f(x) = \tfrac12 x^T Q \Lambda Q^T x` with eigenvalues :math:`\lambda_i` log-spaced from 1 to
    :math:`\kappa` (the condition number) and :math:`Q` a fixed Householder reflection, so the valley is
    not aligned with the axes (which would favour per-coordinate methods). Minimum 0 at the origin.
    """
    if not (condition_number >= 1.0) or math.isinf(condition_number):
        raise ValueError(f"Invalid condition_number: {condition_number} (accepted range: finite and >= 1)")
    if dim < 1:
        raise ValueError(f"Invalid dim: {dim} (accepted range: >= 1)")
    eigenvalues = torch.logspace(0.0, math.log10(condition_number), dim, dtype=torch.float64)
    rotation = _householder(dim)
    hessian = rotation @ torch.diag(eigenvalues) @ rotation.T

    def fn(x: Tensor) -> Tensor:
        h = hessian.to(x.dtype)
        return 0.5 * ((x @ h) * x).sum(-1)

    if start is None:
        start = tuple(1.5 if i % 2 == 0 else -1.5 for i in range(dim))
    if len(start) != dim:
        raise ValueError(f"Invalid start: {len(start)} coordinates, expected dim={dim}")
    return Problem(
        name="quadratic",
        dim=dim,
        start=tuple(float(s) for s in start),
        minima=(tuple(0.0 for _ in range(dim)),),
        min_value=0.0,
        fn=fn,
        bounds=((-2.0, 2.0), (-2.0, 2.0)) if dim == 2 else None,
        description=f"0.5 x^T Q diag(logspace(1, kappa)) Q^T x, kappa={condition_number:g}, dim={dim}",
    )


def _nonconvex_terms(x: Any, lib: Any) -> Any:
    return (x - lib.arange(x.shape[-1], dtype=x.dtype)) ** 2 + 0.1 * lib.sin(10 * x) ** 2 + 0.01 * x**4


def _nonconvex_fn(x: Tensor) -> Tensor:
    return _nonconvex_terms(x, torch).sum(-1)


def _nonconvex_minimum(dim: int) -> tuple[tuple[float, ...], float]:
    """The global minimum of the separable sum: per coordinate, a dense grid search then Newton polishing."""
    coords, total = [], 0.0
    for i in range(dim):
        grid = np.linspace(i - 4.0, i + 4.0, 160_001)
        values = (grid - i) ** 2 + 0.1 * np.sin(10 * grid) ** 2 + 0.01 * grid**4
        t = float(grid[int(np.argmin(values))])
        for _ in range(50):  # Newton on f'(t) = 0 from the grid minimiser
            grad = 2 * (t - i) + np.sin(20 * t) + 0.04 * t**3
            curvature = 2 + 20 * np.cos(20 * t) + 0.12 * t**2
            t -= grad / curvature
        coords.append(float(t))
        total += (t - i) ** 2 + 0.1 * math.sin(10 * t) ** 2 + 0.01 * t**4
    return tuple(coords), float(total)


def nonconvex_sum(dim: int = 10, seed: int = 0) -> Problem:
    r"""The seed's 10-D nonconvex sum.

    :math:`f(x) = \sum_i (x_i - i)^2 + 0.1 \sum_i \sin^2(10 x_i) + 0.01 \sum_i x_i^4`, with
    :math:`i = 0, ..., n-1`. Separable, so its global minimum is found coordinate by coordinate (it is near,
    not at, :math:`x_i = i` because of the quartic term). The start is a seeded standard normal draw.
    """
    if dim < 1:
        raise ValueError(f"Invalid dim: {dim} (accepted range: >= 1)")
    generator = torch.Generator().manual_seed(seed)
    start = torch.randn(dim, generator=generator, dtype=torch.float64)
    minimum, min_value = _nonconvex_minimum(dim)
    return Problem(
        name="nonconvex-10d" if dim == 10 else f"nonconvex-{dim}d",
        dim=dim,
        start=tuple(float(s) for s in start),
        minima=(minimum,),
        min_value=min_value,
        fn=_nonconvex_fn,
        bounds=None,
        description="sum((x - arange(n))^2) + 0.1 sum(sin(10x)^2) + 0.01 sum(x^4)",
    )


_FACTORIES: dict[str, Callable[..., Problem]] = {
    "rosenbrock": rosenbrock,
    "rastrigin": rastrigin,
    "beale": beale,
    "quadratic": ill_conditioned_quadratic,
    "nonconvex-10d": nonconvex_sum,
}


def list_problems() -> list[str]:
    """Sorted names accepted by :func:`get_problem`."""
    return sorted(_FACTORIES)


def get_problem(name: str, **kwargs: Any) -> Problem:
    """Build the problem called ``name``; ``kwargs`` go to its factory (e.g. ``condition_number=1000``).

    An unknown name raises ``KeyError`` listing the valid ones.
    """
    try:
        factory = _FACTORIES[name.lower()]
    except KeyError:
        close = difflib.get_close_matches(name.lower(), _FACTORIES, n=2, cutoff=0.5)
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        raise KeyError(f"Unknown problem {name!r}.{hint} Valid names: {', '.join(list_problems())}") from None
    return factory(**kwargs)
