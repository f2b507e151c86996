"""Lookahead (Zhang et al. 2019): the slow-weights formula, its state_dict, and use with schedulers."""

from __future__ import annotations

import copy

import pytest
import torch

from optimlab.optim import Adam, Lion, Lookahead, state_bytes

from .harness import MLPProblem, save_and_load, train


@pytest.mark.parametrize(("inner", "k", "alpha"), [
    (lambda params: torch.optim.SGD(params, lr=0.05, momentum=0.9), 5, 0.5),
    (lambda params: Adam(params, lr=0.01), 3, 0.8),
    (lambda params: Lion(params, lr=3e-3, weight_decay=0.1), 4, 0.3),
])
def test_slow_weights_follow_the_formula(inner, k: int, alpha: float) -> None:
    """Run the inner optimizer alone for k steps from phi and compare: phi' = phi + alpha (theta_k - phi),
    and after the sync the fast weights are phi'. Two cycles, the inner state carrying over."""
    problem, reference_problem = MLPProblem(), MLPProblem()
    optimizer = Lookahead(inner(problem.parameters()), k=k, alpha=alpha)
    reference = inner(reference_problem.parameters())
    slow = [p.detach().clone() for p in reference_problem.parameters()]
    for cycle in range(2):
        train(problem, optimizer, k - 1, start=cycle * k)
        train(reference_problem, reference, k - 1, start=cycle * k)
        for ours, fast in zip(problem.parameters(), reference_problem.parameters()):
            # between syncs Lookahead is the inner optimizer (up to the rounding of the previous sync)
            torch.testing.assert_close(ours.detach(), fast.detach(), rtol=1e-13, atol=1e-13)
        train(problem, optimizer, 1, start=cycle * k + k - 1)
        train(reference_problem, reference, 1, start=cycle * k + k - 1)
        with torch.no_grad():
            for index, fast in enumerate(reference_problem.parameters()):
                slow[index] = slow[index] + alpha * (fast - slow[index])
                fast.copy_(slow[index])
        for ours, expected, param in zip(problem.parameters(), slow, problem.parameters()):
            torch.testing.assert_close(ours.detach(), expected, rtol=1e-14, atol=1e-14)
            torch.testing.assert_close(optimizer.state[param]["slow_param"], expected, rtol=1e-14, atol=1e-14)


def test_state_dict_round_trip_resumes_bitwise() -> None:
    def build(problem):
        return Lookahead(torch.optim.SGD(problem.parameters(), lr=0.05, momentum=0.9), k=4, alpha=0.6)

    problem = MLPProblem()
    optimizer = build(problem)
    train(problem, optimizer, 7)  # mid-cycle
    resumed_problem = MLPProblem()
    resumed_problem.load_state_dict(problem.state_dict())
    resumed = Lookahead(torch.optim.SGD(resumed_problem.parameters(), lr=0.05, momentum=0.9), k=2, alpha=0.1)
    resumed.load_state_dict(save_and_load(optimizer.state_dict()))
    assert (resumed.k, resumed.alpha, resumed.inner_steps) == (4, 0.6, 7)
    train(problem, optimizer, 9, start=7)
    train(resumed_problem, resumed, 9, start=7)
    for ours, reference in zip(resumed_problem.parameters(), problem.parameters()):
        assert torch.equal(ours, reference)
        assert torch.equal(resumed.state[ours]["slow_param"], optimizer.state[reference]["slow_param"])
    copied = copy.deepcopy(optimizer)
    assert copied.param_groups is copied.optimizer.param_groups and copied.k == 4


def test_shares_param_groups_with_schedulers_and_reports_state_bytes() -> None:
    problem = MLPProblem()
    inner = torch.optim.Adam(problem.parameters(), lr=0.01)
    optimizer = Lookahead(inner, k=2)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    train(problem, optimizer, 1, start=5)  # MLPProblem's first layer trains from step 5 on
    scheduler.step()
    assert inner.param_groups[0]["lr"] == optimizer.param_groups[0]["lr"] == 0.005
    count = sum(p.numel() for p in problem.parameters())
    assert state_bytes(optimizer) == count * 8 * 3  # float64: slow copy + Adam's two moments


@pytest.mark.parametrize(("kwargs", "error", "match"), [
    ({"k": 0}, ValueError, "k"),
    ({"k": 2.5}, ValueError, "k"),
    ({"alpha": 0.0}, ValueError, "alpha"),
    ({"alpha": 1.5}, ValueError, "alpha"),
])
def test_invalid_arguments_raise(kwargs: dict, error: type, match: str) -> None:
    inner = torch.optim.SGD([torch.nn.Parameter(torch.ones(2))], lr=0.1)
    with pytest.raises(error, match=match):
        Lookahead(inner, **kwargs)


def test_rejects_non_optimizer_and_foreign_state_dict() -> None:
    with pytest.raises(TypeError, match="optimizer"):
        Lookahead([torch.nn.Parameter(torch.ones(2))])  # type: ignore[arg-type]
    optimizer = Lookahead(torch.optim.SGD([torch.nn.Parameter(torch.ones(2))], lr=0.1))
    with pytest.raises(ValueError, match="Lookahead state dict"):
        optimizer.load_state_dict(torch.optim.SGD([torch.nn.Parameter(torch.ones(2))], lr=0.1).state_dict())
