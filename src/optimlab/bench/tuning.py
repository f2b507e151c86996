"""Hyperparameter search with Optuna's TPE sampler (Bergstra et al., 2011), made exactly reproducible.

The learning rate is searched log-uniformly within the optimizer's registry bounds
(:attr:`optimlab.optim.registry.OptimizerSpec.lr_bounds`), except for learning-rate-free optimizers
(Prodigy, D-Adapt Adam: :func:`optimlab.optim.lr_free.is_learning_rate_free`), whose ``lr`` is a
multiplier of their own step-size estimate and stays at its default 1.0 (:func:`fixed_params`) unless
``tune_lr_free`` is set; other hyperparameters can be added from :data:`EXTRA_SEARCH_SPACE` when the
optimizer accepts them. A study with nothing left to search needs a single tuning trial.

Trial ``k``'s suggestion is a pure function of (seed, k, the results of trials ``0..k-1``): a fresh
study is rebuilt from the stored history and a TPE sampler seeded with ``seed + k`` asks once. So a
bench that was killed and resumed suggests exactly what an uninterrupted one would, and every
optimizer's search uses the same random stream (same quantiles of its own range) — a fair budget.

Objective (minimised): the task metric at the end of the trial, negated for "higher is better"
metrics; a diverged trial scores :data:`DIVERGED_SCORE`, worse than any real result.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import optuna
from optuna.distributions import BaseDistribution, FloatDistribution

from optimlab.optim.lr_free import is_learning_rate_free
from optimlab.optim.registry import get_spec

__all__ = ["DIVERGED_SCORE", "EXTRA_SEARCH_SPACE", "HistoryItem", "fixed_params", "lr_search_range", "search_space",
           "score", "suggest", "best_index"]

DIVERGED_SCORE = 1e300

# name -> (low, high, log)
EXTRA_SEARCH_SPACE: dict[str, tuple[float, float, bool]] = {
    "weight_decay": (1e-6, 1e-1, True),
    "momentum": (0.5, 0.99, False),
    "eps": (1e-10, 1e-6, True),
}


@dataclass(frozen=True)
class HistoryItem:
    """A finished trial as the sampler sees it: its hyperparameters and score (lower is better)."""

    params: dict[str, float]
    score: float


def lr_search_range(optimizer: str, lr_widen: float = 1.0,
                    lr_range: tuple[float, float] | None = None) -> tuple[float, float]:
    """The learning-rate range searched: ``lr_range`` when given (the same for every optimizer), else the
    registry bounds ``(low, high * lr_widen)``."""
    if lr_range is not None:
        low, high = lr_range
        if not 0 < low < high:
            raise ValueError(f"Invalid lr range: {low:g},{high:g} (accepted: 0 < LOW < HIGH)")
        return float(low), float(high)
    if not lr_widen >= 1.0:
        raise ValueError(f"Invalid lr_widen: {lr_widen} (accepted range: >= 1)")
    low, high = get_spec(optimizer).lr_bounds
    return low, high * lr_widen


def fixed_params(optimizer: str, tune_lr_free: bool = False) -> dict[str, float]:
    """Hyperparameters held fixed instead of searched: ``{"lr": 1.0}`` (the registry default) for a
    learning-rate-free optimizer unless ``tune_lr_free``; ``{}`` otherwise."""
    spec = get_spec(optimizer)
    if not tune_lr_free and is_learning_rate_free(spec.resolve()):
        return {"lr": spec.default_lr}
    return {}


def search_space(optimizer: str, tune: Sequence[str] = ("lr",), lr_widen: float = 1.0,
                 lr_range: tuple[float, float] | None = None,
                 tune_lr_free: bool = False) -> dict[str, BaseDistribution]:
    """The Optuna distributions searched for ``optimizer``.

    The learning rate is log-uniform on :func:`lr_search_range`: ``[low, high * lr_widen]`` with
    ``(low, high)`` the registry bounds, or ``lr_range`` for every optimizer alike; a learning-rate-free
    optimizer's is left out (held at 1.0 by :func:`fixed_params`) unless ``tune_lr_free``.

    ``tune`` names what to search: ``"lr"`` plus any of :data:`EXTRA_SEARCH_SPACE`. An extra the optimizer's
    constructor does not accept, or that its registry preset fixes (e.g. SGD-momentum's ``momentum``),
    is left out for that optimizer. An unknown name raises ``ValueError`` listing the valid ones.
    """
    spec = get_spec(optimizer)
    valid = ["lr", *EXTRA_SEARCH_SPACE]
    for name in tune:
        if name not in valid:
            raise ValueError(f"Invalid hyperparameter to tune: {name!r} (accepted: {', '.join(valid)})")
    low, high = lr_search_range(optimizer, lr_widen, lr_range)
    space: dict[str, BaseDistribution] = {}
    if "lr" not in fixed_params(optimizer, tune_lr_free):
        space["lr"] = FloatDistribution(low, high, log=True)
    accepted = spec.accepted_kwargs()
    for name in tune:
        if name == "lr" or name in spec.preset or (accepted is not None and name not in accepted):
            continue
        extra_low, extra_high, log = EXTRA_SEARCH_SPACE[name]
        space[name] = FloatDistribution(extra_low, extra_high, log=log)
    return space


def score(final_metric: float | None, mode: str, diverged: bool) -> float:
    """The minimised objective: ``metric`` (mode ``"min"``) or ``-metric`` (``"max"``); diverged → worst."""
    if mode not in ("min", "max"):
        raise ValueError(f"Invalid mode: {mode!r} (accepted: 'min', 'max')")
    if diverged or final_metric is None or not math.isfinite(final_metric):
        return DIVERGED_SCORE
    return final_metric if mode == "min" else -final_metric


def suggest(space: dict[str, BaseDistribution], history: Sequence[HistoryItem], trial_index: int, seed: int,
            n_startup_trials: int = 4) -> dict[str, float]:
    """Hyperparameters for trial ``trial_index`` given the earlier trials' ``history`` (see the module docstring)."""
    if trial_index < 0:
        raise ValueError(f"Invalid trial_index: {trial_index} (accepted range: >= 0)")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        sampler = optuna.samplers.TPESampler(seed=seed + trial_index, n_startup_trials=n_startup_trials,
                                             multivariate=len(space) > 1)
        study = optuna.create_study(direction="minimize", sampler=sampler)
        for item in history:
            params = {name: item.params[name] for name in space}  # fixed hyperparameters are stored, not searched
            study.add_trial(optuna.trial.create_trial(params=params, distributions=space, value=item.score))
        trial = study.ask(space)
    return {name: float(trial.params[name]) for name in space}


def best_index(history: Sequence[HistoryItem]) -> int:
    """Index of the lowest score (the earliest on ties); ``ValueError`` on an empty history."""
    if not history:
        raise ValueError("Invalid history: empty (no finished trials to choose from)")
    return min(range(len(history)), key=lambda i: (history[i].score, i))
