"""The name registry: every name builds a working schedule from total_steps alone; kwargs override; errors."""

from __future__ import annotations

import pytest
import torch

import optimlab.schedules as S

REQUIRED = {"constant", "step", "multistep", "exponential", "linear", "polynomial", "cosine", "cosine-restarts",
            "warmup-cosine", "wsd", "onecycle", "cyclic", "plateau"}


def _optimizer() -> torch.optim.Optimizer:
    return torch.optim.SGD([{"params": [torch.nn.Parameter(torch.zeros(2))]},
                            {"params": [torch.nn.Parameter(torch.zeros(2))], "lr": 0.02}], lr=0.1)


def test_required_names_are_listed():
    assert REQUIRED <= set(S.list_schedules())
    assert S.list_schedules() == sorted(S.list_schedules())


@pytest.mark.parametrize("name", sorted(REQUIRED))
@pytest.mark.parametrize("total_steps", [1, 7, 200])
def test_every_name_runs_its_whole_length(name, total_steps):
    optimizer = _optimizer()
    if name == "onecycle" and total_steps < 4:
        with pytest.raises(ValueError, match="phase 1 would be empty"):
            S.create_scheduler(name, optimizer, total_steps)
        return
    scheduler = S.create_scheduler(name, optimizer, total_steps)
    assert isinstance(scheduler, torch.optim.lr_scheduler.LRScheduler)
    seen = []
    for step in range(total_steps):
        optimizer.step()
        S.step_scheduler(scheduler, metric=1.0)
        seen.append([float(g["lr"]) for g in optimizer.param_groups])
        if S.has_closed_form(scheduler):
            assert scheduler.lr_at(step + 1) == pytest.approx(seen[-1], rel=1e-12, abs=1e-300)
    assert all(0.0 <= lr <= 0.1 + 1e-15 for row in seen for lr in row)


@pytest.mark.parametrize(("name", "step", "expected"), [
    ("warmup-cosine", 0, [0.1 * 0.01, 0.02 * 0.01]),   # warmup from 1 % ...
    ("warmup-cosine", 5, [0.1, 0.02]),                # ... to the peak after 5 % of 100 steps ...
    ("warmup-cosine", 100, [0.01, 0.002]),            # ... down to 10 % of the peak at the end
    ("exponential", 100, [0.001, 0.0002]),            # 1 % at the end
    ("step", 34, [0.01, 0.002]),                      # /10 after a third
    ("onecycle", 0, [0.1 / 25, 0.02 / 25]),           # torch's div_factor, peaking at the given lr
    ("wsd", 79, [0.1, 0.02]),                         # still stable just before the last 20 %
    ("wsd", 100, [0.0, 0.0]),
])
def test_documented_defaults(name, step, expected):
    scheduler = S.create_scheduler(name, _optimizer(), total_steps=100)
    assert scheduler.lr_at(step) == pytest.approx(expected, rel=1e-12, abs=1e-18)


def test_kwargs_override_defaults():
    scheduler = S.create_scheduler("cosine", _optimizer(), total_steps=100, T_max=10, eta_min=0.001)
    assert (scheduler.T_max, scheduler.eta_min) == (10, 0.001)
    assert isinstance(S.create_scheduler("Cosine", _optimizer(), 10), S.CosineAnnealingLR)


def test_unknown_name_lists_close_matches_and_all_names():
    with pytest.raises(ValueError, match=r"Unknown schedule 'cosin'\. Did you mean: cosine.*Valid names: .*wsd"):
        S.create_scheduler("cosin", _optimizer(), 100)


def test_unknown_kwarg_names_the_valid_ones():
    with pytest.raises(ValueError, match=r"Unknown argument 'tmax' for schedule 'cosine'.*Valid arguments: T_max"):
        S.create_scheduler("cosine", _optimizer(), 100, tmax=5)


def test_bad_total_steps():
    with pytest.raises(ValueError, match="Invalid total_steps: 0"):
        S.create_scheduler("cosine", _optimizer(), 0)


def test_step_scheduler_requires_the_metric_for_plateau():
    scheduler = S.create_scheduler("plateau", _optimizer(), 100)
    assert S.needs_metric(scheduler)
    with pytest.raises(ValueError, match="needs the monitored metric"):
        S.step_scheduler(scheduler)
