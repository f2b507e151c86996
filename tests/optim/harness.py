"""Training problems and comparison helpers shared by the optimizer test matrix.

Two deterministic problems, each an ``nn.Module`` with ``loss(t)`` (the loss at step ``t``, data
drawn from a generator seeded by ``t``), ``frozen(t)`` (indices of parameters with
``requires_grad=False`` at step ``t``) and ``dropped(t)`` (indices whose ``.grad`` is set to ``None``
after the backward pass at step ``t``):

* :class:`MLPProblem`: Linear (with bias) -> LayerNorm -> tanh -> Linear, first layer frozen for
  the first steps and unfrozen later;
* :class:`ShapesProblem`: a 0-dim, a 1-D, a non-contiguous 2-D and a 3-D parameter (optionally a
  complex one and a float32 one), the 1-D one without gradient every third step.

Building a problem twice with the same arguments gives identical parameters, so two optimizers can
be run side by side on identical copies.
"""

from __future__ import annotations

import copy
import io
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

FREEZE_UNTIL = 5  # MLPProblem's first layer is frozen for steps t < FREEZE_UNTIL


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


class MLPProblem(nn.Module):
    """Regression with a small MLP (biases and a LayerNorm); the first Linear is frozen early on."""

    def __init__(self, dtype: torch.dtype = torch.float64) -> None:
        super().__init__()
        self.dtype = dtype
        self.net = nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8), nn.Tanh(), nn.Linear(8, 3)).to(dtype)
        generator = _generator(1234)
        with torch.no_grad():
            for param in self.net.parameters():
                param.copy_(torch.randn(param.shape, generator=generator, dtype=dtype) * 0.5 + (param.dim() == 1) * 0.1)

    def loss(self, t: int) -> Tensor:
        generator = _generator(10_000 + t)
        inputs = torch.randn(16, 6, generator=generator, dtype=self.dtype)
        targets = torch.randn(16, 3, generator=generator, dtype=self.dtype)
        return nn.functional.mse_loss(self.net(inputs), targets)

    def frozen(self, t: int) -> set[int]:
        return {0, 1} if t < FREEZE_UNTIL else set()

    def dropped(self, t: int) -> set[int]:
        return set()


class ShapesProblem(nn.Module):
    """A sum of smooth non-quadratic terms over parameters of assorted shapes and layouts."""

    DROPPED_INDEX = 1  # the 1-D parameter has no gradient when t % 3 == 1

    def __init__(self, dtype: torch.dtype = torch.float64, *, with_complex: bool = False,
                 with_float32: bool = False) -> None:
        super().__init__()
        generator = _generator(4321)
        self.dtype = dtype
        self.scalar = nn.Parameter(torch.randn((), generator=generator, dtype=dtype))
        self.vector = nn.Parameter(torch.randn(7, generator=generator, dtype=dtype))
        self.transposed = nn.Parameter(torch.randn(5, 4, generator=generator, dtype=dtype).t())
        self.cube = nn.Parameter(torch.randn(2, 3, 4, generator=generator, dtype=dtype))
        complex_dtype = torch.complex128 if dtype == torch.float64 else torch.complex64
        self.complex = nn.Parameter(torch.randn(3, generator=generator, dtype=complex_dtype)) if with_complex else None
        self.single = nn.Parameter(torch.randn(6, generator=generator, dtype=torch.float32)) if with_float32 else None
        assert not self.transposed.is_contiguous()

    def loss(self, t: int) -> Tensor:
        generator = _generator(20_000 + t)
        total = torch.zeros((), dtype=self.dtype)
        for param in self.parameters():
            real = torch.view_as_real(param) if param.is_complex() else param
            target = torch.randn(real.shape, generator=generator, dtype=real.dtype)
            scale = torch.rand(real.shape, generator=generator, dtype=real.dtype) + 0.5
            term = (scale * (real - target) ** 2).sum() + 0.3 * torch.sin(2.0 * real).sum()
            total = total + term.to(self.dtype)
        return total

    def frozen(self, t: int) -> set[int]:
        return set()

    def dropped(self, t: int) -> set[int]:
        return {self.DROPPED_INDEX} if t % 3 == 1 else set()


PROBLEMS = {"mlp": MLPProblem, "shapes": ShapesProblem}


def train(problem: nn.Module, optimizers: Sequence[torch.optim.Optimizer] | torch.optim.Optimizer,
          steps: int, start: int = 0) -> list[float]:
    """Run ``steps`` steps from step ``start``: freeze/unfreeze, backward, drop grads, step every optimizer."""
    if isinstance(optimizers, torch.optim.Optimizer):
        optimizers = [optimizers]
    params = list(problem.parameters())
    losses = []
    for t in range(start, start + steps):
        frozen, dropped = problem.frozen(t), problem.dropped(t)
        for index, param in enumerate(params):
            param.requires_grad_(index not in frozen)
            param.grad = None
        loss = problem.loss(t)
        loss.backward()
        for index in dropped:
            params[index].grad = None
        for optimizer in optimizers:
            optimizer.step()
        losses.append(loss.item())
    return losses


def relative_deviation(actual: Any, expected: Any) -> float:
    """``max|a - b| / max|b|`` for tensors (0 when both are all zero), exact comparison otherwise."""
    if not torch.is_tensor(expected):
        return 0.0 if actual == expected else float("inf")
    assert torch.is_tensor(actual), f"expected a tensor, got {type(actual).__name__}"
    assert actual.shape == expected.shape and actual.dtype == expected.dtype, (
        f"shape/dtype differ: {tuple(actual.shape)} {actual.dtype} vs {tuple(expected.shape)} {expected.dtype}"
    )
    difference = (actual.detach() - expected.detach()).abs().max().item() if actual.numel() else 0.0
    scale = expected.detach().abs().max().item() if expected.numel() else 0.0
    if difference == 0.0:
        return 0.0
    return difference / scale if scale > 0 else float("inf")


def max_deviation(
    params: Iterable[Tensor], optimizer: torch.optim.Optimizer,
    reference_params: Iterable[Tensor], reference: torch.optim.Optimizer,
) -> float:
    """Largest :func:`relative_deviation` over the parameters and every state entry; asserts that
    both optimizers hold the same state keys (with the same dtypes) for each parameter."""
    worst = 0.0
    for param, reference_param in zip(params, reference_params, strict=True):
        worst = max(worst, relative_deviation(param, reference_param))
        state, reference_state = optimizer.state.get(param, {}), reference.state.get(reference_param, {})
        assert set(state) == set(reference_state), f"state keys {sorted(state)} != {sorted(reference_state)}"
        for key, expected in reference_state.items():
            worst = max(worst, relative_deviation(state[key], expected))
    return worst


def snapshot(param: Tensor, optimizer: torch.optim.Optimizer) -> tuple[Tensor, dict[str, Any]]:
    """A deep copy of a parameter's value and its optimizer state."""
    return param.detach().clone(), copy.deepcopy(dict(optimizer.state.get(param, {})))


def same_snapshot(first: tuple[Tensor, dict[str, Any]], second: tuple[Tensor, dict[str, Any]]) -> bool:
    """Whether two :func:`snapshot` results are bitwise identical."""
    (value, state), (other_value, other_state) = first, second
    if not torch.equal(value, other_value) or set(state) != set(other_state):
        return False
    return all(
        torch.equal(state[key], other_state[key]) if torch.is_tensor(state[key]) else state[key] == other_state[key]
        for key in state
    )


def save_and_load(state_dict: dict[str, Any]) -> dict[str, Any]:
    """Round-trip a state_dict through ``torch.save`` / ``torch.load(weights_only=True)``."""
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)
