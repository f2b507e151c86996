"""Properties every optimizer in the matrix must have, checked without any reference implementation.

Parametrized over ``ALL_CASES``: the multi-tensor path equals the per-tensor path; param groups
behave like separate optimizers; parameters without gradient (dropped or frozen) are left alone;
state_dict round trips, deepcopy, repr, closures, tensor learning rates; a convex quadratic goes
down, and up with ``maximize=True``.
"""

from __future__ import annotations

import copy
import inspect

import pytest
import torch

from .cases import ALL_CASES, Case
from .harness import (
    FREEZE_UNTIL,
    MLPProblem,
    ShapesProblem,
    max_deviation,
    relative_deviation,
    same_snapshot,
    save_and_load,
    snapshot,
    train,
)

STEPS = 20


def _accepts(case: Case, name: str) -> bool:
    return name in inspect.signature(case.optimizer.__init__).parameters


def _default(case: Case, name: str):
    return case.kwargs.get(name, inspect.signature(case.optimizer.__init__).parameters[name].default)


def _ids(case: Case) -> str:
    return case.id


@pytest.mark.parametrize("case", ALL_CASES, ids=_ids)
def test_foreach_equals_per_tensor(case: Case) -> None:
    """Same trajectory and state through both paths, including a float32 parameter among float64
    ones (the multi-tensor path batches by device and dtype) and a parameter that misses steps."""
    if not _accepts(case, "foreach"):
        pytest.skip("no foreach option")
    results = {}
    for foreach in (False, True):
        problem = ShapesProblem(with_float32=True)
        optimizer = case.optimizer(problem.parameters(), **{**case.kwargs, "foreach": foreach})
        train(problem, optimizer, STEPS)
        results[foreach] = (problem, optimizer)
    (single_problem, single), (multi_problem, multi) = results[False], results[True]
    single_params, multi_params = list(single_problem.parameters()), list(multi_problem.parameters())
    assert max_deviation(multi_params[:-1], multi, single_params[:-1], single) <= case.tolerance
    assert max_deviation(multi_params[-1:], multi, single_params[-1:], single) <= case.float32_tolerance


@pytest.mark.parametrize("case", [c for c in ALL_CASES if c.per_parameter], ids=_ids)
def test_param_groups_behave_like_separate_optimizers(case: Case) -> None:
    """Two groups with different hyperparameters == two optimizers, one per group."""
    lr = _default(case, "lr")
    second_group = {"lr": lr * 0.3}
    if _accepts(case, "weight_decay"):
        second_group["weight_decay"] = 0.05
    grouped_problem, split_problem = ShapesProblem(), ShapesProblem()
    grouped_params, split_params = list(grouped_problem.parameters()), list(split_problem.parameters())
    grouped = case.optimizer([{"params": grouped_params[:2]}, {"params": grouped_params[2:], **second_group}],
                             **case.kwargs)
    first = case.optimizer(split_params[:2], **case.kwargs)
    second = case.optimizer(split_params[2:], **{**case.kwargs, **second_group})
    train(grouped_problem, grouped, STEPS)
    train(split_problem, [first, second], STEPS)
    assert grouped.param_groups[1]["lr"] == second_group["lr"]
    assert max_deviation(grouped_params[:2], grouped, split_params[:2], first) == 0.0
    assert max_deviation(grouped_params[2:], grouped, split_params[2:], second) == 0.0


@pytest.mark.parametrize("case", [c for c in ALL_CASES if c.per_parameter], ids=_ids)
def test_parameter_without_grad_is_untouched(case: Case) -> None:
    """A parameter whose grad is None at a step keeps its value and state bitwise; the others move."""
    problem = ShapesProblem()
    params = list(problem.parameters())
    optimizer = case.optimizer(params, **case.kwargs)
    dropped_steps = 0
    for t in range(STEPS):
        before = [snapshot(param, optimizer) for param in params]
        train(problem, optimizer, 1, start=t)
        after = [snapshot(param, optimizer) for param in params]
        for index in range(len(params)):
            untouched = same_snapshot(before[index], after[index])
            assert untouched == (index in problem.dropped(t)), (t, index)
        dropped_steps += bool(problem.dropped(t))
    assert dropped_steps >= 5


@pytest.mark.parametrize("case", [c for c in ALL_CASES if c.per_parameter], ids=_ids)
def test_frozen_layer_unfrozen_later(case: Case) -> None:
    """A layer with requires_grad=False keeps value and state while frozen and trains once unfrozen,
    its state then starting from scratch (step count = steps since unfreezing, where kept)."""
    problem = MLPProblem()
    params = list(problem.parameters())
    optimizer = case.optimizer(params, **case.kwargs)
    frozen_before = [snapshot(params[index], optimizer) for index in problem.frozen(0)]
    train(problem, optimizer, FREEZE_UNTIL)
    for index, before in zip(sorted(problem.frozen(0)), frozen_before):
        assert same_snapshot(before, snapshot(params[index], optimizer))
    train(problem, optimizer, STEPS - FREEZE_UNTIL, start=FREEZE_UNTIL)
    for index, before in zip(sorted(problem.frozen(0)), frozen_before):
        assert not torch.equal(before[0], params[index])
        step = optimizer.state[params[index]].get("step")
        if step is not None:
            assert float(step) == STEPS - FREEZE_UNTIL
    later_step = optimizer.state[params[-1]].get("step")
    if later_step is not None:
        assert float(later_step) == STEPS


