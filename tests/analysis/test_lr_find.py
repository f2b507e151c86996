"""LR range test: restores state bitwise, stops at divergence, suggests an LR inside the stable range."""

from __future__ import annotations

import copy
import inspect
import math

import numpy as np
import pytest
import torch
from analysis_problems import Point, quadratic_loss, random_symmetric
from torch import nn

from optimlab.analysis._params import supervised_loss, training_step
from optimlab.analysis.lr_find import lr_find, lr_schedule, plot_lr_find, smooth_losses, steepest_descent_index
from optimlab.optim.registry import create_optimizer, get_spec, list_optimizers


def _noisy_quadratic(seed: int):
    """SGD on 1/2 (x - xi)^T A (x - xi) with eigenvalues of A in [L/kappa, L]: stable iff lr < 2/L."""
    gen = torch.Generator().manual_seed(seed)
    dim = int(torch.randint(2, 20, (1,), generator=gen))
    curvature = float(10 ** (torch.rand(1, generator=gen) * 4 - 2))  # L in [0.01, 100]
    kappa = float(10 ** (torch.rand(1, generator=gen) * 2))
    matrix = random_symmetric(torch.linspace(curvature / kappa, curvature, dim), gen)
    model = Point(3 * torch.randn(dim, generator=gen, dtype=torch.float64))
    shifts = [0.1 * torch.randn(dim, generator=gen, dtype=torch.float64) for _ in range(50)]
    return model, quadratic_loss(matrix), shifts, curvature


@pytest.mark.parametrize("name", ["torch.sgd", "sgd", "sam-sgd"])
def test_suggestion_lies_in_stable_range_of_quadratic(name):
    for seed in range(12):
        model, loss_fn, shifts, curvature = _noisy_quadratic(seed)
        optimizer = create_optimizer(model, name, lr=0.1)
        result = lr_find(model, optimizer, loss_fn, shifts, start_lr=1e-4 / curvature, end_lr=1e3 / curvature,
                         num_iter=100)
        stable = 2.0 / curvature
        assert 1e-2 / curvature < result.suggested_lr < stable, (seed, result.suggested_lr * curvature)
        assert 1e-2 / curvature < result.min_loss_lr / 10 < stable, (seed, result.min_loss_lr * curvature)
        # early stop fired on divergence, and only beyond the stability bound
        assert result.diverged and len(result.lrs) < 100
        assert result.lrs[-1] > stable
        assert result.smoothed_losses[-1] > 4.0 * min(result.smoothed_losses[:-1])


def _weight_decay(name: str) -> float | None:
    """0.01 where the optimizer takes weight decay (Rprop, as torch's, does not)."""
    return 0.01 if "weight_decay" in inspect.signature(get_spec(name).resolve().__init__).parameters else None


def _adam_setup(name: str):
    model = nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, 3))
    optimizer = create_optimizer(model, name, lr=1e-3, weight_decay=_weight_decay(name))
    data = [(torch.randn(8, 6), torch.randint(0, 3, (8,))) for _ in range(5)]
    loss_fn = supervised_loss(nn.functional.cross_entropy)
    for batch in data[:3]:  # non-empty optimizer state and BatchNorm statistics
        training_step(model, optimizer, loss_fn, batch)
    model.eval()
    return model, optimizer, loss_fn, data


def _assert_nested_equal(a, b):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            _assert_nested_equal(a[key], b[key])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _assert_nested_equal(x, y)
    else:
        assert a == b or (isinstance(a, float) and math.isnan(a) and math.isnan(b))


@pytest.mark.parametrize("name", list_optimizers())
def test_model_optimizer_and_rng_restored_bitwise(name):
    model, optimizer, loss_fn, data = _adam_setup(name)
    twin_model = copy.deepcopy(model)
    twin_optimizer = create_optimizer(twin_model, name, lr=1e-3, weight_decay=_weight_decay(name))
    twin_optimizer.load_state_dict(copy.deepcopy(optimizer.state_dict()))
    model_before = copy.deepcopy(model.state_dict())
    optimizer_before = copy.deepcopy(optimizer.state_dict())
    rng_before = torch.get_rng_state()
    grads_before = [p.grad.clone() for p in model.parameters()]

    result = lr_find(model, optimizer, loss_fn, data, start_lr=1e-5, end_lr=10.0, num_iter=30)
    assert len(result.lrs) >= 2

    _assert_nested_equal(model.state_dict(), model_before)
    _assert_nested_equal(optimizer.state_dict(), optimizer_before)
    assert torch.equal(torch.get_rng_state(), rng_before)
    assert not model.training and not any(m.training for m in model.modules())
    _assert_nested_equal([p.grad for p in model.parameters()], grads_before)
    # the optimizer still references the model's parameters: the next step is identical to the twin's
    for m, opt in ((model, optimizer), (twin_model, twin_optimizer)):
        m.train()
        torch.manual_seed(1)
        training_step(m, opt, loss_fn, data[0])
    for p, q in zip(model.parameters(), twin_model.parameters()):
        assert torch.equal(p, q)


