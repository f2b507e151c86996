"""Loss landscape: filter normalization, exact origin, slices vs closed forms, bitwise restore, plots."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from analysis_problems import Point, quadratic_loss, random_symmetric, small_mlp
from torch import nn

from optimlab.analysis._params import supervised_loss
from optimlab.analysis.landscape import (
    interpolate,
    normalize_direction,
    perturbation_probe,
    plot_contour,
    plot_slice_1d,
    plot_surface,
    random_direction,
    slice_1d,
    slice_2d,
)


class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3)
        self.norm = nn.BatchNorm2d(4)
        self.head = nn.Linear(4 * 4 * 4, 3)

    def forward(self, x):
        return self.head(torch.relu(self.norm(self.conv(x))).flatten(1))


def _convnet_problem(seed: int):
    torch.manual_seed(seed)
    model = ConvNet().double()
    batches = [(torch.randn(5, 2, 6, 6, dtype=torch.float64), torch.randint(0, 3, (5,))) for _ in range(2)]
    return model, supervised_loss(nn.functional.cross_entropy), batches


def _numpy_filter_normalized(raw: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """Li et al. 2018: every filter raw[j] rescaled to ||weight[j]|| (NumPy reference)."""
    out = np.empty_like(raw)
    for j in range(raw.shape[0]):
        out[j] = raw[j] * np.linalg.norm(weight[j]) / np.linalg.norm(raw[j])
    return out


def test_filter_normalization_matches_reference():
    for seed in range(10):
        model, _, _ = _convnet_problem(seed)
        gen = torch.Generator().manual_seed(seed)
        raw = {n: torch.randn(p.shape, generator=gen, dtype=p.dtype) for n, p in model.named_parameters()}
        direction = normalize_direction(raw, model, "filter")
        for name, weight in model.named_parameters():
            if weight.dim() > 1:
                expected = _numpy_filter_normalized(raw[name].numpy(), weight.detach().numpy())
                np.testing.assert_allclose(direction[name].numpy(), expected, rtol=1e-12, atol=0)
                filter_norms = direction[name].flatten(1).norm(dim=1)
                torch.testing.assert_close(filter_norms, weight.detach().flatten(1).norm(dim=1), rtol=1e-12, atol=0)
            else:
                assert torch.equal(direction[name], torch.zeros_like(weight))
        kept = normalize_direction(raw, model, "filter", ignore_1d=False)
        assert torch.equal(kept["conv.bias"], model.conv.bias.detach())
        layer = normalize_direction(raw, model, "layer")
        assert layer["head.weight"].norm().item() == pytest.approx(model.head.weight.norm().item(), rel=1e-12)
        assert torch.equal(normalize_direction(raw, model, "none")["conv.bias"], raw["conv.bias"])


def test_random_direction_is_seeded_and_normalized():
    model, _, _ = _convnet_problem(0)
    a = random_direction(model, generator=torch.Generator().manual_seed(3))
    b = random_direction(model, generator=torch.Generator().manual_seed(3))
    assert all(torch.equal(a[n], b[n]) for n in a)
    torch.testing.assert_close(a["conv.weight"].flatten(1).norm(dim=1),
                               model.conv.weight.detach().flatten(1).norm(dim=1), rtol=1e-12, atol=0)


def test_origin_equals_original_loss_and_parameters_restored_bitwise():
    for seed in range(5):
        model, loss_fn, batches = _convnet_problem(seed)
        model.train()
        loss_fn(model, batches[0]).backward()  # gradients present: they must survive too
        before = copy.deepcopy(model.state_dict())
        grads = [p.grad.clone() for p in model.parameters()]
        gen = torch.Generator().manual_seed(seed)
        dx, dy = random_direction(model, generator=gen), random_direction(model, generator=gen)
        model.eval()
        with torch.no_grad():
            original = np.mean([float(loss_fn(model, b)) for b in batches])
        model.train()
        grid = np.linspace(-1.0, 1.0, 5)
        plane = slice_2d(model, loss_fn, batches, dx, dy, grid, grid)
        assert plane.losses.shape == (5, 5)
        assert plane.losses[2, 2] == original
        assert model.training
        for key, value in model.state_dict().items():
            assert torch.equal(value, before[key]), key
        assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads))
        # one grid point against a hand-made evaluation
        manual = copy.deepcopy(model).eval()
        with torch.no_grad():
            for name, p in manual.named_parameters():
                p.add_(grid[4] * dx[name] + grid[1] * dy[name])
            expected = np.mean([float(loss_fn(manual, b)) for b in batches])
        assert plane.losses[1, 4] == pytest.approx(expected, rel=1e-12)


def test_slices_of_quadratic_match_closed_form():
    for seed in range(8):
        gen = torch.Generator().manual_seed(seed)
        dim = 6
        matrix = random_symmetric(torch.randn(dim, generator=gen, dtype=torch.float64), gen)
        start = torch.randn(dim, generator=gen, dtype=torch.float64)
        model, loss_fn, shift = Point(start), quadratic_loss(matrix), torch.zeros(dim, dtype=torch.float64)
        d1, d2 = torch.randn(dim, generator=gen, dtype=torch.float64), torch.randn(dim, generator=gen, dtype=torch.float64)
        xs, ys = np.linspace(-2, 2, 7), np.linspace(-1, 1, 3)
        plane = slice_2d(model, loss_fn, shift, {"x": d1}, {"x": d2}, xs, ys)
        line = slice_1d(model, loss_fn, shift, {"x": d1}, xs)
        for j, y in enumerate(ys):
            for i, x in enumerate(xs):
                point = start + x * d1 + y * d2
                assert plane.losses[j, i] == pytest.approx(float(0.5 * point @ matrix @ point), rel=1e-12, abs=1e-14)
        np.testing.assert_allclose(line.losses, plane.losses[1], rtol=1e-12)
        assert torch.equal(model.x.detach(), start)
        end = torch.randn(dim, generator=gen, dtype=torch.float64)
        alphas = np.linspace(-0.5, 1.5, 9)
        path = interpolate(model, loss_fn, shift, {"x": start}, {"x": end}, alphas)
        for alpha, loss in zip(alphas, path.losses):
            point = (1 - alpha) * start + alpha * end
            assert loss == pytest.approx(float(0.5 * point @ matrix @ point), rel=1e-12, abs=1e-14)
        assert path.losses[2] == float(0.5 * start @ matrix @ start)  # alpha = 0: exactly the start
        assert torch.equal(model.x.detach(), start)


def test_probe_statistics_and_restore():
    torch.manual_seed(0)
    model = small_mlp(3, 5, 2)
    batch = (torch.randn(16, 3, dtype=torch.float64), torch.randn(16, 2, dtype=torch.float64))
    loss_fn = supervised_loss(nn.functional.mse_loss)
    before = model[0].weight.detach().clone()
    result = perturbation_probe(model, loss_fn, batch, "0.weight", 0.3, num_samples=6,
                                generator=torch.Generator().manual_seed(5))
    assert torch.equal(model[0].weight.detach(), before)
    # the same draws, by hand
    gen, expected = torch.Generator().manual_seed(5), []
    for _ in range(6):
        twin = copy.deepcopy(model)
        with torch.no_grad():
            twin[0].weight.add_(0.3 * torch.randn(before.shape, generator=gen, dtype=torch.float64))
            expected.append(float(loss_fn(twin, batch)))
    np.testing.assert_allclose(result.losses, expected, rtol=1e-12)
    assert result.mean == pytest.approx(np.mean(expected), rel=1e-12)
    assert result.std == pytest.approx(np.std(expected, ddof=1), rel=1e-12)
    assert (result.min, result.max) == (min(expected), max(expected))
    with torch.no_grad():
        assert result.base_loss == float(loss_fn(model, batch))
    still = perturbation_probe(model, loss_fn, batch, "2.bias", 0.0, num_samples=3)
    assert still.losses == [still.base_loss] * 3 and still.std == 0.0


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda m, f, b: perturbation_probe(m, f, b, "nope", 0.1), "parameter"),
        (lambda m, f, b: perturbation_probe(m, f, b, "0.weight", -1.0), "scale"),
        (lambda m, f, b: perturbation_probe(m, f, b, "0.weight", 0.1, num_samples=0), "num_samples"),
        (lambda m, f, b: normalize_direction({}, m), "direction"),
        (lambda m, f, b: random_direction(m, normalization="unit"), "normalization"),
        (lambda m, f, b: slice_1d(m, f, b, random_direction(m), []), "alphas"),
        (lambda m, f, b: slice_2d(m, f, b, random_direction(m), None, [0.0], [1.0]), "ys"),
    ],
)
def test_bad_arguments_raise_value_error(call, match):
    model = small_mlp(3, 4, 1)
    batch = (torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 1, dtype=torch.float64))
    with pytest.raises(ValueError, match=match):
        call(model, supervised_loss(nn.functional.mse_loss), batch)


def test_plots_write_pngs(tmp_path):
    model, loss_fn, batches = _convnet_problem(0)
    gen = torch.Generator().manual_seed(0)
    dx, dy = random_direction(model, generator=gen), random_direction(model, generator=gen)
    grid = np.linspace(-1, 1, 7)
    plane = slice_2d(model, loss_fn, batches, dx, dy, grid, grid)
    line = slice_1d(model, loss_fn, batches, dx, grid)
    for path in (plot_contour(plane, tmp_path / "c.png"), plot_surface(plane, tmp_path / "s.png"),
                 plot_slice_1d({"random direction": line}, tmp_path / "l.png")):
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
