"""Prodigy and DAdaptAdam against the authors' packages (``prodigyopt``, ``dadaptation``) in float64:
20 random configurations each (hyperparameters, shapes incl. scalars, 1-D and conv weights, two param
groups, skipped steps), 20 steps; the estimate ``d`` must match too. Checkpoints of the authors'
optimizers load into ours and continue identically."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from dadaptation import DAdaptAdam as ReferenceDAdaptAdam
from prodigyopt import Prodigy as ReferenceProdigy

from optimlab.optim.dadapt_adam import DAdaptAdam
from optimlab.optim.prodigy import Prodigy

from .frontier_helpers import assert_close, random_structure, run_torch, sample_problem
from .modern_helpers import random_configs

STEPS = 20
TOLERANCE = 1e-12  # the same operations as the authors' code, summed in the same float64 order
COUNT = 20


def _loguniform(rng: np.random.Generator, low: float, high: float) -> float:
    return float(math.exp(rng.uniform(math.log(low), math.log(high))))


def _prodigy_config(rng: np.random.Generator) -> dict:
    kwargs = {
        "lr": float(rng.choice([1.0, rng.uniform(0.2, 1.0)])),
        "betas": (float(rng.choice([0.0, rng.uniform(0.5, 0.95)])), float(rng.uniform(0.9, 0.999))),
        "beta3": None if rng.uniform() < 0.5 else float(rng.uniform(0.5, 0.99)),
        "eps": _loguniform(rng, 1e-10, 1e-6),
        "weight_decay": float(rng.choice([0.0, rng.uniform(0.0, 0.2)])),
        "decouple": bool(rng.uniform() < 0.6),
        "use_bias_correction": bool(rng.uniform() < 0.5),
        "safeguard_warmup": bool(rng.uniform() < 0.5),
        "d0": _loguniform(rng, 1e-7, 1e-3),
        "d_coef": float(rng.uniform(0.5, 2.0)),
        "growth_rate": float(rng.choice([math.inf, rng.uniform(1.01, 1.5)])),
        "slice_p": int(rng.choice([1, 1, 2, 3])),
    }
    group = {"weight_decay": float(rng.uniform(0.0, 0.3))} if rng.uniform() < 0.7 else {"lr": 0.0}
    return {"kwargs": kwargs, "structure": random_structure(rng, group_options=group)}


def _dadapt_config(rng: np.random.Generator) -> dict:
    kwargs = {
        "lr": float(rng.choice([1.0, rng.uniform(0.2, 1.0)])),
        "betas": (float(rng.uniform(0.5, 0.95)), float(rng.uniform(0.9, 0.999))),
        "eps": _loguniform(rng, 1e-10, 1e-6),
        "weight_decay": float(rng.choice([0.0, rng.uniform(0.0, 0.2)])),
        "decouple": bool(rng.uniform() < 0.5),
        "use_bias_correction": bool(rng.uniform() < 0.5),
        "d0": _loguniform(rng, 1e-7, 1e-3),
        "growth_rate": float(rng.choice([math.inf, rng.uniform(1.01, 1.5)])),
    }
    group = ({"layer_scale": float(rng.uniform(0.3, 3.0)), "weight_decay": float(rng.uniform(0.0, 0.3))}
             if rng.uniform() < 0.7 else {"lr": 0.0})
    return {"kwargs": kwargs, "structure": random_structure(rng, group_options=group)}


PRODIGY_CONFIGS = random_configs(151, COUNT, _prodigy_config)
DADAPT_CONFIGS = random_configs(152, COUNT, _dadapt_config)
CASES = [("prodigy", Prodigy, ReferenceProdigy, config, 400 + i) for i, config in enumerate(PRODIGY_CONFIGS)] + [
    ("dadapt", DAdaptAdam, ReferenceDAdaptAdam, config, 500 + i) for i, config in enumerate(DADAPT_CONFIGS)]


@pytest.mark.parametrize(("name", "ours_cls", "reference_cls", "config", "seed"), CASES,
                         ids=[f"{case[0]}-{case[4]}" for case in CASES])
def test_matches_authors_package(name, ours_cls, reference_cls, config, seed) -> None:
    structure = config["structure"]
    problem = sample_problem(seed, structure)
    ours_params, ours = run_torch(lambda groups: ours_cls(groups, **config["kwargs"]), problem, structure, STEPS)
    reference_params, reference = run_torch(lambda groups: reference_cls(groups, **config["kwargs"]), problem,
                                            structure, STEPS)
    frozen = [structure.two_groups and structure.group_options.get("lr") == 0.0 and structure.group_index(i) == 1
              for i in range(len(ours_params))]
    # a frozen group (lr=0) does not move in ours; the authors' code decays it (see optimlab.optim.lr_free)
    start = problem.torch_params()
    assert all(torch.equal(p, s) for p, s, f in zip(ours_params, start, frozen) if f)
    assert_close([p for p, f in zip(ours_params, frozen) if not f],
                 [p for p, f in zip(reference_params, frozen) if not f], TOLERANCE)
    assert ours.d > config["kwargs"]["d0"]  # the estimate moved (a non-vacuous comparison)
    assert ours.d == pytest.approx(reference.param_groups[0]["d"], rel=TOLERANCE)


@pytest.mark.parametrize(("ours_cls", "reference_cls"), [(Prodigy, ReferenceProdigy), (DAdaptAdam, ReferenceDAdaptAdam)])
def test_reference_checkpoint_resumes_in_ours(ours_cls, reference_cls) -> None:
    """Ten steps with the authors' optimizer, its state_dict loaded into ours, ten more steps: equal to
    twenty steps of the authors' optimizer (same state layout, estimate in the param groups)."""
    structure = random_structure(np.random.default_rng(7), allow_skips=False, group_options={"weight_decay": 0.1})
    problem = sample_problem(7, structure)
    kwargs = {"weight_decay": 0.05, "use_bias_correction": True}
    params, reference = run_torch(lambda groups: reference_cls(groups, **kwargs), problem, structure, 10)
    saved = copy.deepcopy(reference.state_dict())
    resumed = [param.detach().clone().requires_grad_() for param in params]
    for _ in range(10):
        reference.zero_grad()
        problem.loss(params).backward()
        reference.step()
    ours = ours_cls(structure.param_groups(resumed), **kwargs)
    ours.load_state_dict(saved)
    for _ in range(10):
        ours.zero_grad()
        problem.loss(resumed).backward()
        ours.step()
    assert_close(resumed, params, TOLERANCE)


