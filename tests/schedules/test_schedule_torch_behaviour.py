"""torch's scheduler behaviour where optimlab used to refuse or differ (issue 20, parts 3 and 4), each
checked side by side with torch.optim.lr_scheduler 2.13: the deprecated ``step(epoch)``, the warning for
``scheduler.step()`` before ``optimizer.step()``, ReduceLROnPlateau after ``add_param_group``, a
ChainedScheduler inside SequentialLR, momentum bounds outside [0, 1], and warm restarts with a user-set
``T_cur`` past the period."""

from __future__ import annotations

import random
import warnings

import pytest
import torch
from schedule_cases import CASES, CASES_BY_NAME, draws, lrs, make_optimizer, max_rel_err, momenta, torch_sched

import optimlab.schedules as ours

REL_TOL = 1e-12
ORDER_WARNING = "Detected call of `lr_scheduler.step()` before `optimizer.step()`"
EPOCH_WARNING = "The epoch parameter in `scheduler.step()` was not necessary"
# torch's step() takes no epoch on these two (a TypeError in both libraries)
NO_EPOCH = ("SequentialLR", "ChainedScheduler", "with_warmup")
EPOCH_CASES = [c for c in CASES if c.torch_parity and c.name not in NO_EPOCH]


def _messages(caught: list[warnings.WarningMessage]) -> list[str]:
    return [str(w.message)[:60] for w in caught if issubclass(w.category, UserWarning)]


def _run_with_epochs(case, lib, kw, calls):
    """Apply ``calls`` (None: step(); an int: step(epoch)) after optimizer steps; LRs, momenta and warnings."""
    optimizer = make_optimizer(kw)
    scheduler = case.build(lib, optimizer, kw)
    rows, moms, messages = [lrs(optimizer)], [momenta(optimizer)], []
    for t, epoch in enumerate(calls):
        optimizer.step()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            args = (kw["metrics"][t],) if case.metric else ()
            scheduler.step(*args) if epoch is None else scheduler.step(*args, epoch)
        messages.append(_messages(caught))
        rows.append(lrs(optimizer))
        moms.append(momenta(optimizer))
    return rows, moms, messages, scheduler.last_epoch


@pytest.mark.parametrize("case", EPOCH_CASES, ids=lambda c: c.name)
def test_step_with_epoch_matches_torch(case):
    """Deprecated ``step(epoch)``: same learning rates, momenta, last_epoch and warnings as torch, for jumps
    forward and back mixed with plain steps (the closed form where torch has one, else get_lr)."""
    rng = random.Random(case.name)
    for kw in draws(case, 3, seed=5):
        total = 300 if case.name == "OneCycleLR" else 400
        calls = [None if rng.random() < 0.6 else rng.randrange(0, total - 60) for _ in range(60)]
        mine = _run_with_epochs(case, ours, kw, calls)
        theirs = _run_with_epochs(case, torch_sched, kw, calls)
        assert max_rel_err(mine[0], theirs[0]) <= REL_TOL, kw
        assert max_rel_err(mine[1], theirs[1]) <= REL_TOL, kw
        assert mine[2] == theirs[2]
        assert mine[3] == theirs[3]
    assert any(EPOCH_WARNING[:40] in m for row in mine[2] for m in row) != (case.name == "CosineAnnealingWarmRestarts")


@pytest.mark.parametrize("name", NO_EPOCH)
def test_step_with_epoch_is_a_type_error_where_torch_has_no_epoch(name):
    case = CASES_BY_NAME["SequentialLR" if name == "with_warmup" else name]
    kw = draws(case, 1)[0]
    for lib in (ours, torch_sched):
        scheduler = case.build(lib, make_optimizer(kw), kw)
        with pytest.raises(TypeError):
            scheduler.step(3)


def _warnings_of(case, lib, kw, optimizer_first: bool) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        optimizer = make_optimizer(kw)
        scheduler = case.build(lib, optimizer, kw)
        for t in range(3):
            if optimizer_first:
                optimizer.step()
            scheduler.step(kw["metrics"][t]) if case.metric else scheduler.step()
            optimizer.step()
    return _messages(caught)


@pytest.mark.parametrize("case", [c for c in CASES if c.torch_parity], ids=lambda c: c.name)
def test_step_order_warning_as_torch(case):
    """``scheduler.step()`` before any ``optimizer.step()`` warns exactly where torch warns (once), and the
    right order warns nowhere."""
    kw = draws(case, 1)[0]
    wrong = _warnings_of(case, ours, kw, optimizer_first=False)
    assert wrong == _warnings_of(case, torch_sched, kw, optimizer_first=False)
    assert (ORDER_WARNING[:60] in wrong) == (case.name not in ("ReduceLROnPlateau", "CosineAnnealingWarmRestarts"))
    assert _warnings_of(case, ours, kw, optimizer_first=True) == []
    assert _warnings_of(case, torch_sched, kw, optimizer_first=True) == []


def test_step_order_warning_when_optimizer_step_is_replaced():
    """torch also warns when ``optimizer.step`` was replaced after the scheduler was built."""
    results = []
    for lib in (ours, torch_sched):
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.1)
        scheduler = lib.StepLR(optimizer, step_size=2)
        optimizer.step = lambda: None
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            optimizer.step()
            scheduler.step()
        results.append(_messages(caught))
    assert results[0] == results[1] and len(results[0]) == 1 and "overridden" in results[0][0]


