"""Small problems with known curvature shared by the analysis tests."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class Point(nn.Module):
    """A model that is just a point ``x`` in R^d (the variable of a quadratic)."""

    def __init__(self, start: Tensor) -> None:
        super().__init__()
        self.x = nn.Parameter(start.clone())


def random_symmetric(eigenvalues: Tensor, generator: torch.Generator) -> Tensor:
    """Q diag(eigenvalues) Q^T with a random orthogonal Q (float64)."""
    d = eigenvalues.numel()
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=generator, dtype=torch.float64))
    return q @ torch.diag(eigenvalues.to(torch.float64)) @ q.T


def quadratic_loss(matrix: Tensor):
    """loss_fn(model, shift) = 1/2 (x - shift)^T A (x - shift): Hessian A everywhere."""

    def loss_fn(model: nn.Module, shift: Tensor) -> Tensor:
        residual = model.x - shift
        return 0.5 * residual @ matrix @ residual

    return loss_fn


def small_mlp(in_features: int, hidden: int, out_features: int, dtype=torch.float64) -> nn.Module:
    """A two-layer tanh MLP (smooth, so its Hessian is well defined everywhere)."""
    return nn.Sequential(nn.Linear(in_features, hidden), nn.Tanh(), nn.Linear(hidden, out_features)).to(dtype)