def test_lookahead_wrapper_restored_bitwise():
    from optimlab.optim.lookahead import Lookahead

    model, inner, loss_fn, data = _adam_setup("adamw")
    optimizer = Lookahead(inner, k=2, alpha=0.5)
    for batch in data[:3]:  # slow weights, an odd inner-step count
        optimizer.zero_grad()
        loss_fn(model, batch).backward()
        optimizer.step()
    model_before, optimizer_before = copy.deepcopy(model.state_dict()), copy.deepcopy(optimizer.state_dict())
    lr_find(model, optimizer, loss_fn, data, start_lr=1e-5, end_lr=1.0, num_iter=7)
    _assert_nested_equal(model.state_dict(), model_before)
    _assert_nested_equal(optimizer.state_dict(), optimizer_before)
    assert optimizer.inner_steps == 3


def test_restored_even_when_loss_fn_raises():
    model, optimizer, loss_fn, data = _adam_setup("torch.adamw")
    before = copy.deepcopy(model.state_dict())
    calls = []

    def failing(m, batch):
        calls.append(1)
        if len(calls) == 4:
            raise RuntimeError("boom")
        return loss_fn(m, batch)

    with pytest.raises(RuntimeError, match="boom"):
        lr_find(model, optimizer, failing, data, num_iter=10)
    _assert_nested_equal(model.state_dict(), before)
    assert optimizer.param_groups[0]["lr"] == 1e-3


def test_schedule_and_smoothing_match_formulas():
    lrs = lr_schedule(1e-6, 1.0, 7, "exp")
    np.testing.assert_allclose(lrs, np.logspace(-6, 0, 7), rtol=1e-13)
    np.testing.assert_allclose(lr_schedule(0.1, 0.7, 4, "linear"), [0.1, 0.3, 0.5, 0.7], rtol=1e-13)
    rng = np.random.default_rng(0)
    losses = rng.random(40)
    for beta in (0.0, 0.5, 0.98):
        expected = [sum((1 - beta) * beta ** (i - j) * losses[j] for j in range(i + 1)) / (1 - beta ** (i + 1))
                    for i in range(40)]
        np.testing.assert_allclose(smooth_losses(losses, beta), expected, rtol=1e-12)
    # steepest descent of a known curve: loss = -tanh(log10(lr) + 3) falls fastest at lr = 1e-3
    grid = lr_schedule(1e-6, 1.0, 61)
    curve = [-math.tanh(math.log10(lr) + 3) for lr in grid]
    assert grid[steepest_descent_index(grid, curve)] == pytest.approx(1e-3, rel=1e-9)


def test_steepest_descent_prefers_a_sustained_descent_to_a_wiggle():
    # a sigmoid descent centred at lr = 0.1 (slope 1.5 per decade) and a sharp one-point dip near lr = 1e-5
    grid = lr_schedule(1e-7, 10.0, 101)
    curve = [10 - 3 / (1 + math.exp(-2 * (math.log10(lr) + 1))) - 0.5 * math.exp(-((i - 25) ** 2)) for i, lr in
             enumerate(grid)]
    assert grid[steepest_descent_index(grid, curve, radius=1)] < 1e-4  # the plain derivative falls for the dip
    assert grid[steepest_descent_index(grid, curve)] == pytest.approx(0.1, rel=0.25)
    # a steeper fall after a bump beyond the curve's minimum is not a candidate
    tail = curve[:80] + [curve[79] + 3 - 0.5 * j for j in range(6)]
    assert steepest_descent_index(grid[:86], tail, skip_end=0) < 80


def test_linear_mode_sets_every_group_lr():
    model = nn.Linear(3, 1)
    optimizer = torch.optim.SGD([{"params": [model.weight]}, {"params": [model.bias], "lr": 0.5}], lr=0.1)
    seen = []

    def loss_fn(m, batch):
        seen.append([g["lr"] for g in optimizer.param_groups])
        return (m(batch) ** 2).mean()

    result = lr_find(model, optimizer, loss_fn, [torch.randn(4, 3)], start_lr=0.01, end_lr=0.05, num_iter=5,
                     mode="linear", diverge_factor=1e9)
    np.testing.assert_allclose([s[0] for s in seen], [0.01, 0.02, 0.03, 0.04, 0.05], rtol=1e-12)
    assert all(s[0] == s[1] for s in seen)
    assert not result.diverged and [g["lr"] for g in optimizer.param_groups] == [0.1, 0.5]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"start_lr": 0.0}, "start_lr"),
        ({"start_lr": 1.0, "end_lr": 0.5}, "end_lr"),
        ({"num_iter": 1}, "num_iter"),
        ({"mode": "cosine"}, "mode"),
        ({"beta": 1.0}, "beta"),
        ({"diverge_factor": 1.0}, "diverge_factor"),
    ],
)
def test_bad_arguments_raise_value_error(kwargs, match):
    model = nn.Linear(2, 1)
    with pytest.raises(ValueError, match=match):
        lr_find(model, torch.optim.SGD(model.parameters(), lr=0.1), lambda m, b: m(b).sum(), [torch.ones(1, 2)],
                **kwargs)


def test_empty_data_raises():
    model = nn.Linear(2, 1)
    with pytest.raises(ValueError, match="data"):
        lr_find(model, torch.optim.SGD(model.parameters(), lr=0.1), lambda m, b: m(b).sum(), [], num_iter=3)


def test_plot_writes_png(tmp_path):
    model, loss_fn, shifts, curvature = _noisy_quadratic(0)
    result = lr_find(model, torch.optim.SGD(model.parameters(), lr=0.1), loss_fn, shifts,
                     start_lr=1e-4 / curvature, end_lr=1e3 / curvature)
    path = plot_lr_find(result, tmp_path / "lr.png", stable_lr_bound=2 / curvature)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