def test_plateau_scalar_min_lr_follows_added_param_groups():
    """Progressive unfreezing: a group added after the scheduler gets the scalar min_lr (torch extends
    min_lrs); it used to raise at the first plateau."""
    rows = []
    for lib in (ours, torch_sched):
        first = torch.nn.Parameter(torch.zeros(2))
        optimizer = torch.optim.SGD([first], lr=1.0)
        scheduler = lib.ReduceLROnPlateau(optimizer, factor=0.5, patience=1, min_lr=0.2)
        scheduler.step(1.0)
        optimizer.add_param_group({"params": [torch.nn.Parameter(torch.zeros(2))], "lr": 0.3})
        row = []
        for _ in range(12):
            scheduler.step(1.0)
            row.append(lrs(optimizer))
        rows.append(row)
        assert scheduler.min_lrs == [0.2, 0.2]
    assert rows[0] == rows[1]
    assert rows[0][-1] == [0.2, 0.2]


def test_plateau_list_min_lr_still_refuses_added_param_groups():
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=1.0)
    scheduler = ours.ReduceLROnPlateau(optimizer, patience=0, min_lr=[0.1])
    optimizer.add_param_group({"params": [torch.nn.Parameter(torch.zeros(2))]})
    scheduler.step(1.0)
    with pytest.raises(RuntimeError, match="min_lrs"):
        scheduler.step(1.0)


def _sequence_with_chained_first(lib) -> list[list[float]]:
    optimizer = make_optimizer({"lrs": [0.5, 0.05], "optimizer": "sgd"})
    chained = lib.ChainedScheduler([lib.ExponentialLR(optimizer, gamma=0.9), lib.StepLR(optimizer, 3, 0.5)])
    later = lib.CosineAnnealingLR(optimizer, T_max=10)
    scheduler = lib.SequentialLR(optimizer, [chained, later], milestones=[7])
    rows = [lrs(optimizer)]
    for _ in range(25):
        optimizer.step()
        scheduler.step()
        rows.append(lrs(optimizer))
    return rows


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)`")  # torch's (and our) warning: the
# chained children's own first steps run inside SequentialLR's constructor
def test_sequential_accepts_a_chained_scheduler_as_first_stage():
    assert max_rel_err(_sequence_with_chained_first(ours), _sequence_with_chained_first(torch_sched)) <= REL_TOL


def test_sequential_refuses_a_chained_scheduler_that_would_restart():
    """torch accepts it too but raises NotImplementedError at the milestone (ChainedScheduler has no
    get_lr); optimlab says so at construction instead of mid-run."""
    optimizer = make_optimizer({"lrs": [0.5, 0.05], "optimizer": "sgd"})
    chained = ours.ChainedScheduler([ours.StepLR(optimizer, step_size=2)])
    with pytest.raises(ValueError, match=r"schedulers\[1\] is a ChainedScheduler.*only as the first"):
        ours.SequentialLR(optimizer, [ours.ExponentialLR(optimizer, gamma=0.9), chained], milestones=[3])


@pytest.mark.parametrize("name", ["CyclicLR", "OneCycleLR"])
def test_momentum_bounds_outside_unit_interval_match_torch(name):
    """Momentum bounds are not range-checked by torch (e.g. base_momentum=-0.2, max_momentum=1.3)."""
    kw = {"lrs": [0.1, 0.01], "optimizer": "sgd"}
    results = []
    for lib in (ours, torch_sched):
        optimizer = make_optimizer(kw)
        if name == "CyclicLR":
            scheduler = lib.CyclicLR(optimizer, base_lr=0.01, max_lr=0.1, step_size_up=5, base_momentum=-0.2,
                                     max_momentum=1.3)
        else:
            scheduler = lib.OneCycleLR(optimizer, max_lr=0.1, total_steps=30, base_momentum=1.1, max_momentum=1.5)
        rows = [momenta(optimizer)]
        for _ in range(20):
            optimizer.step()
            scheduler.step()
            rows.append(momenta(optimizer))
        results.append(rows)
    assert max_rel_err(results[0], results[1]) <= REL_TOL
    assert max(max(r) for r in results[0]) > 1.0


@pytest.mark.parametrize("t_mult", [1, 2])
def test_warm_restarts_user_set_t_cur_past_the_period_wraps_fully(t_mult):
    """A T_cur set beyond the period (here 3.5 periods) wraps with a modulo, as torch's step() does."""
    rows = []
    for lib in (ours, torch_sched):
        optimizer = make_optimizer({"lrs": [0.5, 0.05], "optimizer": "sgd"})
        scheduler = lib.CosineAnnealingWarmRestarts(optimizer, T_0=10, T_mult=t_mult)
        optimizer.step()
        scheduler.step()
        scheduler.T_cur = 35
        row = []
        for _ in range(30):
            optimizer.step()
            scheduler.step()
            row.append(lrs(optimizer) + [scheduler.T_cur, scheduler.T_i])
        rows.append(row)
    assert max_rel_err(rows[0], rows[1]) <= REL_TOL
    assert rows[0][0][2] == 6
