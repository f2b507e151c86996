"""ScheduleFreeAdamW modes: eval() swaps in the average x, train() restores y, checkpoints taken in
eval mode resume exactly, and stepping in eval mode is refused."""

from __future__ import annotations

import pytest
import torch

from optimlab.optim import ScheduleFreeAdamW

from .harness import MLPProblem, save_and_load, train

KWARGS = {"lr": 0.02, "betas": (0.8, 0.99), "weight_decay": 0.05, "warmup_steps": 3}


def test_eval_swaps_in_the_average_and_train_restores() -> None:
    problem = MLPProblem()
    optimizer = ScheduleFreeAdamW(problem.parameters(), **KWARGS)
    train(problem, optimizer, 12)
    params = list(problem.parameters())
    y = [p.detach().clone() for p in params]
    z = [optimizer.state[p]["z"].clone() for p in params]
    beta1 = KWARGS["betas"][0]
    optimizer.eval()
    for param, y_value, z_value in zip(params, y, z):
        expected_x = (y_value - (1 - beta1) * z_value) / beta1  # y = (1 - beta1) z + beta1 x
        torch.testing.assert_close(param.detach(), expected_x, rtol=1e-12, atol=1e-12)
        assert not torch.allclose(param.detach(), y_value)
    optimizer.eval()  # idempotent
    torch.testing.assert_close(params[0].detach(), (y[0] - (1 - beta1) * z[0]) / beta1, rtol=1e-12, atol=1e-12)
    optimizer.train()
    for param, y_value in zip(params, y):
        torch.testing.assert_close(param.detach(), y_value, rtol=1e-12, atol=1e-12)
    assert all(group["train_mode"] for group in optimizer.param_groups)


def test_average_x_is_the_weighted_average_of_z_iterates() -> None:
    """x_{t+1} = (1 - c) x_t + c z_{t+1}, c = w_t / sum w: with r = 0 and no warmup (constant weights)
    x is the plain running mean of z_1..z_T."""
    param = torch.nn.Parameter(torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64))
    optimizer = ScheduleFreeAdamW([param], lr=0.1, betas=(0.9, 0.999))
    z_iterates = []
    for t in range(8):
        optimizer.zero_grad()
        (param**2).sum().backward()
        optimizer.step()
        z_iterates.append(optimizer.state[param]["z"].clone())
    optimizer.eval()
    # c_1 = 1 makes x_1 = z_1, then c_t = 1/t, so x_T = mean(z_1..z_T)
    torch.testing.assert_close(param.detach(), torch.stack(z_iterates).mean(0), rtol=1e-12, atol=1e-12)


def test_checkpoint_saved_in_eval_mode_resumes_exactly() -> None:
    problem = MLPProblem()
    optimizer = ScheduleFreeAdamW(problem.parameters(), **KWARGS)
    train(problem, optimizer, 8)
    optimizer.eval()
    checkpoint = save_and_load({"model": problem.state_dict(), "optimizer": optimizer.state_dict()})
    eval_loss = problem.loss(8).item()

    resumed_problem = MLPProblem()
    resumed_problem.load_state_dict(checkpoint["model"])
    resumed = ScheduleFreeAdamW(resumed_problem.parameters(), **KWARGS)
    resumed.load_state_dict(checkpoint["optimizer"])
    assert not resumed.param_groups[0]["train_mode"]
    assert resumed_problem.loss(8).item() == eval_loss  # the averaged weights were saved

    for opt, prob in ((optimizer, problem), (resumed, resumed_problem)):
        opt.train()
        train(prob, opt, 7, start=8)
        opt.eval()
    for ours, reference in zip(resumed_problem.parameters(), problem.parameters()):
        assert torch.equal(ours, reference)
    for param, reference in zip(resumed_problem.parameters(), problem.parameters()):
        for key, value in optimizer.state[reference].items():
            assert torch.equal(resumed.state[param][key], value)
    assert resumed.param_groups[0]["step"] == optimizer.param_groups[0]["step"] == 15


def test_step_in_eval_mode_raises() -> None:
    param = torch.nn.Parameter(torch.ones(3))
    optimizer = ScheduleFreeAdamW([param])
    optimizer.eval()
    param.grad = torch.ones(3)
    with pytest.raises(RuntimeError, match=r"train\(\)"):
        optimizer.step()


def test_warmup_schedules_the_learning_rate() -> None:
    param = torch.nn.Parameter(torch.ones(3))
    optimizer = ScheduleFreeAdamW([param], lr=0.4, warmup_steps=4)
    seen = []
    for _ in range(6):
        param.grad = torch.ones(3)
        optimizer.step()
        seen.append(optimizer.param_groups[0]["scheduled_lr"])
    assert seen == pytest.approx([0.1, 0.2, 0.3, 0.4, 0.4, 0.4], rel=1e-12)


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"lr": -0.1}, "lr"),
    ({"betas": (0.0, 0.99)}, "beta1"),
    ({"betas": (0.9, 1.0)}, "beta2"),
    ({"eps": -1.0}, "eps"),
    ({"weight_decay": -1.0}, "weight_decay"),
    ({"warmup_steps": -1}, "warmup_steps"),
    ({"warmup_steps": 2.5}, "warmup_steps"),
    ({"r": -1.0}, "r"),
    ({"weight_lr_power": -1.0}, "weight_lr_power"),
])
def test_invalid_arguments_raise(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        ScheduleFreeAdamW([torch.nn.Parameter(torch.ones(2))], **kwargs)
