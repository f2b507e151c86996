"""ADOPT in float64 against pytorch-optimizer's ``ADOPT`` (20 random configurations without skipped steps:
it counts steps per param group, the authors per parameter) and against a NumPy transcription of the
authors' algorithm (20 configurations, skipped steps included); the fused path against the per-tensor one."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from pytorch_optimizer import ADOPT as ReferenceADOPT

from optimlab.optim.adopt import ADOPT

from .frontier_helpers import (assert_close, check_numpy_parity, numpy_grads, random_structure, run_torch,
                              sample_problem)
from .modern_helpers import random_configs

STEPS = 20
TOLERANCE = 1e-12
COUNT = 20


def _config(rng: np.random.Generator, allow_skips: bool) -> dict:
    kwargs = {
        "lr": float(math.exp(rng.uniform(math.log(1e-3), math.log(0.1)))),
        "betas": (float(rng.uniform(0.5, 0.95)), float(rng.choice([0.9999, rng.uniform(0.5, 0.999)]))),
        "eps": float(rng.choice([1e-6, 1e-3])),
        "weight_decay": float(rng.choice([0.0, rng.uniform(0.0, 0.3)])),
        "decouple": bool(rng.uniform() < 0.5),
        "clip_exponent": None if rng.uniform() < 0.25 else float(rng.uniform(0.1, 0.5)),
    }
    group = {"lr": float(rng.uniform(1e-3, 0.05)), "weight_decay": float(rng.uniform(0.0, 0.2))}
    return {"kwargs": kwargs, "structure": random_structure(rng, allow_skips=allow_skips, group_options=group)}


PO_CONFIGS = random_configs(161, COUNT, lambda rng: _config(rng, allow_skips=False))
NUMPY_CONFIGS = random_configs(162, COUNT, lambda rng: _config(rng, allow_skips=True))


def _reference_kwargs(kwargs: dict) -> dict:
    exponent = kwargs["clip_exponent"]
    return {"lr": kwargs["lr"], "betas": kwargs["betas"], "eps": kwargs["eps"], "weight_decay": kwargs["weight_decay"],
            "weight_decouple": kwargs["decouple"],
            "clip_lambda": None if exponent is None else (lambda step: step**exponent)}


@pytest.mark.parametrize("foreach", [True, False])
@pytest.mark.parametrize("index", range(COUNT))
def test_matches_pytorch_optimizer(index: int, foreach: bool) -> None:
    config = PO_CONFIGS[index]
    structure = config["structure"]
    problem = sample_problem(600 + index, structure)
    ours, _ = run_torch(lambda groups: ADOPT(groups, **config["kwargs"]), problem, structure, STEPS)
    reference, _ = run_torch(lambda groups: ReferenceADOPT(groups, foreach=foreach, **_reference_kwargs(config["kwargs"])),
                             problem, structure, STEPS)
    assert_close(ours, reference, TOLERANCE)


def numpy_adopt(problem, structure, steps, *, lr, betas, eps, weight_decay, decouple, clip_exponent):
    """Taniguchi et al. 2024 as in the authors' code: per-parameter step t; t = 1 only sets v = g^2; then
    the gradient normalised by max(sqrt(v_{t-1}), eps), clipped to t^c, momentum, step, then v."""
    params = problem.numpy_params()
    m = [np.zeros_like(p) for p in params]
    v = [np.zeros_like(p) for p in params]
    t = [0] * len(params)
    for step in range(1, steps + 1):
        grads = numpy_grads(problem, structure, params, step)
        for i, g in enumerate(grads):
            if g is None:
                continue
            options = {"lr": lr, "weight_decay": weight_decay}
            if structure.group_index(i) == 1:
                options.update(structure.group_options)
            t[i] += 1
            if decouple:
                params[i] = params[i] * (1 - options["lr"] * options["weight_decay"])
            else:
                g = g + options["weight_decay"] * params[i]
            if t[i] == 1:
                v[i] = g * g
                continue
            normed = g / np.maximum(np.sqrt(v[i]), eps)
            if clip_exponent is not None:
                normed = np.clip(normed, -t[i] ** clip_exponent, t[i] ** clip_exponent)
            m[i] = betas[0] * m[i] + (1 - betas[0]) * normed
            params[i] = params[i] - options["lr"] * m[i]
            v[i] = betas[1] * v[i] + (1 - betas[1]) * g * g
    return params


@pytest.mark.parametrize("index", range(COUNT))
def test_matches_numpy_transcription(index: int) -> None:
    config = NUMPY_CONFIGS[index]
    check_numpy_parity(lambda groups: ADOPT(groups, **config["kwargs"]), numpy_adopt, config, 700 + index, STEPS,
                       TOLERANCE)


def test_fused_matches_per_tensor() -> None:
    config = NUMPY_CONFIGS[1]
    structure = config["structure"]
    problem = sample_problem(1, structure)
    runs = [run_torch(lambda groups: ADOPT(groups, fused=fused, **config["kwargs"]), problem, structure, 6,
                      dtype=torch.float32)[0] for fused in (False, True)]
    assert_close(runs[1], runs[0], 1e-6)


@pytest.mark.parametrize(("kwargs", "match"), [({"lr": -1.0}, "lr"), ({"betas": (1.0, 0.9)}, "betas"),
                                               ({"eps": -1.0}, "eps"), ({"clip_exponent": -0.5}, "clip_exponent"),
                                               ({"weight_decay": -0.1}, "weight_decay")])
def test_validation(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        ADOPT([torch.zeros(2, requires_grad=True)], **kwargs)
