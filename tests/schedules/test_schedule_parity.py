"""Parity with torch.optim.lr_scheduler 2.13: same learning rates (and cycled momentum/beta1) over 300 steps,
several random argument draws per class, two param groups with different learning rates, 1e-12 relative."""

from __future__ import annotations

import pytest
import torch
from schedule_cases import CASES, CASES_BY_NAME, draws, make_optimizer, max_rel_err, torch_sched, trajectory

import optimlab.schedules as ours

STEPS = 300
DRAWS = 4
REL_TOL = 1e-12
TORCH_CASES = [case for case in CASES if case.torch_parity]


@pytest.mark.parametrize("case", TORCH_CASES, ids=lambda c: c.name)
def test_same_sequence_as_torch(case):
    for kw in draws(case, DRAWS):
        ours_lrs, ours_mom = trajectory(case, ours, kw, STEPS)
        torch_lrs, torch_mom = trajectory(case, torch_sched, kw, STEPS)
        assert max_rel_err(ours_lrs, torch_lrs) <= REL_TOL, kw
        assert max_rel_err(ours_mom, torch_mom) <= REL_TOL, kw
        assert len({round(lr, 15) for row in ours_lrs for lr in row}) > 1 or case.metric, "schedule never moved"


@pytest.mark.parametrize("case", TORCH_CASES, ids=lambda c: c.name)
def test_tensor_lr_same_sequence_and_updated_in_place(case):
    kw = draws(case, 1, seed=1)[0]
    ours_lrs, _ = trajectory(case, ours, kw, STEPS, tensor_lr=True)
    torch_lrs, _ = trajectory(case, torch_sched, kw, STEPS, tensor_lr=True)
    assert max_rel_err(ours_lrs, torch_lrs) <= REL_TOL
    optimizer = make_optimizer(kw, tensor_lr=True)
    lr_tensors = [group["lr"] for group in optimizer.param_groups]
    scheduler = case.build(ours, optimizer, kw)
    for t in range(20):
        optimizer.step()
        scheduler.step(kw["metrics"][t]) if case.metric else scheduler.step()
    assert all(group["lr"] is tensor for group, tensor in zip(optimizer.param_groups, lr_tensors))
    assert all(isinstance(lr, torch.Tensor) for lr in scheduler.get_last_lr())


def test_warm_restarts_fractional_epochs_match_torch():
    case = CASES_BY_NAME["CosineAnnealingWarmRestarts"]
    for kw in draws(case, DRAWS, seed=2):
        rows = {}
        for lib in (ours, torch_sched):
            optimizer = make_optimizer(kw)
            scheduler = case.build(lib, optimizer, kw)
            rows[lib] = []
            for epoch in range(40):
                for i in range(7):
                    scheduler.step(epoch + i / 7)
                    rows[lib].append([float(g["lr"]) for g in optimizer.param_groups])
        assert max_rel_err(rows[ours], rows[torch_sched]) <= REL_TOL


def test_two_schedulers_stepped_on_one_optimizer_match_torch():
    """Compound use without ChainedScheduler: two schedulers stepped one after the other each step."""
    for kw in draws(CASES_BY_NAME["ExponentialLR"], DRAWS, seed=3):
        rows = {}
        for lib in (ours, torch_sched):
            optimizer = make_optimizer(kw)
            first = lib.ExponentialLR(optimizer, gamma=kw["gamma"])
            second = lib.MultiStepLR(optimizer, milestones=[30, 80, 80, 200], gamma=0.5)
            rows[lib] = [[float(g["lr"]) for g in optimizer.param_groups]]
            for _ in range(STEPS):
                optimizer.step()
                first.step()
                second.step()
                rows[lib].append([float(g["lr"]) for g in optimizer.param_groups])
        assert max_rel_err(rows[ours], rows[torch_sched]) <= REL_TOL
