"""Closed forms: ``lr_at(t)`` equals the iterative ``step()`` sequence for every schedule that has one, and the
optimlab-only schedules equal an independent NumPy reference of their equations."""

from __future__ import annotations

import numpy as np
import pytest
from schedule_cases import CASES, CASES_BY_NAME, draws, lrs, make_optimizer, max_rel_err, momenta, step_once

import optimlab.schedules as ours

STEPS = 300
REL_TOL = 1e-12


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_lr_at_equals_stepping(case):
    for kw in draws(case, 3, seed=4):
        optimizer = make_optimizer(kw)
        scheduler = case.build(ours, optimizer, kw)
        if not ours.has_closed_form(scheduler):
            assert case.name in ("ReduceLROnPlateau", "ChainedScheduler")
            with pytest.raises(NotImplementedError, match="no closed form"):
                scheduler.lr_at(3)
            return
        stepped, stepped_mom = [lrs(optimizer)], [momenta(optimizer)]
        for t in range(STEPS):
            step_once(case, scheduler, optimizer, kw, t)
            stepped.append(lrs(optimizer))
            stepped_mom.append(momenta(optimizer))
        closed = [scheduler.lr_at(t) for t in range(STEPS + 1)]
        assert max_rel_err(stepped, closed) <= REL_TOL, kw
        if case.momentum:
            assert max_rel_err(stepped_mom, [scheduler.momentum_at(t) for t in range(STEPS + 1)]) <= REL_TOL


def _reference_warmup(t: np.ndarray, base: float, warmup: int, start: float) -> np.ndarray:
    return base * (start + (1 - start) * t / warmup)


def _reference_warmup_cosine(t, base, warmup, total, start, eta_min):
    """Linear warmup (Goyal et al. 2017) then the SGDR half-cosine (Loshchilov & Hutter 2017), eta_min after."""
    cosine = eta_min + 0.5 * (base - eta_min) * (1 + np.cos(np.pi * (t - warmup) / (total - warmup)))
    return np.where(t < warmup, _reference_warmup(t, base, warmup, start), np.where(t <= total, cosine, eta_min))


def _reference_wsd(t, base, warmup, decay, total, start, eta_min, shape):
    """WSD (Hu et al. 2024): warmup, constant, then decay over the last `decay` steps; 1-sqrt from Hägele et al."""
    p = np.clip((t - (total - decay)) / decay, 0.0, 1.0)
    fraction_left = {"linear": 1 - p, "cosine": 0.5 * (1 + np.cos(np.pi * p)), "1-sqrt": 1 - np.sqrt(p)}[shape]
    main = eta_min + (base - eta_min) * fraction_left
    return np.where(t < warmup, _reference_warmup(t, base, warmup, start), np.where(t <= total, main, eta_min))


@pytest.mark.parametrize("name", ["WarmupCosineLR", "WarmupStableDecayLR"])
def test_optimlab_only_schedules_match_numpy_reference(name):
    case = CASES_BY_NAME[name]
    t = np.arange(STEPS + 101, dtype=np.float64)
    for kw in draws(case, 6, seed=5):
        optimizer = make_optimizer(kw)
        scheduler = case.build(ours, optimizer, kw)
        stepped = [lrs(optimizer)]
        for step in range(len(t) - 1):
            step_once(case, scheduler, optimizer, kw, step)
            stepped.append(lrs(optimizer))
        eta_mins = kw["eta_min"] if isinstance(kw["eta_min"], list) else [kw["eta_min"]] * 2
        for group, (base, eta_min) in enumerate(zip(kw["lrs"], eta_mins)):
            if name == "WarmupCosineLR":
                expected = _reference_warmup_cosine(t, base, kw["warmup"], kw["total"], kw["start"], eta_min)
            else:
                expected = _reference_wsd(t, base, kw["warmup"], kw["decay"], kw["total"], kw["start"], eta_min,
                                          kw["shape"])
            actual = np.array([row[group] for row in stepped])
            np.testing.assert_allclose(actual, expected, rtol=1e-12, atol=1e-15 * base)
        assert stepped[kw["warmup"]] == pytest.approx(kw["lrs"], rel=1e-15)  # the peak right after warmup


def test_sequential_lr_at_is_the_active_child_closed_form():
    case = CASES_BY_NAME["SequentialLR"]
    kw = draws(case, 1, seed=6)[0]
    scheduler = case.build(ours, make_optimizer(kw), kw)
    first, second, third = scheduler._schedulers
    warmup, second_end = kw["warmup"], kw["second_end"]
    assert scheduler.lr_at(warmup - 1) == first.lr_at(warmup - 1)
    assert scheduler.lr_at(warmup) == second.lr_at(0) == pytest.approx(kw["lrs"], rel=1e-15)
    assert scheduler.lr_at(second_end + 7) == third.lr_at(7)


def test_lr_at_rejects_negative_and_non_integer_steps():
    kw = draws(CASES_BY_NAME["StepLR"], 1)[0]
    scheduler = CASES_BY_NAME["StepLR"].build(ours, make_optimizer(kw), kw)
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="Invalid step"):
            scheduler.lr_at(bad)
