"""Shared machinery of the frontier-optimizer parity tests: random problem structures (shapes incl. 1-D,
scalars, conv weights and dimensions large enough to be blocked, two param groups, parameters that skip
steps) on the quartic of :mod:`modern_helpers`, run identically through two optimizers (or through a
NumPy transcription, which sees the same gradients and the same skips)."""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .modern_helpers import QuarticProblem, max_abs_diff, quartic_problem

SHAPE_POOL: tuple[tuple[int, ...], ...] = ((7,), (5, 4), (3, 2, 4), (4, 3, 3, 3), (), (2, 6, 5), (9, 3), (1, 5))


@dataclass
class Structure:
    """How one configuration lays out its parameters: the shapes, whether the second half of the
    parameters forms its own param group (with ``group_options``), and which (step, parameter) pairs
    get no gradient."""

    shapes: list[tuple[int, ...]]
    two_groups: bool = False
    group_options: dict[str, Any] = field(default_factory=dict)
    skip_every: int = 0  # parameter i has no gradient at step t when (t + i) % skip_every == 0 (0: never)

    def skipped(self, step: int, index: int) -> bool:
        """Whether parameter ``index`` gets no gradient at ``step`` (counted from 1)."""
        return self.skip_every > 0 and index % 2 == 1 and (step + index) % self.skip_every == 0

    def param_groups(self, params: Sequence[torch.Tensor]) -> list[dict[str, Any]] | list[torch.Tensor]:
        """The params as the optimizer receives them: one list, or two groups (the second with the overrides)."""
        if not self.two_groups:
            return list(params)
        half = len(params) // 2
        return [{"params": list(params[:half])}, {"params": list(params[half:]), **self.group_options}]

    def group_index(self, index: int) -> int:
        """The param group of parameter ``index``."""
        return int(self.two_groups and index >= len(self.shapes) // 2)


def random_structure(rng: np.random.Generator, *, extra_shapes: Sequence[tuple[int, ...]] = (),
                     allow_skips: bool = True, group_options: dict[str, Any] | None = None,
                     pool: Sequence[tuple[int, ...]] = SHAPE_POOL) -> Structure:
    """Three to five shapes from ``pool`` (plus ``extra_shapes``), maybe two groups, maybe skipped steps."""
    count = int(rng.integers(3, 6))
    shapes = [tuple(pool[i]) for i in rng.choice(len(pool), size=count, replace=False)] + list(extra_shapes)
    two_groups = bool(rng.uniform() < 0.5)
    skip_every = int(rng.choice([0, 3, 4])) if allow_skips else 0
    return Structure(shapes, two_groups, dict(group_options or {}) if two_groups else {}, skip_every)


def run_torch(make: Callable[[Any], torch.optim.Optimizer], problem: QuarticProblem, structure: Structure,
              steps: int, dtype: torch.dtype = torch.float64,
              step_fn: Callable[[torch.optim.Optimizer, Callable[[], torch.Tensor]], None] | None = None,
              ) -> tuple[list[torch.Tensor], torch.optim.Optimizer]:
    """``steps`` steps of the optimizer ``make(param_groups)`` on ``problem``; skipped parameters get
    ``grad = None``. ``step_fn(optimizer, closure)`` replaces ``optimizer.step()`` (e.g. for SAM)."""
    params = problem.torch_params(dtype)
    optimizer = make(structure.param_groups(params))
    for step in range(1, steps + 1):
        def closure(step: int = step) -> torch.Tensor:
            optimizer.zero_grad(set_to_none=True)
            loss = problem.loss(params)
            loss.backward()
            for index, param in enumerate(params):
                if structure.skipped(step, index):
                    param.grad = None
            return loss
        if step_fn is None:
            closure()
            optimizer.step()
        else:
            step_fn(optimizer, closure)
    return params, optimizer


def continue_run(optimizer: torch.optim.Optimizer, problem: QuarticProblem, structure: Structure,
                 params: Sequence[torch.Tensor], first: int, last: int) -> None:
    """Steps ``first`` to ``last`` (inclusive) of :func:`run_torch`'s schedule with an existing optimizer."""
    for step in range(first, last + 1):
        optimizer.zero_grad()
        problem.loss(params).backward()
        for index, param in enumerate(params):
            if structure.skipped(step, index):
                param.grad = None
        optimizer.step()


def assert_resumes_bit_for_bit(make: Callable[[Any], torch.optim.Optimizer], problem: QuarticProblem,
                               structure: Structure, stop: int, total: int) -> torch.optim.Optimizer:
    """Run ``stop`` steps, save the state_dict (deep copy), load it into a fresh optimizer, run to ``total``:
    parameters and every state tensor equal an uninterrupted run's, bit for bit. Returns the resumed optimizer."""
    full_params, full = run_torch(make, problem, structure, total)
    params, first = run_torch(make, problem, structure, stop)
    resumed = make(structure.param_groups(params))
    resumed.load_state_dict(copy.deepcopy(first.state_dict()))
    continue_run(resumed, problem, structure, params, stop + 1, total)
    assert all(torch.equal(a, b) for a, b in zip(params, full_params))
    for a, b in zip(resumed.state.values(), full.state.values()):
        assert set(a) == set(b) and all(torch.equal(a[key], b[key]) for key in a if torch.is_tensor(a[key]))
    return resumed


def check_numpy_parity(make: Callable[[Any], torch.optim.Optimizer], transcription: Callable[..., list[np.ndarray]],
                       config: dict[str, Any], seed: int, steps: int, tolerance: float) -> float:
    """Run ``make`` on ``config["structure"]`` and compare with ``transcription(problem, structure, steps,
    **config["kwargs"])``; returns the deviation."""
    structure = config["structure"]
    problem = sample_problem(seed, structure)
    ours, _ = run_torch(make, problem, structure, steps)
    return assert_close(ours, transcription(problem, structure, steps, **config["kwargs"]), tolerance)


def numpy_grads(problem: QuarticProblem, structure: Structure, params: Sequence[np.ndarray],
                step: int) -> list[np.ndarray | None]:
    """The exact gradients at NumPy ``params``, ``None`` for the parameters skipped at ``step``."""
    grads = problem.numpy_grads(params)
    return [None if structure.skipped(step, i) else g for i, g in enumerate(grads)]


def sample_problem(seed: int, structure: Structure) -> QuarticProblem:
    """The quartic on ``structure.shapes`` for ``seed``."""
    return quartic_problem(seed, structure.shapes)


def assert_close(ours: Sequence[torch.Tensor | np.ndarray], reference: Sequence[torch.Tensor | np.ndarray],
                 tolerance: float) -> float:
    """Assert every |ours - reference| <= tolerance * max(1, |reference|) and return the largest relative
    deviation (both sides finite)."""
    worst = 0.0
    for a, b in zip(ours, reference):
        deviation = max_abs_diff([a], [b])
        scale = max(1.0, float(np.max(np.abs(np.asarray(b.detach() if torch.is_tensor(b) else b)), initial=0.0)))
        worst = max(worst, deviation / scale)
    assert worst <= tolerance, f"deviation {worst:.3e} > {tolerance:.0e}"
    return worst
