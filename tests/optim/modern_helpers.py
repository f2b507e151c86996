"""Shared test problem for the modern optimizers: a separable quartic whose gradient NumPy references
can evaluate exactly, and helpers to run an optimizer on it and compare trajectories."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

SHAPES: tuple[tuple[int, ...], ...] = ((6, 4), (5,), (2, 3, 4), (3, 7), ())
MATRIX_SHAPES: tuple[tuple[int, ...], ...] = ((6, 4), (3, 7), (8, 8))


@dataclass
class QuarticProblem:
    r"""f(p) = Σ_i Σ scale_i (p_i - t_i)^2 + 0.1 (p_i - t_i)^4, with random t, scale > 0 and start points."""

    starts: list[np.ndarray]
    targets: list[np.ndarray]
    scales: list[np.ndarray]

    def torch_params(self, dtype: torch.dtype = torch.float64) -> list[torch.Tensor]:
        """Fresh leaf tensors at the start point."""
        return [torch.tensor(start, dtype=dtype).requires_grad_() for start in self.starts]

    def numpy_params(self) -> list[np.ndarray]:
        """Fresh float64 arrays at the start point."""
        return [start.copy() for start in self.starts]

    def loss(self, params: Sequence[torch.Tensor]) -> torch.Tensor:
        """The objective at torch ``params``."""
        total = params[0].new_zeros(())
        for param, target, scale in zip(params, self.targets, self.scales):
            diff = param - torch.as_tensor(target, dtype=param.dtype)
            total = total + (torch.as_tensor(scale, dtype=param.dtype) * diff**2 + 0.1 * diff**4).sum()
        return total

    def numpy_grads(self, params: Sequence[np.ndarray]) -> list[np.ndarray]:
        """The exact gradient at NumPy ``params``."""
        return [2 * scale * (p - t) + 0.4 * (p - t) ** 3 for p, t, scale in zip(params, self.targets, self.scales)]


def quartic_problem(seed: int, shapes: Sequence[tuple[int, ...]] = SHAPES) -> QuarticProblem:
    """A reproducible :class:`QuarticProblem` for ``seed``."""
    rng = np.random.default_rng(seed)
    return QuarticProblem(
        starts=[rng.standard_normal(shape) for shape in shapes],
        targets=[rng.standard_normal(shape) for shape in shapes],
        scales=[rng.uniform(0.5, 2.0, shape) for shape in shapes],
    )


def train(optimizer: torch.optim.Optimizer, params: Sequence[torch.Tensor],
          loss: Callable[[Sequence[torch.Tensor]], torch.Tensor], steps: int) -> None:
    """``steps`` plain steps: zero_grad, backward, step."""
    for _ in range(steps):
        optimizer.zero_grad()
        loss(params).backward()
        optimizer.step()


def as_numpy(value: torch.Tensor | np.ndarray) -> np.ndarray:
    """A float64 NumPy copy of a tensor (detached) or array."""
    return value.detach().to(torch.float64).numpy() if torch.is_tensor(value) else np.asarray(value, dtype=np.float64)


def max_abs_diff(ours: Sequence[torch.Tensor | np.ndarray], reference: Sequence[torch.Tensor | np.ndarray]) -> float:
    """Largest elementwise |ours - reference| over all tensors; both sides must be finite (a diverged
    run must not compare equal to another diverged run)."""
    pairs = [(as_numpy(a), as_numpy(b)) for a, b in zip(ours, reference)]
    assert all(np.isfinite(a).all() and np.isfinite(b).all() for a, b in pairs), "non-finite values"
    return max(float(np.max(np.abs(a - b), initial=0.0)) for a, b in pairs)


def random_configs(seed: int, count: int, sample: Callable[[np.random.Generator], dict]) -> list[dict]:
    """``count`` hyperparameter dicts drawn by ``sample`` from one seeded generator (test ids stay stable)."""
    rng = np.random.default_rng(seed)
    return [sample(rng) for _ in range(count)]
