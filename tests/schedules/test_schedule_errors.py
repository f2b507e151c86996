"""Bad input: a clear ValueError (or TypeError for a wrong type) naming the argument and the accepted range."""

from __future__ import annotations

import pytest
import torch

import optimlab.schedules as S


def _sgd(momentum: float = 0.9) -> torch.optim.Optimizer:
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.1, momentum=momentum)


BAD = [
    (lambda o: S.CosineAnnealingLR(o, T_max=0), "Invalid T_max: 0 .accepted: an integer >= 1"),
    (lambda o: S.CosineAnnealingLR(o, T_max=-5), "Invalid T_max: -5"),
    (lambda o: S.CosineAnnealingLR(o, T_max=10, eta_min=-1.0), "Invalid eta_min"),
    (lambda o: S.CosineAnnealingWarmRestarts(o, T_0=0), "Invalid T_0: 0"),
    (lambda o: S.CosineAnnealingWarmRestarts(o, T_0=5, T_mult=0), "Invalid T_mult: 0"),
    (lambda o: S.WarmupCosineLR(o, warmup_steps=100, total_steps=50),
     r"warmup_steps \(100\) must be shorter than total_steps \(50\)"),
    (lambda o: S.WarmupCosineLR(o, warmup_steps=50, total_steps=50), "must be shorter than total_steps"),
    (lambda o: S.WarmupStableDecayLR(o, warmup_steps=30, decay_steps=30, total_steps=50),
     r"warmup_steps \+ decay_steps \(30 \+ 30\) must not exceed total_steps \(50\)"),
    (lambda o: S.WarmupStableDecayLR(o, warmup_steps=5, decay_steps=10, total_steps=50, decay_shape="exp"),
     "Unknown decay_shape: 'exp' .accepted: 'linear', 'cosine', '1-sqrt'"),
    (lambda o: S.with_warmup(S.ExponentialLR(o, gamma=0.9), warmup_steps=0), "Invalid warmup_steps: 0"),
    (lambda o: S.CyclicLR(o, base_lr=0.1, max_lr=0.01), "base_lr <= max_lr, got base_lr=0.1, max_lr=0.01"),
    (lambda o: S.CyclicLR(o, base_lr=0.01, max_lr=0.1, mode="sawtooth"),
     "Unknown mode: 'sawtooth' .accepted: 'triangular', 'triangular2', 'exp_range'"),
    (lambda o: S.CyclicLR(o, base_lr=0.01, max_lr=0.1, step_size_up=0), "Invalid step_size_up"),
    (lambda o: S.OneCycleLR(o, max_lr=0.1, total_steps=100, anneal_strategy="cosine"),
     "Unknown anneal_strategy: 'cosine' .accepted: 'cos', 'linear'"),
    (lambda o: S.OneCycleLR(o, max_lr=0.1), "needs total_steps, or both epochs and steps_per_epoch"),
    (lambda o: S.OneCycleLR(o, max_lr=0.1, total_steps=100, pct_start=1.5), "Invalid pct_start: 1.5"),
    (lambda o: S.OneCycleLR(o, max_lr=0.1, total_steps=3), "phase 1 would be empty"),
    (lambda o: S.ReduceLROnPlateau(o, mode="lowest"), "Unknown mode: 'lowest' .accepted: 'min', 'max'"),
    (lambda o: S.ReduceLROnPlateau(o, threshold_mode="relative"), "Unknown threshold_mode: 'relative'"),
    (lambda o: S.ReduceLROnPlateau(o, factor=1.0), r"Invalid factor: 1.0 \(accepted range: \[0, 1\)"),
    (lambda o: S.ReduceLROnPlateau(o, patience=-1), "Invalid patience: -1"),
    (lambda o: S.StepLR(o, step_size=0), "Invalid step_size: 0"),
    (lambda o: S.ExponentialLR(o, gamma=0.0), "Invalid gamma: 0.0"),
    (lambda o: S.ConstantLR(o, factor=1.5), r"Invalid factor: 1.5 \(accepted range: \(0.0, 1.0\]"),
    (lambda o: S.LinearLR(o, start_factor=0.0), "Invalid start_factor: 0.0"),
    (lambda o: S.PolynomialLR(o, total_iters=0), "Invalid total_iters: 0"),
    (lambda o: S.MultiStepLR(o, milestones=[3, -1]), "Invalid milestone: -1"),
    (lambda o: S.SequentialLR(o, [S.ExponentialLR(o, gamma=0.9), S.StepLR(o, step_size=2)], milestones=[]),
     "one milestone fewer than schedulers"),
    (lambda o: S.SequentialLR(o, [S.ExponentialLR(o, gamma=0.9), S.ReduceLROnPlateau(o)], milestones=[3]),
     "cannot contain ReduceLROnPlateau"),
    (lambda o: S.ChainedScheduler([]), "at least one scheduler"),
    (lambda o: S.SequentialLR(o, [S.ExponentialLR(o, gamma=0.9), S.ChainedScheduler([S.StepLR(o, step_size=2)])],
                              milestones=[3]), "cannot be restarted at a milestone"),
    (lambda o: S.SequentialLR(o, [S.ExponentialLR(o, gamma=0.9), S.StepLR(o, step_size=2)], milestones=[0]),
     "Invalid milestone: 0"),
    (lambda o: S.SequentialLR(o, [S.ExponentialLR(o, gamma=0.9), S.StepLR(o, step_size=2),
                                  S.StepLR(o, step_size=3)], milestones=[5, 5]), "strictly increasing"),
    (lambda o: S.LambdaLR(o, [lambda t: 1.0, lambda t: 2.0]), "one value per param group: got 2"),
]


@pytest.mark.parametrize(("build", "message"), BAD, ids=[m[:40] for _, m in BAD])
def test_bad_input_raises_value_error_with_message(build, message):
    with pytest.raises(ValueError, match=message):
        build(_sgd())


def test_onecycle_step_past_total_steps():
    optimizer = _sgd()
    scheduler = S.OneCycleLR(optimizer, max_lr=0.1, total_steps=10)
    for _ in range(10):
        optimizer.step()
        scheduler.step()
    with pytest.raises(ValueError, match="stepped to step 11, past total_steps=10"):
        scheduler.step()
    with pytest.raises(ValueError, match="past total_steps=10"):
        scheduler.lr_at(11)


def test_cycle_momentum_needs_an_optimizer_with_momentum():
    adagrad = torch.optim.Adagrad([torch.nn.Parameter(torch.zeros(2))], lr=0.1)
    with pytest.raises(ValueError, match="cycle_momentum=True needs an optimizer with 'momentum' or 'betas'"):
        S.CyclicLR(adagrad, base_lr=0.01, max_lr=0.1)


def test_schedulers_of_another_optimizer_are_rejected():
    first, second = _sgd(), _sgd()
    with pytest.raises(ValueError, match="belongs to another optimizer"):
        S.ChainedScheduler([S.ExponentialLR(first, gamma=0.9), S.ExponentialLR(second, gamma=0.9)])


def test_not_an_optimizer_is_a_type_error():
    with pytest.raises(TypeError, match="must be a torch.optim.Optimizer"):
        S.StepLR("sgd", step_size=3)
