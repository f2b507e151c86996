"""``cautious=True`` (Liang et al. 2024) on Adam, AdamW, Lion, Adafactor and LAMB.

1. Against a NumPy transcription of the mask: from the same state and gradient, the cautious step is
   the plain step masked to the components where the update agrees in sign with the gradient and
   scaled by n / (nnz + 1) (weight decay off, so the whole step is the masked direction); checked at
   every step of a run (the cautious optimizer loads the plain one's state before each step), over
   random configurations on every path (per-tensor, foreach, fused).
2. LAMB, where the mask acts before weight decay and the trust ratio: a NumPy transcription of
   cautious LAMB over whole trajectories.
3. ``cautious=False`` (the default) leaves every existing parity test untouched; the option is per group.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

from optimlab.optim import LAMB, Adafactor, Adam, AdamW, Lion

from .frontier_helpers import assert_close, numpy_grads, random_structure, run_torch, sample_problem
from .modern_helpers import as_numpy, random_configs

TOLERANCE = 1e-12


def numpy_cautious(update: np.ndarray, grad: np.ndarray) -> np.ndarray:
    """phi = 1[u * g > 0]; u * phi * n / (nnz(phi) + 1) (the authors' code)."""
    mask = (update * grad > 0).astype(np.float64)
    return update * mask * (mask.size / (mask.sum() + 1))


def _sample(rng: np.random.Generator) -> dict:
    cls = [Adam, AdamW, Lion, Adafactor][int(rng.integers(4))]
    path = str(rng.choice(["per-tensor", "foreach"] if cls is not Adafactor else ["per-tensor"]))
    kwargs = {"lr": float(rng.uniform(1e-3, 3e-2)), "weight_decay": 0.0}
    if cls in (Adam, AdamW):
        kwargs.update(betas=(float(rng.uniform(0.5, 0.95)), float(rng.uniform(0.9, 0.999))),
                      amsgrad=bool(rng.uniform() < 0.3), maximize=bool(rng.uniform() < 0.3))
    elif cls is Lion:
        kwargs.update(betas=(float(rng.uniform(0.5, 0.95)), float(rng.uniform(0.9, 0.999))))
    else:
        kwargs.update(beta1=None if rng.uniform() < 0.4 else float(rng.uniform(0.5, 0.95)),
                      relative_step=bool(rng.uniform() < 0.5))
    if path != "per-tensor" or cls is Lion:
        kwargs["foreach"] = path == "foreach"
    return {"cls": cls, "kwargs": kwargs, "structure": random_structure(rng)}


CONFIGS = random_configs(171, 20, _sample)


@pytest.mark.parametrize("index", range(len(CONFIGS)), ids=[f"{c['cls'].__name__}-{i}" for i, c in enumerate(CONFIGS)])
def test_cautious_step_is_the_masked_plain_step(index: int) -> None:
    config = CONFIGS[index]
    structure, cls, kwargs = config["structure"], config["cls"], config["kwargs"]
    problem = sample_problem(800 + index, structure)
    params = problem.torch_params()
    plain = cls(structure.param_groups(params), **kwargs)
    cautious = cls(structure.param_groups(params), **kwargs, cautious=True)
    detour = sample_problem(1800 + index, structure)  # the first steps descend another objective, so the
    masked_any = False                                 # momentum then disagrees with some gradient components
    for step in range(1, 13):
        plain.zero_grad()
        (detour if step <= 4 else problem).loss(params).backward()
        for position, param in enumerate(params):
            if structure.skipped(step, position):
                param.grad = None
        grads = [None if p.grad is None else as_numpy(p.grad) for p in params]
        start = [p.detach().clone() for p in params]
        cautious.load_state_dict(copy.deepcopy(plain.state_dict()))  # the plain state, groups included...
        for group in cautious.param_groups:
            group["cautious"] = True  # ...so the option is set again
        cautious.step()
        after_cautious = [p.detach().clone() for p in params]
        with torch.no_grad():
            for param, value in zip(params, start):
                param.copy_(value)
        plain.step()
        for before, plain_after, cautious_after, grad in zip(start, params, after_cautious, grads):
            if grad is None:
                assert torch.equal(cautious_after, before)
                continue
            direction = -(as_numpy(plain_after) - as_numpy(before))  # u: the step is -u
            sign = -1.0 if kwargs.get("maximize") else 1.0
            expected = as_numpy(before) - numpy_cautious(direction, sign * grad)
            assert_close([cautious_after], [expected], TOLERANCE)
            masked_any |= bool(np.any(direction * sign * grad <= 0))
    assert masked_any  # some component disagreed in sign, so the mask was exercised


def numpy_cautious_lamb(problem, structure, steps, *, lr, betas, eps, weight_decay):
    """You et al. 2020 Algorithm 2 with the cautious mask on the Adam ratio before decay and trust ratio."""
    params = problem.numpy_params()
    m = [np.zeros_like(p) for p in params]
    v = [np.zeros_like(p) for p in params]
    t = [0] * len(params)
    for step in range(1, steps + 1):
        for i, g in enumerate(numpy_grads(problem, structure, params, step)):
            if g is None:
                continue
            t[i] += 1
            m[i] = betas[0] * m[i] + (1 - betas[0]) * g
            v[i] = betas[1] * v[i] + (1 - betas[1]) * g * g
            ratio = (m[i] / (1 - betas[0] ** t[i])) / (np.sqrt(v[i] / (1 - betas[1] ** t[i])) + eps)
            update = numpy_cautious(ratio, g) + weight_decay * params[i]
            w_norm, u_norm = np.linalg.norm(params[i]), np.linalg.norm(update)
            trust = w_norm / u_norm if w_norm > 0 and u_norm > 0 else 1.0
            params[i] = params[i] - lr * trust * update
    return params


LAMB_CONFIGS = random_configs(172, 6, lambda rng: {
    "kwargs": {"lr": float(rng.uniform(1e-3, 3e-2)), "betas": (float(rng.uniform(0.5, 0.95)), float(rng.uniform(0.9, 0.999))),
               "eps": float(math.exp(rng.uniform(math.log(1e-8), math.log(1e-4)))),
               "weight_decay": float(rng.choice([0.0, rng.uniform(0.0, 0.2)]))},
    "foreach": bool(rng.uniform() < 0.5), "structure": random_structure(rng)})


@pytest.mark.parametrize("index", range(len(LAMB_CONFIGS)))
def test_cautious_lamb_matches_numpy(index: int) -> None:
    config = LAMB_CONFIGS[index]
    structure = config["structure"]
    problem = sample_problem(900 + index, structure)
    ours, _ = run_torch(lambda groups: LAMB(groups, **config["kwargs"], foreach=config["foreach"], cautious=True),
                        problem, structure, 15)
    assert_close(ours, numpy_cautious_lamb(problem, structure, 15, **config["kwargs"]), TOLERANCE)


@pytest.mark.parametrize(("cls", "kwargs"), [(AdamW, {"lr": 0.01}), (Lion, {"lr": 1e-3}), (LAMB, {"lr": 0.01}),
                                             (Adafactor, {"lr": 0.05, "beta1": 0.9})])
def test_fused_cautious_matches_unfused(cls, kwargs) -> None:
    """The fused path compiles the same rule with the mask (not packed: the rescaling is a per-tensor reduction)."""
    structure = random_structure(np.random.default_rng(3), allow_skips=False)
    problem = sample_problem(3, structure)
    runs = [run_torch(lambda groups: cls(groups, **kwargs, cautious=True, fused=fused), problem, structure, 5,
                      dtype=torch.float32)[0] for fused in (False, True)]
    assert_close(runs[1], runs[0], 1e-5)
    plain = run_torch(lambda groups: cls(groups, **kwargs), problem, structure, 5, dtype=torch.float32)[0]
    assert max(float((a - b).abs().max()) for a, b in zip(runs[0], plain)) > 1e-4  # the mask changed the run


def test_cautious_is_per_group_and_off_by_default() -> None:
    params = [torch.randn(4, 3, dtype=torch.float64, requires_grad=True) for _ in range(2)]
    optimizer = Adam([{"params": params[:1]}, {"params": params[1:], "cautious": True}], lr=0.1)
    assert [group["cautious"] for group in optimizer.param_groups] == [None, True]
