"""Parity of the modern optimizers with their references, in float64 over 25 steps, hyperparameters varied.

References: the peer packages (``lion_pytorch``, ``schedulefree``), ``torch.optim.Adafactor`` and
``torch.optim.Muon`` where they implement the same rule, and small NumPy transcriptions of the papers'
pseudo-code below (LAMB Algorithm 2, LARS Algorithm 1, Adafactor Algorithms 4/5 with momentum,
Muon with a float64 Newton–Schulz iteration).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from lion_pytorch import Lion as ReferenceLion
from schedulefree import AdamWScheduleFree

from optimlab.optim import LAMB, LARS, Adafactor, Lion, Muon, MuonWithAdamW, ScheduleFreeAdamW

from .modern_helpers import MATRIX_SHAPES, max_abs_diff, quartic_problem, random_configs, train

STEPS = 25
TIGHT = 1e-12  # same floating-point operations as the reference, up to reordering
NUMPY_TOL = 1e-10  # independent NumPy transcription of the paper


def _loguniform(rng: np.random.Generator, low: float, high: float) -> float:
    return float(math.exp(rng.uniform(math.log(low), math.log(high))))


def _assert_torch_parity(ours_cls, reference_cls, config: dict, *, seed: int, shapes=None, ours_extra=None,
                         reference_extra=None, tolerance: float = TIGHT) -> tuple[list, list, object, object]:
    problem = quartic_problem(seed) if shapes is None else quartic_problem(seed, shapes)
    ours_params, reference_params = problem.torch_params(), problem.torch_params()
    ours = ours_cls(ours_params, **config, **(ours_extra or {}))
    reference = reference_cls(reference_params, **config, **(reference_extra or {}))
    if hasattr(reference, "train"):
        reference.train()
    train(ours, ours_params, problem.loss, STEPS)
    train(reference, reference_params, problem.loss, STEPS)
    assert max_abs_diff(ours_params, reference_params) <= tolerance
    return ours_params, reference_params, ours, reference


# ---------------------------------------------------------------- Lion vs lion_pytorch

LION_CONFIGS = random_configs(1, 6, lambda rng: {
    "lr": _loguniform(rng, 1e-4, 3e-2),
    "betas": (float(rng.uniform(0.5, 0.99)), float(rng.uniform(0.9, 0.999))),
    "weight_decay": float(rng.choice([0.0, rng.uniform(0.0, 0.5)])),
})


@pytest.mark.parametrize("foreach", [True, False])
@pytest.mark.parametrize("index", range(len(LION_CONFIGS)))
def test_lion_matches_lion_pytorch(index: int, foreach: bool) -> None:
    _assert_torch_parity(Lion, ReferenceLion, LION_CONFIGS[index], seed=index, ours_extra={"foreach": foreach})


# ---------------------------------------------------------------- ScheduleFreeAdamW vs schedulefree

SF_CONFIGS = random_configs(2, 6, lambda rng: {
    "lr": _loguniform(rng, 1e-3, 1e-1),
    "betas": (float(rng.uniform(0.5, 0.95)), float(rng.uniform(0.9, 0.999))),
    "eps": _loguniform(rng, 1e-10, 1e-6),
    "weight_decay": float(rng.choice([0.0, rng.uniform(0.0, 0.2)])),
    "warmup_steps": int(rng.choice([0, 5, 10])),
    "r": float(rng.choice([0.0, rng.uniform(0.0, 1.0)])),
    "weight_lr_power": float(rng.choice([0.0, 2.0, rng.uniform(0.0, 3.0)])),
})


@pytest.mark.parametrize("foreach", [True, False])
@pytest.mark.parametrize("index", range(len(SF_CONFIGS)))
def test_schedule_free_matches_schedulefree_package(index: int, foreach: bool) -> None:
    ours_params, reference_params, ours, reference = _assert_torch_parity(
        ScheduleFreeAdamW, AdamWScheduleFree, SF_CONFIGS[index], seed=10 + index,
        ours_extra={"foreach": foreach}, reference_extra={"foreach": foreach},
    )
    ours.eval()
    reference.eval()
    assert max_abs_diff(ours_params, reference_params) <= TIGHT  # the averaged weights x
    ours.train()
    reference.train()
    assert max_abs_diff(ours_params, reference_params) <= TIGHT


# ---------------------------------------------------------------- Adafactor vs torch.optim.Adafactor

ADAFACTOR_TORCH_CONFIGS = random_configs(3, 6, lambda rng: {
    "lr": _loguniform(rng, 1e-3, 0.3),
    "beta2_decay": float(rng.uniform(-1.0, -0.5)),
    "eps": (None if rng.uniform() < 0.5 else _loguniform(rng, 1e-30, 1e-10), _loguniform(rng, 1e-4, 1e-2)),
    "d": float(rng.uniform(1.0, 2.0)),
    "weight_decay": float(rng.choice([0.0, rng.uniform(0.0, 0.3)])),
})


@pytest.mark.parametrize("torch_foreach", [True, False])
@pytest.mark.parametrize("index", range(len(ADAFACTOR_TORCH_CONFIGS)))
def test_adafactor_matches_torch_adafactor(index: int, torch_foreach: bool) -> None:
    _assert_torch_parity(Adafactor, torch.optim.Adafactor, ADAFACTOR_TORCH_CONFIGS[index], seed=20 + index,
                         reference_extra={"foreach": torch_foreach})


def _numpy_adafactor_paper(problem, *, lr, beta2_decay, eps2, d, beta1, relative_step, scale_parameter,
                           weight_decay, eps1=1e-30):
    """Shazeer & Stern 2018, Algorithms 4 (matrices: sums over rows/columns) and 5 (vectors), with
    eps1 added to G^2 as in the paper, update clipping, relative step, and momentum on the clipped update."""
    params = problem.numpy_params()
    row_sums = [np.zeros(p.shape[:-1] + (1,)) if p.ndim > 1 else None for p in params]
    col_sums = [np.zeros(p.shape[:-2] + (1, p.shape[-1])) if p.ndim > 1 else None for p in params]
    variances = [np.zeros(p.shape) if p.ndim <= 1 else None for p in params]
    momenta = [np.zeros(p.shape) for p in params]
    rms = lambda x: math.sqrt(float(np.mean(np.square(x)))) if x.size else 0.0  # noqa: E731
    for t in range(1, STEPS + 1):
        grads = problem.numpy_grads(params)
        beta2_hat = 1 - t**beta2_decay
        rho = min(lr, 1 / math.sqrt(t)) if relative_step else lr
        for i, (x, g) in enumerate(zip(params, grads)):
            alpha = max(eps2, rms(x)) * rho if scale_parameter else rho
            x *= 1 - lr * weight_decay
            squared = g * g + eps1
            if x.ndim > 1:
                row_sums[i] = beta2_hat * row_sums[i] + (1 - beta2_hat) * squared.sum(axis=-1, keepdims=True)
                col_sums[i] = beta2_hat * col_sums[i] + (1 - beta2_hat) * squared.sum(axis=-2, keepdims=True)
                v_hat = row_sums[i] @ col_sums[i] / row_sums[i].sum(axis=-2, keepdims=True)
            else:
                variances[i] = beta2_hat * variances[i] + (1 - beta2_hat) * squared
                v_hat = variances[i]
            update = g / np.sqrt(v_hat)
            update = update / max(1.0, rms(update) / d)
            if beta1 is not None:
                momenta[i] = beta1 * momenta[i] + (1 - beta1) * update
                update = momenta[i]
            x -= alpha * update
    return params


ADAFACTOR_PAPER_CONFIGS = random_configs(4, 8, lambda rng: {
    "lr": _loguniform(rng, 1e-3, 0.3),
    "beta2_decay": float(rng.uniform(-1.0, -0.5)),
    "eps2": _loguniform(rng, 1e-4, 1e-2),
    "d": float(rng.uniform(1.0, 2.0)),
    "beta1": None if rng.uniform() < 0.3 else float(rng.uniform(0.5, 0.99)),
    "relative_step": bool(rng.uniform() < 0.5),
    "scale_parameter": bool(rng.uniform() < 0.5),
    "weight_decay": float(rng.choice([0.0, rng.uniform(0.0, 0.3)])),
})


@pytest.mark.parametrize("index", range(len(ADAFACTOR_PAPER_CONFIGS)))
def test_adafactor_matches_paper_algorithm(index: int) -> None:
    config = ADAFACTOR_PAPER_CONFIGS[index]
    problem = quartic_problem(30 + index)
    params = problem.torch_params()
    optimizer = Adafactor(params, lr=config["lr"], beta2_decay=config["beta2_decay"], eps=(1e-30, config["eps2"]),
                          d=config["d"], weight_decay=config["weight_decay"], beta1=config["beta1"],
                          relative_step=config["relative_step"], scale_parameter=config["scale_parameter"])
    train(optimizer, params, problem.loss, STEPS)
    assert max_abs_diff(params, _numpy_adafactor_paper(problem, **config)) <= NUMPY_TOL


def test_adafactor_factored_state_is_sublinear() -> None:
    param = torch.zeros(64, 32, requires_grad=True)
    optimizer = Adafactor([param])
    param.grad = torch.randn(64, 32)
    optimizer.step()
    state = optimizer.state[param]
    assert state["row_var"].shape == (64, 1) and state["col_var"].shape == (1, 32)
    assert "variance" not in state and "exp_avg" not in state


# ---------------------------------------------------------------- Muon vs torch.optim.Muon and NumPy

MUON_CONFIGS = random_configs(5, 6, lambda rng: {
    "lr": _loguniform(rng, 1e-3, 1e-1),
    "weight_decay": float(rng.choice([0.0, rng.uniform(0.0, 0.3)])),
    "momentum": float(rng.uniform(0.5, 0.99)),
    "nesterov": bool(rng.uniform() < 0.5),
    "ns_steps": int(rng.choice([3, 5, 7])),
    "adjust_lr_fn": [None, "original", "match_rms_adamw"][int(rng.integers(3))],
})


@pytest.mark.parametrize("index", range(len(MUON_CONFIGS)))
def test_muon_matches_torch_muon(index: int) -> None:
    _assert_torch_parity(Muon, torch.optim.Muon, MUON_CONFIGS[index], seed=40 + index, shapes=MATRIX_SHAPES)


def _numpy_newton_schulz(matrix: np.ndarray, steps: int, eps: float = 1e-7) -> np.ndarray:
    a, b, c = 3.4445, -4.7750, 2.0315
    x = matrix.T if matrix.shape[0] > matrix.shape[1] else matrix
    x = x / max(np.linalg.norm(x), eps)
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.T if matrix.shape[0] > matrix.shape[1] else x


def _numpy_muon(problem, *, lr, weight_decay, momentum, nesterov, ns_steps, adjust_lr_fn):
    params = problem.numpy_params()
    buffers = [np.zeros(p.shape) for p in params]
    for _ in range(STEPS):
        for i, (x, g) in enumerate(zip(params, problem.numpy_grads(params))):
            buffers[i] = momentum * buffers[i] + (1 - momentum) * g
            direction = (1 - momentum) * g + momentum * buffers[i] if nesterov else buffers[i]
            rows, cols = x.shape
            scale = 0.2 * math.sqrt(max(rows, cols)) if adjust_lr_fn == "match_rms_adamw" else math.sqrt(max(1, rows / cols))
            x *= 1 - lr * weight_decay
            x -= lr * scale * _numpy_newton_schulz(direction, ns_steps)
    return params


@pytest.mark.parametrize("index", range(len(MUON_CONFIGS)))
def test_muon_float64_iteration_matches_numpy(index: int) -> None:
    config = MUON_CONFIGS[index]
    problem = quartic_problem(50 + index, MATRIX_SHAPES)
    params = problem.torch_params()
    train(Muon(params, **config, ns_dtype=torch.float64), params, problem.loss, STEPS)
    # the quintic iteration (coefficients up to 4.8, up to 7 rounds per step) amplifies rounding ~10x more
    assert max_abs_diff(params, _numpy_muon(problem, **config)) <= 10 * NUMPY_TOL


@pytest.mark.parametrize("shape", [(64, 32), (32, 128), (48, 48)])
def test_newton_schulz_output_is_nearly_orthogonal(shape: tuple[int, int]) -> None:
    from optimlab.optim.muon import newton_schulz_orthogonalize

    generator = torch.Generator().manual_seed(0)
    left = torch.linalg.qr(torch.randn(shape[0], min(shape), generator=generator, dtype=torch.float64))[0]
    right = torch.linalg.qr(torch.randn(shape[1], min(shape), generator=generator, dtype=torch.float64))[0]
    singular = torch.logspace(-1, 1, min(shape), dtype=torch.float64)  # condition number 100
    matrix = left @ torch.diag(singular) @ right.T
    for dtype in (torch.float64, torch.bfloat16):
        values = torch.linalg.svdvals(newton_schulz_orthogonalize(matrix, dtype=dtype).double())
        assert 0.6 <= float(values.min()) and float(values.max()) <= 1.25, dtype
        assert newton_schulz_orthogonalize(matrix, dtype=dtype).dtype == dtype


def test_muon_with_adamw_routes_groups_to_muon_and_adamw() -> None:
    problem = quartic_problem(60)  # matrices, a vector, a 3-D tensor and a scalar
    params, reference_params = problem.torch_params(), problem.torch_params()
    ours = MuonWithAdamW(params, lr=0.05, weight_decay=0.1, momentum=0.9, adamw_lr=0.01, adamw_betas=(0.8, 0.95),
                         adamw_weight_decay=0.05)
    assert [group["use_muon"] for group in ours.param_groups] == [True, False]
    references = [
        torch.optim.Muon([p for p in reference_params if p.dim() == 2], lr=0.05, weight_decay=0.1, momentum=0.9),
        torch.optim.AdamW([p for p in reference_params if p.dim() != 2], lr=0.01, betas=(0.8, 0.95),
                          weight_decay=0.05),
    ]
    for _ in range(STEPS):
        ours.zero_grad()
        problem.loss(params).backward()
        ours.step()
        for reference in references:
            reference.zero_grad()
        problem.loss(reference_params).backward()
        for reference in references:
            reference.step()
    assert max_abs_diff(params, reference_params) <= TIGHT


def test_muon_rejects_non_matrix_params() -> None:
    with pytest.raises(ValueError, match="2-D"):
        Muon([torch.zeros(3, requires_grad=True)])
    with pytest.raises(ValueError, match="use_muon"):
        MuonWithAdamW([{"params": [torch.zeros(3, requires_grad=True)], "use_muon": True}])


# ---------------------------------------------------------------- LAMB vs NumPy (You et al. 2020, Algorithm 2)

def _trust(weight_norm: float, update_norm: float, cap: float | None = None) -> float:
    if weight_norm == 0 or update_norm == 0:
        return 1.0
    ratio = weight_norm / update_norm
    return min(ratio, cap) if cap is not None else ratio


def _numpy_lamb(problem, *, lr, betas, eps, weight_decay, bias_correction, max_trust_ratio):
    beta1, beta2 = betas
    params = problem.numpy_params()
    m = [np.zeros(p.shape) for p in params]
    v = [np.zeros(p.shape) for p in params]
    for t in range(1, STEPS + 1):
        for i, (x, g) in enumerate(zip(params, problem.numpy_grads(params))):
            m[i] = beta1 * m[i] + (1 - beta1) * g
            v[i] = beta2 * v[i] + (1 - beta2) * g * g
            m_hat = m[i] / (1 - beta1**t) if bias_correction else m[i]
            v_hat = v[i] / (1 - beta2**t) if bias_correction else v[i]
            update = m_hat / (np.sqrt(v_hat) + eps) + weight_decay * x
            x -= lr * _trust(np.linalg.norm(x), np.linalg.norm(update), max_trust_ratio) * update
    return params


LAMB_CONFIGS = random_configs(6, 6, lambda rng: {
    "lr": _loguniform(rng, 1e-3, 1e-1),
    "betas": (float(rng.uniform(0.5, 0.95)), float(rng.uniform(0.9, 0.999))),
    "eps": _loguniform(rng, 1e-8, 1e-4),
    "weight_decay": float(rng.choice([0.0, rng.uniform(0.0, 0.3)])),
    "bias_correction": bool(rng.uniform() < 0.7),
    "max_trust_ratio": None if rng.uniform() < 0.5 else float(rng.uniform(0.5, 5.0)),
})


@pytest.mark.parametrize("foreach", [True, False])
@pytest.mark.parametrize("index", range(len(LAMB_CONFIGS)))
def test_lamb_matches_paper_algorithm(index: int, foreach: bool) -> None:
    problem = quartic_problem(70 + index)
    params = problem.torch_params()
    train(LAMB(params, **LAMB_CONFIGS[index], foreach=foreach), params, problem.loss, STEPS)
    assert max_abs_diff(params, _numpy_lamb(problem, **LAMB_CONFIGS[index])) <= NUMPY_TOL


# ---------------------------------------------------------------- LARS vs NumPy (You et al. 2017, Algorithm 1)

def _numpy_lars(problem, *, lr, momentum, weight_decay, trust_coefficient, eps, exclude_bias_and_norm):
    params = problem.numpy_params()
    velocities = [np.zeros(p.shape) for p in params]
    for _ in range(STEPS):
        for i, (w, g) in enumerate(zip(params, problem.numpy_grads(params))):
            if exclude_bias_and_norm and w.ndim <= 1:
                local_lr, decay = 1.0, 0.0
            else:
                decay = weight_decay
                w_norm, g_norm = np.linalg.norm(w), np.linalg.norm(g)
                local_lr = trust_coefficient * w_norm / (g_norm + decay * w_norm + eps) if w_norm > 0 and g_norm > 0 else 1.0
            velocities[i] = momentum * velocities[i] + lr * local_lr * (g + decay * w)
            w -= velocities[i]
    return params


LARS_CONFIGS = random_configs(7, 6, lambda rng: {
    "lr": _loguniform(rng, 0.01, 0.05),
    "momentum": float(rng.uniform(0.0, 0.95)),
    "weight_decay": float(rng.choice([0.0, rng.uniform(0.0, 0.1)])),
    "trust_coefficient": _loguniform(rng, 1e-2, 0.3),
    "eps": _loguniform(rng, 1e-9, 1e-6),
    "exclude_bias_and_norm": bool(rng.uniform() < 0.5),
})


@pytest.mark.parametrize("foreach", [True, False])
@pytest.mark.parametrize("index", range(len(LARS_CONFIGS)))
def test_lars_matches_paper_algorithm(index: int, foreach: bool) -> None:
    problem = quartic_problem(80 + index)
    params = problem.torch_params()
    train(LARS(params, **LARS_CONFIGS[index], foreach=foreach), params, problem.loss, STEPS)
    assert max_abs_diff(params, _numpy_lars(problem, **LARS_CONFIGS[index])) <= NUMPY_TOL


@pytest.mark.parametrize("cls", [LAMB, LARS])
def test_trust_ratio_is_one_for_zero_weights(cls) -> None:
    param = torch.zeros(4, 3, requires_grad=True)
    optimizer = cls([param], lr=0.1, **({"momentum": 0.0} if cls is LARS else {"betas": (0.0, 0.0), "eps": 0.0}))
    param.grad = torch.full((4, 3), 2.0)
    optimizer.step()
    # LARS: w = -lr * g; LAMB with beta=0, eps=0: update = sign(g) = 1, w = -lr
    expected = -0.1 * 2.0 if cls is LARS else -0.1
    torch.testing.assert_close(param.detach(), torch.full((4, 3), expected), rtol=0, atol=1e-7)
