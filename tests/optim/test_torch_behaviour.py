"""Regression tests for behaviour torch's optimizer suites expect, one per bug they found; the checks that
apply to every optimizer are generated from the registry in ``test_registered.py``."""

from __future__ import annotations

import copy

import pytest
import torch

from optimlab.optim import SGD, Adafactor, Adam, NAdam

from .harness import ShapesProblem, max_deviation, train


def test_nadam_load_state_dict_tolerates_a_hook_that_stores_a_flag_in_state() -> None:
    """A load-state-dict post-hook that stores a non-dict entry in ``optimizer.state`` (a flag): loading works,
    and optimlab's own post-load fix-up (``mu_product`` back to the scalar dtype) ran before the user's hook."""
    problem = ShapesProblem()
    optimizer = NAdam(problem.parameters(), lr=0.01)
    train(problem, optimizer, 3)
    state_dict = optimizer.state_dict()
    resumed = NAdam(ShapesProblem().parameters(), lr=0.01)
    seen = []

    def hook(opt: torch.optim.Optimizer) -> None:
        seen.extend(state["mu_product"].dtype for state in opt.state.values() if isinstance(state, dict))
        opt.state["resumed"] = True

    resumed.register_load_state_dict_post_hook(hook)
    resumed.load_state_dict(state_dict)
    assert resumed.state["resumed"] is True
    assert seen and set(seen) == {torch.float32}


def test_load_state_dict_fixup_survives_deepcopy() -> None:
    """The post-load fix-up is a hook, which ``deepcopy`` drops: it must be registered again."""
    problem = ShapesProblem()
    optimizer = copy.deepcopy(NAdam(problem.parameters(), lr=0.01))
    train(problem, optimizer, 2)
    state_dict = optimizer.state_dict()
    for state in state_dict["state"].values():
        state["mu_product"] = state["mu_product"].double()
    optimizer.load_state_dict(state_dict)
    assert all(state["mu_product"].dtype == torch.float32 for state in optimizer.state.values())


@pytest.mark.parametrize("foreach", [None, False, True])
def test_adafactor_accepts_foreach_like_torch(foreach: bool | None) -> None:
    """torch's Adafactor takes ``foreach``; optimlab's has one (per-tensor) path, which every value runs."""
    results = []
    for value in (foreach, None):
        problem = ShapesProblem(with_complex=False)
        optimizer = Adafactor(problem.parameters(), lr=0.05, foreach=value)
        assert optimizer.defaults["foreach"] is value
        train(problem, optimizer, 5)
        results.append((problem, optimizer))
    (a, a_opt), (b, b_opt) = results
    assert max_deviation(a.parameters(), a_opt, b.parameters(), b_opt) == 0.0


def test_sgd_without_momentum_keeps_no_per_parameter_state() -> None:
    ours, reference = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    ours_opt, reference_opt = SGD(ours.parameters(), lr=0.1), torch.optim.SGD(reference.parameters(), lr=0.1)
    for model, opt in ((ours, ours_opt), (reference, reference_opt)):
        model(torch.ones(4, 3)).sum().backward()
        opt.step()
    assert ours_opt.state_dict()["state"] == reference_opt.state_dict()["state"] == {}
    assert len(ours_opt.state) == 0


def test_integer_parameters_rejected_at_construction() -> None:
    with pytest.raises(ValueError, match=r"Invalid params: .*floating-point or complex.*torch\.int64"):
        Adam([torch.zeros(3, dtype=torch.long)])
