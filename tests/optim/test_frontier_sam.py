"""SAM / ASAM in float64 against a NumPy transcription of Foret et al. 2021 / Kwon et al. 2021 around SGD with
momentum (20 random configurations: rho, adaptive, two param groups with their own rho, weight decay, skipped
steps; 1e-12) and against pytorch-optimizer's ``SAM`` (20 configurations, other base optimizers too; it sums the
squared norms in float32, hence 1e-6) through the two-pass API; ``step(closure)`` equals the two passes; the
state_dict is the base optimizer's; bad input is refused."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from pytorch_optimizer import SAM as ReferenceSAM

from optimlab.optim import SAM, AdamW

from .frontier_helpers import assert_close, numpy_grads, random_structure, run_torch, sample_problem
from .modern_helpers import random_configs

STEPS = 15
# pytorch-optimizer sums the squared gradient norms in float32 (``.float()``), so the perturbation's size
# agrees to float32 accuracy only; it then moves the trajectory by rho times that
TOLERANCE = 1e-6
NUMPY_TOLERANCE = 1e-12
COUNT = 20
BASES = {"sgd": (torch.optim.SGD, {"lr": 0.02, "momentum": 0.9}), "adamw": (AdamW, {"lr": 0.01, "weight_decay": 0.1}),
         "sgd-wd": (torch.optim.SGD, {"lr": 0.02, "weight_decay": 0.05})}


def _config(rng: np.random.Generator) -> dict:
    base = str(rng.choice(list(BASES)))
    adaptive = bool(rng.uniform() < 0.5)
    rho = float(rng.uniform(0.01, 0.1) if not adaptive else rng.uniform(0.1, 0.5))
    group = {"rho": rho * float(rng.uniform(0.3, 3.0))}
    return {"base": base, "rho": rho, "adaptive": adaptive, "structure": random_structure(rng, group_options=group)}


CONFIGS = random_configs(201, COUNT, _config)


def _two_pass(optimizer, closure) -> None:
    closure()
    optimizer.first_step(zero_grad=True)
    closure()
    optimizer.second_step()


@pytest.mark.parametrize("index", range(COUNT))
def test_matches_pytorch_optimizer(index: int) -> None:
    config = CONFIGS[index]
    structure = config["structure"]
    problem = sample_problem(1400 + index, structure)
    base_cls, base_kwargs = BASES[config["base"]]
    options = {"rho": config["rho"], "adaptive": config["adaptive"], **base_kwargs}
    ours, _ = run_torch(lambda groups: SAM(groups, base_cls, **options), problem, structure, STEPS, step_fn=_two_pass)
    reference, _ = run_torch(lambda groups: ReferenceSAM(groups, base_cls, **options), problem, structure, STEPS,
                             step_fn=_two_pass)
    plain, _ = run_torch(lambda groups: base_cls(groups, **base_kwargs), problem, structure, STEPS)
    assert_close(ours, reference, TOLERANCE)
    assert max(float((a - b).detach().abs().max()) for a, b in zip(ours, plain)) > 1e-6  # the perturbation mattered


def numpy_sam_sgd(problem, structure, steps, *, rho, adaptive, lr, momentum, weight_decay):
    """SAM (ASAM: T_w = |w|) around torch's SGD with momentum and L2 weight decay, per parameter group."""
    params = problem.numpy_params()
    buffers = [None] * len(params)

    def group_of(i):
        return {"rho": rho, **structure.group_options} if structure.group_index(i) == 1 else {"rho": rho}

    for step in range(1, steps + 1):
        grads = numpy_grads(problem, structure, params, step)
        norm = np.sqrt(sum(np.sum(((np.abs(p) if adaptive else 1.0) * g) ** 2)
                           for p, g in zip(params, grads) if g is not None)) + 1e-12
        perturbed = [p + group_of(i)["rho"] / norm * (p**2 if adaptive else 1.0) * g if g is not None else p
                     for i, (p, g) in enumerate(zip(params, grads))]
        sharp = numpy_grads(problem, structure, perturbed, step)
        for i, g in enumerate(sharp):
            if g is None:
                continue
            g = g + weight_decay * params[i]
            buffers[i] = g if buffers[i] is None else momentum * buffers[i] + g
            params[i] = params[i] - lr * buffers[i]
    return params


NUMPY_CONFIGS = random_configs(202, COUNT, lambda rng: {
    "rho": float(rng.uniform(0.01, 0.2)), "adaptive": bool(rng.uniform() < 0.5), "lr": float(rng.uniform(0.005, 0.03)),
    "momentum": float(rng.choice([0.0, 0.9])), "weight_decay": float(rng.choice([0.0, 0.05])),
    "structure": random_structure(rng, group_options={"rho": float(rng.uniform(0.0, 0.3))})})


@pytest.mark.parametrize("index", range(COUNT))
def test_matches_numpy_transcription(index: int) -> None:
    config = dict(NUMPY_CONFIGS[index])
    structure = config.pop("structure")
    problem = sample_problem(1500 + index, structure)
    base = {key: config[key] for key in ("lr", "momentum", "weight_decay")}
    ours, _ = run_torch(lambda groups: SAM(groups, torch.optim.SGD, rho=config["rho"], adaptive=config["adaptive"], **base),
                        problem, structure, STEPS, step_fn=_two_pass)
    assert_close(ours, numpy_sam_sgd(problem, structure, STEPS, **config), NUMPY_TOLERANCE)


def test_step_with_closure_equals_the_two_passes() -> None:
    structure = random_structure(np.random.default_rng(4))
    problem = sample_problem(4, structure)
    make = lambda groups: SAM(groups, "adamw", rho=0.5, adaptive=True, lr=0.01)  # noqa: E731
    two_pass, _ = run_torch(make, problem, structure, STEPS, step_fn=_two_pass)
    losses = []
    one_call, _ = run_torch(make, problem, structure, STEPS, step_fn=lambda opt, closure: losses.append(opt.step(closure)))
    assert all(torch.equal(a, b) for a, b in zip(two_pass, one_call))
    assert float(losses[0]) == float(problem.loss(problem.torch_params()))  # the loss at w, not at w + eps


def test_state_dict_is_the_base_optimizers_and_resumes() -> None:
    structure = random_structure(np.random.default_rng(6), allow_skips=False)
    problem = sample_problem(6, structure)
    make = lambda groups: SAM(groups, "sgd-momentum", rho=0.05, lr=0.05)  # noqa: E731
    full, _ = run_torch(make, problem, structure, 12, step_fn=_two_pass)
    params, first = run_torch(make, problem, structure, 6, step_fn=_two_pass)
    saved = copy.deepcopy(first.state_dict())
    assert all(group["rho"] == 0.05 for group in saved["param_groups"]) and all("momentum_buffer" in s
                                                                               for s in saved["state"].values())
    resumed = make(structure.param_groups(params))
    resumed.load_state_dict(saved)
    for _ in range(6):
        def closure():
            resumed.zero_grad()
            loss = problem.loss(params)
            loss.backward()
            return loss
        _two_pass(resumed, closure)
    assert all(torch.equal(a, b) for a, b in zip(params, full))


def test_bad_input_is_refused() -> None:
    params = [torch.zeros(2, requires_grad=True)]
    with pytest.raises(ValueError, match="rho"):
        SAM(params, rho=-0.1)
    with pytest.raises(TypeError, match="base_optimizer"):
        SAM(params, base_optimizer=3)
    with pytest.raises(KeyError, match="Unknown optimizer"):
        SAM(params, base_optimizer="adamw-typo")
    with pytest.raises(RuntimeError, match="needs a closure"):
        SAM(params).step()
