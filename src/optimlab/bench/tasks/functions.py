"""The test functions of :mod:`optimlab.bench.problems` as benchmark tasks.

The model is a single parameter vector started at the problem's start point (float64). The training
loss is the function itself; the reported metric is the optimality gap :math:`f(x) - f^*`, so the
target "gap <= 1e-3" means the same on every function, whatever its minimum value. The tuning range's
upper learning-rate bound is widened tenfold (``lr_widen``): Adam-like methods move about ``lr`` per
coordinate per step, and the functions' start points are several units from their minima.
"""

from __future__ import annotations

import itertools

import torch

from optimlab.bench.problems import Problem, get_problem
from optimlab.bench.tasks.base import TaskInstance, TaskSpec

__all__ = ["FUNCTION_TASKS", "function_task"]


class PointModel(torch.nn.Module):
    """A module holding one coordinate vector ``x`` as its only parameter."""

    def __init__(self, start: torch.Tensor) -> None:
        super().__init__()
        self.x = torch.nn.Parameter(start.clone())


def _build(problem: Problem) -> TaskInstance:
    model = PointModel(problem.start_tensor(torch.float64))

    def loss(_batch: object) -> torch.Tensor:
        return problem(model.x)

    def evaluate() -> dict[str, float]:
        with torch.no_grad():
            value = float(problem(model.x))
        return {"loss": value, "gap": value - problem.min_value}

    return TaskInstance(
        model=model,
        loss=loss,
        batches=itertools.repeat(None),
        evaluate=evaluate,
        point=lambda: [float(v) for v in model.x.detach()],
    )


def function_task(problem_name: str, steps: int, quick_steps: int, target: float = 1e-3) -> TaskSpec:
    """A task over the named problem; the seed is ignored (the start point is fixed)."""
    problem = get_problem(problem_name)
    return TaskSpec(
        name=problem.name,
        description=f"test function: {problem.description}",
        metric="gap",
        mode="min",
        target=target,
        steps=steps,
        quick_steps=quick_steps,
        eval_every=1,
        family="function",
        build=lambda seed: _build(problem),
        lr_widen=10.0,
    )


FUNCTION_TASKS: list[TaskSpec] = [
    function_task("rosenbrock", steps=3000, quick_steps=1500),
    function_task("rastrigin", steps=500, quick_steps=300),
    function_task("beale", steps=1500, quick_steps=800),
    function_task("quadratic", steps=500, quick_steps=300),
    function_task("nonconvex-10d", steps=1000, quick_steps=500),
]
