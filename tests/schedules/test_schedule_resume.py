"""Resume: train k steps → save optimizer and scheduler (torch.save, loaded back with weights_only=True) →
new optimizer and scheduler → load both → continue gives exactly the uninterrupted sequence, for every class,
at several split points (one inside the warmup), whichever order the two are rebuilt and loaded in."""

from __future__ import annotations

import pytest
from schedule_cases import CASES, draws, lrs, make_optimizer, momenta, roundtrip, step_once, trajectory

import optimlab.schedules as ours

STEPS = 120
INSIDE_WARMUP = 2  # every warmup in the case table lasts at least 4 steps
SPLITS = (1, INSIDE_WARMUP, 37, STEPS // 2, STEPS - 1)


def _resumed(case, kw, split: int, order: str, tensor_lr: bool) -> tuple[list[list[float]], list[list[float]]]:
    optimizer = make_optimizer(kw, tensor_lr)
    scheduler = case.build(ours, optimizer, kw)
    for t in range(split):
        step_once(case, scheduler, optimizer, kw, t)
    checkpoint = roundtrip({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()})
    del optimizer, scheduler

    optimizer = make_optimizer(kw, tensor_lr)
    if order == "scheduler-first":  # torch's documented order: build the scheduler, then load both
        scheduler = case.build(ours, optimizer, kw)
        optimizer.load_state_dict(checkpoint["optimizer"])
    else:  # the optimizer is loaded before the scheduler is built (which rewrites the learning rates)
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler = case.build(ours, optimizer, kw)
    scheduler.load_state_dict(checkpoint["scheduler"])
    lr_rows, mom_rows = [lrs(optimizer)], [momenta(optimizer)]
    for t in range(split, STEPS):
        step_once(case, scheduler, optimizer, kw, t)
        lr_rows.append(lrs(optimizer))
        mom_rows.append(momenta(optimizer))
    return lr_rows, mom_rows


@pytest.mark.parametrize("order", ["scheduler-first", "optimizer-first"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_resume_gives_the_uninterrupted_sequence(case, order):
    for tensor_lr, kw in zip((False, True), draws(case, 2, seed=7)):
        expected_lrs, expected_mom = trajectory(case, ours, kw, STEPS, tensor_lr=tensor_lr)
        for split in SPLITS:
            got_lrs, got_mom = _resumed(case, kw, split, order, tensor_lr)
            assert got_lrs == expected_lrs[split:], (split, kw)
            assert got_mom == expected_mom[split:], (split, kw)


def test_torch_own_resume_drifts_where_ours_does_not():
    """The check above can fail: a torch CyclicLR built after the optimizer was loaded starts from the wrong
    momentum and learning rate until its next step, while ours restores both on load_state_dict."""
    from schedule_cases import CASES_BY_NAME, torch_sched

    case = CASES_BY_NAME["CyclicLR"]
    kw = dict(draws(case, 1, seed=8)[0], optimizer="sgd")
    results = {}
    for lib in (ours, torch_sched):
        optimizer = make_optimizer(kw)
        scheduler = case.build(lib, optimizer, kw)
        for t in range(7):
            step_once(case, scheduler, optimizer, kw, t)
        expected = (lrs(optimizer), momenta(optimizer))
        checkpoint = roundtrip({"optimizer": optimizer.state_dict()}) | {"scheduler": scheduler.state_dict()}
        optimizer = make_optimizer(kw)
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler = case.build(lib, optimizer, kw)
        scheduler.load_state_dict(checkpoint["scheduler"])
        results[lib] = (lrs(optimizer), momenta(optimizer)) == expected
    assert results == {ours: True, torch_sched: False}


class _Decay:
    """A callable object: its ``__dict__`` is saved in the scheduler's state (plain functions are not)."""

    def __init__(self, rate: float) -> None:
        self.rate = rate

    def __call__(self, step: int) -> float:
        return self.rate**step


def test_callable_object_state_is_saved_and_plain_functions_are_not():
    optimizer = make_optimizer({"lrs": [0.1, 0.01], "optimizer": "sgd"})
    scheduler = ours.LambdaLR(optimizer, [_Decay(0.9), lambda step: 1.0])
    scheduler.lr_lambdas[0].rate = 0.5
    state = roundtrip(scheduler.state_dict())
    assert state["lr_lambdas"] == [{"rate": 0.5}, None]
    fresh = ours.LambdaLR(make_optimizer({"lrs": [0.1, 0.01], "optimizer": "sgd"}), [_Decay(0.9), lambda step: 1.0])
    fresh.load_state_dict(state)
    assert fresh.lr_lambdas[0].rate == 0.5
    assert fresh.lr_at(2) == pytest.approx([0.1 * 0.25, 0.01], rel=1e-15)
