"""A trial evaluates schedule-free optimizers on their averaged (eval-mode) weights."""

from __future__ import annotations

import pytest
import torch

from optimlab.bench.tasks import get_task
from optimlab.bench.trial import TrialConfig, run_trial
from optimlab.optim import ScheduleFreeAdamW, create_optimizer
from optimlab.optim.modes import eval_weights, has_modes, set_mode

STEPS = 30
LR = 0.05


def _train_by_hand(task: str, steps: int) -> tuple[torch.optim.Optimizer, object]:
    """The trial's training loop without its evaluations: same task instance, optimizer and steps."""
    instance = get_task(task).build(0)
    optimizer = create_optimizer([p for p in instance.model.parameters() if p.requires_grad],
                                 "schedule-free-adamw", lr=LR)
    optimizer.train()
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        instance.loss(next(instance.batches)).backward()
        optimizer.step()
    return optimizer, instance


@pytest.mark.parametrize("task", ["quadratic", "rosenbrock"])
def test_trial_metric_and_final_point_use_the_eval_weights(task: str) -> None:
    record = run_trial(TrialConfig(task=task, optimizer="schedule-free-adamw", params={"lr": LR}, steps=STEPS,
                                   phase="final"))
    metric = get_task(task).metric
    optimizer, instance = _train_by_hand(task, STEPS)
    train_metric, train_point = instance.evaluate()[metric], instance.point()
    optimizer.eval()
    eval_metric, eval_point = instance.evaluate()[metric], instance.point()
    # the trial switches modes at each of its evaluations; each switch rounds y <-> x in float64
    assert record.final_metric == pytest.approx(eval_metric, rel=1e-9, abs=1e-12)
    assert record.artifacts["final_point"] == pytest.approx(eval_point, rel=1e-9, abs=1e-12)
    # the two points differ enough for the comparison above to tell them apart
    assert abs(train_metric - eval_metric) > 1e-4 * max(abs(eval_metric), 1e-6)
    assert max(abs(a - b) for a, b in zip(train_point, eval_point)) > 1e-4


def test_eval_weights_switches_and_restores_train_mode() -> None:
    param = torch.nn.Parameter(torch.tensor([1.0, -2.0], dtype=torch.float64))
    optimizer = ScheduleFreeAdamW([param], lr=0.1)
    for _ in range(5):
        param.grad = 2 * param.detach()
        optimizer.step()
    train_weights = param.detach().clone()
    with eval_weights(optimizer):
        assert optimizer.param_groups[0]["train_mode"] is False
        assert not torch.allclose(param, train_weights)
    assert optimizer.param_groups[0]["train_mode"] is True
    torch.testing.assert_close(param.detach(), train_weights, rtol=1e-12, atol=1e-15)
    with pytest.raises(RuntimeError, match="inside"), eval_weights(optimizer):
        raise RuntimeError("inside")
    assert optimizer.param_groups[0]["train_mode"] is True


def test_optimizers_without_modes_are_left_alone() -> None:
    param = torch.nn.Parameter(torch.ones(2))
    optimizer = torch.optim.AdamW([param])
    assert has_modes(optimizer) is False and has_modes(ScheduleFreeAdamW([param])) is True
    with eval_weights(optimizer):
        set_mode(optimizer, "train")
    with pytest.raises(ValueError, match="mode.*accepted"):
        set_mode(optimizer, "test")
