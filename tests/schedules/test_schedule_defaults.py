"""Defaults that the closed-form and parity tests take as given: WarmupCosineLR's start factor."""

from __future__ import annotations

import math

import pytest
import torch

from optimlab.schedules import WarmupCosineLR, create_scheduler


def _lrs(scheduler, steps: int) -> list[float]:
    values = [scheduler.get_last_lr()[0]]
    for _ in range(steps):
        scheduler.optimizer.step()
        scheduler.step()
        values.append(scheduler.get_last_lr()[0])
    return values


@pytest.mark.parametrize("build", [
    lambda opt: WarmupCosineLR(opt, warmup_steps=10, total_steps=100),  # the class default
    lambda opt: create_scheduler("warmup-cosine", opt, total_steps=200),  # the registry: W = 5 % of 200 = 10
])
def test_warmup_cosine_starts_at_one_percent_of_the_peak(build) -> None:
    """start_factor defaults to 0.01: lr_t = 0.1 * (0.01 + 0.99 t / 10) during the 10 warmup steps, then the peak."""
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    scheduler = build(optimizer)
    assert scheduler.start_factor == 0.01
    lrs = _lrs(scheduler, 10)
    for step, lr in enumerate(lrs):
        assert lr == pytest.approx(0.1 * (0.01 + 0.99 * step / 10), rel=1e-12), step
    assert math.isclose(lrs[-1], 0.1, rel_tol=1e-12)