@pytest.mark.parametrize("cls", [Prodigy, DAdaptAdam])
def test_rejects_different_group_lrs(cls) -> None:
    params = [torch.zeros(2, requires_grad=True), torch.zeros(3, requires_grad=True)]
    optimizer = cls([{"params": params[:1]}, {"params": params[1:], "lr": 0.5}])
    sum(p.sum() for p in params).backward()
    with pytest.raises(RuntimeError, match="same lr or lr=0"):
        optimizer.step()


@pytest.mark.parametrize(("cls", "kwargs", "match"), [
    (Prodigy, {"d0": 0.0}, "d0"), (Prodigy, {"d_coef": -1.0}, "d_coef"), (Prodigy, {"growth_rate": 0.5}, "growth_rate"),
    (Prodigy, {"slice_p": 0}, "slice_p"), (Prodigy, {"beta3": 1.0}, "beta3"), (Prodigy, {"lr": -1.0}, "lr"),
    (DAdaptAdam, {"d0": -1e-6}, "d0"), (DAdaptAdam, {"betas": (0.9, 1.0)}, "betas"),
    (DAdaptAdam, {"growth_rate": 0.9}, "growth_rate"), (DAdaptAdam, {"eps": -1.0}, "eps"),
])
def test_validation(cls, kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        cls([torch.zeros(2, requires_grad=True)], **kwargs)