@pytest.mark.parametrize("case", ALL_CASES, ids=_ids)
def test_state_dict_round_trip(case: Case) -> None:
    """10 steps, torch.save / torch.load(weights_only=True) of the state_dict into a fresh optimizer,
    10 more steps: bitwise equal to 20 uninterrupted steps."""
    problem = MLPProblem()
    optimizer = case.optimizer(problem.parameters(), **case.kwargs)
    train(problem, optimizer, 10)
    resumed_problem = MLPProblem()
    resumed_problem.load_state_dict(problem.state_dict())
    resumed = case.optimizer(resumed_problem.parameters(), **case.kwargs)
    resumed.load_state_dict(save_and_load(optimizer.state_dict()))
    train(resumed_problem, resumed, 10, start=10)
    train(problem, optimizer, 10, start=10)
    assert max_deviation(resumed_problem.parameters(), resumed, problem.parameters(), optimizer) == 0.0


@pytest.mark.parametrize("case", ALL_CASES, ids=_ids)
def test_deepcopy_continues_identically_and_independently(case: Case) -> None:
    problem = ShapesProblem()
    optimizer = case.optimizer(problem.parameters(), **case.kwargs)
    train(problem, optimizer, 5)
    problem_copy, optimizer_copy = copy.deepcopy((problem, optimizer))
    assert all(p is q for p, q in zip(optimizer_copy.param_groups[0]["params"], problem_copy.parameters()))
    original = [snapshot(param, optimizer) for param in problem.parameters()]
    train(problem_copy, optimizer_copy, 5, start=5)
    assert all(same_snapshot(before, snapshot(param, optimizer))
               for before, param in zip(original, problem.parameters()))
    train(problem, optimizer, 5, start=5)
    assert max_deviation(problem_copy.parameters(), optimizer_copy, problem.parameters(), optimizer) == 0.0


@pytest.mark.parametrize("case", ALL_CASES, ids=_ids)
def test_repr_shows_hyperparameters(case: Case) -> None:
    optimizer = case.optimizer([torch.nn.Parameter(torch.zeros(3))], **case.kwargs)
    text = repr(optimizer)
    assert text.startswith(case.optimizer.__name__)
    for name, value in optimizer.defaults.items():
        assert f"{name}: {value}" in text


@pytest.mark.parametrize("case", ALL_CASES, ids=_ids)
def test_step_returns_the_closure_loss(case: Case) -> None:
    problem = ShapesProblem()
    optimizer = case.optimizer(problem.parameters(), **case.kwargs)
    returned = []

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = problem.loss(0)
        loss.backward()
        returned.append(loss)
        return loss

    assert optimizer.step(closure) is returned[0]
    assert optimizer.step() is None


@pytest.mark.parametrize("case", [c for c in ALL_CASES if not torch.is_tensor(c.kwargs.get("lr"))], ids=_ids)
def test_tensor_lr_equals_float_lr(case: Case) -> None:
    """``lr`` as a 0-dim tensor gives the same trajectory as the same value as a float."""
    lr = float(_default(case, "lr"))
    results = []
    for value in (lr, torch.tensor(lr, dtype=torch.float64)):
        problem = ShapesProblem()
        optimizer = case.optimizer(problem.parameters(), **{**case.kwargs, "lr": value})
        train(problem, optimizer, 10)
        results.append((problem, optimizer))
    (float_problem, float_opt), (tensor_problem, tensor_opt) = results
    assert max_deviation(tensor_problem.parameters(), tensor_opt, float_problem.parameters(), float_opt) == 0.0


def _quadratic_run(case: Case, maximize: bool) -> tuple[float, float]:
    """Start and end values of f(x) = 1/2 x^T A x - b^T x (A SPD, eigenvalues in [0.5, 2]) after 30 steps."""
    generator = torch.Generator().manual_seed(99)
    basis, _ = torch.linalg.qr(torch.randn(6, 6, generator=generator, dtype=torch.float64))
    matrix = basis @ torch.diag(torch.linspace(0.5, 2.0, 6, dtype=torch.float64)) @ basis.T
    shift = torch.randn(6, generator=generator, dtype=torch.float64)
    x = torch.nn.Parameter(3.0 * torch.randn(6, generator=generator, dtype=torch.float64))

    def f() -> torch.Tensor:
        return 0.5 * x @ matrix @ x - shift @ x

    kwargs = {**case.kwargs, "maximize": maximize} if _accepts(case, "maximize") else dict(case.kwargs)
    optimizer = case.optimizer([x], **kwargs)
    start = f().item()
    for _ in range(30):
        optimizer.zero_grad()
        f().backward()
        optimizer.step()
    return start, f().item()


@pytest.mark.parametrize("case", ALL_CASES, ids=_ids)
def test_convex_quadratic_decreases(case: Case) -> None:
    start, end = _quadratic_run(case, maximize=False)
    assert end < start - 1e-3 * abs(start)


@pytest.mark.parametrize("case", [c for c in ALL_CASES if _accepts(c, "maximize")], ids=_ids)
def test_maximize_increases_the_convex_quadratic(case: Case) -> None:
    start, end = _quadratic_run(case, maximize=True)
    assert end > start + 1e-3 * abs(start)


def test_relative_deviation_detects_differences() -> None:
    """The comparison helper the matrix relies on is not blind."""
    reference = torch.tensor([1.0, -2.0, 4.0], dtype=torch.float64)
    assert relative_deviation(reference.clone(), reference) == 0.0
    assert relative_deviation(reference + torch.tensor([0.0, 0.0, 4e-9], dtype=torch.float64), reference) == pytest.approx(1e-9)
    assert relative_deviation(torch.ones(2), torch.zeros(2)) == float("inf")
    with pytest.raises(AssertionError, match="dtype"):
        relative_deviation(reference.float(), reference)
