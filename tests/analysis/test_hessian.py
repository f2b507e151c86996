"""Hessian: products, Lanczos extremes, Hutchinson trace and SLQ vs the exact Hessian; sign pattern; 2/λmax."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from analysis_problems import Point, quadratic_loss, random_symmetric, small_mlp
from torch import nn
from torch.func import functional_call

from optimlab.analysis._params import flatten, supervised_loss, unflatten
from optimlab.analysis.hessian import (
    HessianOperator,
    analyze_curvature,
    classify_curvature,
    hutchinson_trace,
    lanczos_eigenvalues,
    plot_spectrum,
    spectral_density,
    stability_bound,
)


def _mlp_problem(seed: int):
    """A tanh MLP 6-20-4 (224 parameters) with an MSE loss on two batches, float64."""
    torch.manual_seed(seed)
    model = small_mlp(6, 20, 4)
    batches = [(torch.randn(32, 6, dtype=torch.float64), torch.randn(32, 4, dtype=torch.float64)) for _ in range(2)]
    return model, supervised_loss(nn.functional.mse_loss), batches


def _exact_hessian(model, loss_fn, batches) -> torch.Tensor:
    """The dense Hessian of the mean batch loss by torch.autograd.functional.hessian (the reference)."""
    names = [n for n, _ in model.named_parameters()]
    like = [p.detach() for p in model.parameters()]

    def loss_of(flat):
        params = dict(zip(names, unflatten(flat, like)))
        stateless = lambda batch: functional_call(model, params, (batch[0],))  # noqa: E731
        return sum(loss_fn(lambda x: stateless((x,)), b) for b in batches) / len(batches)

    return torch.autograd.functional.hessian(loss_of, flatten(like))


def test_hessian_vector_products_match_exact_hessian():
    model, loss_fn, batches = _mlp_problem(0)
    exact = _exact_hessian(model, loss_fn, batches)
    operator = HessianOperator(model, loss_fn, batches)
    assert operator.dim == 224 == exact.shape[0]
    gen = torch.Generator().manual_seed(0)
    for _ in range(5):
        v = torch.randn(operator.dim, generator=gen, dtype=torch.float64)
        torch.testing.assert_close(operator.matvec(v), exact @ v, rtol=1e-10, atol=1e-12)


def test_operator_over_a_parameter_subset_is_the_matching_block():
    model, loss_fn, batches = _mlp_problem(2)
    exact = _exact_hessian(model, loss_fn, batches)
    last = [model[2].weight, model[2].bias]  # the last 84 of the 224 flat coordinates
    operator = HessianOperator(model, loss_fn, batches, params=last)
    assert operator.dim == 84
    block = exact[140:, 140:]
    columns = torch.stack([operator.matvec(e) for e in torch.eye(84, dtype=torch.float64)], dim=1)
    torch.testing.assert_close(columns, block, rtol=1e-10, atol=1e-12)
    gradient = torch.autograd.grad(sum(loss_fn(model, b) for b in batches) / 2, last)
    torch.testing.assert_close(operator.gradient(), flatten(gradient), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("seed", range(4))
def test_top_eigenvalues_and_minimum_match_exact_hessian(seed):
    model, loss_fn, batches = _mlp_problem(seed)
    exact = torch.linalg.eigvalsh(_exact_hessian(model, loss_fn, batches)).numpy()
    operator = HessianOperator(model, loss_fn, batches)
    estimate = lanczos_eigenvalues(operator, operator.dim, k=5, max_iter=120, tol=1e-8,
                                   generator=torch.Generator().manual_seed(seed))
    assert estimate.converged and estimate.iterations < operator.dim
    np.testing.assert_allclose(estimate.top, exact[::-1][:5], rtol=1e-3)
    np.testing.assert_allclose(estimate.top, exact[::-1][:5], rtol=1e-6)  # in fact far tighter
    assert estimate.lambda_min == pytest.approx(exact[0], rel=1e-6)
    assert classify_curvature(estimate.lambda_min, estimate.lambda_max) == (
        "saddle" if exact[0] < -1e-6 * abs(exact).max() else "positive-semidefinite")


def test_hutchinson_trace_matches_exact_trace_within_its_standard_error():
    model, loss_fn, batches = _mlp_problem(0)
    exact = _exact_hessian(model, loss_fn, batches)
    operator = HessianOperator(model, loss_fn, batches)
    # every probe's quadratic form is exact (to rounding)
    gen = torch.Generator().manual_seed(1)
    estimate = hutchinson_trace(operator, operator.dim, num_probes=8, generator=gen)
    gen = torch.Generator().manual_seed(1)
    for sample in estimate.samples:
        z = torch.randint(0, 2, (operator.dim,), generator=gen).double() * 2 - 1
        assert sample == pytest.approx(float(z @ exact @ z), rel=1e-10)
    # the estimate sits within 4 standard errors of the exact trace, and the error is the theoretical one
    trace = float(exact.trace())
    off_diagonal = float((exact**2).sum() - (exact.diagonal() ** 2).sum())
    for seed in range(5):
        estimate = hutchinson_trace(operator, operator.dim, num_probes=200, generator=torch.Generator().manual_seed(seed))
        assert abs(estimate.value - trace) < 4 * estimate.standard_error
        assert estimate.standard_error == pytest.approx(math.sqrt(2 * off_diagonal / 200), rel=0.3)


def test_trace_exact_for_diagonal_hessian():
    gen = torch.Generator().manual_seed(0)
    diag = torch.randn(30, generator=gen, dtype=torch.float64)
    model = Point(torch.randn(30, generator=gen, dtype=torch.float64))
    operator = HessianOperator(model, quadratic_loss(torch.diag(diag)), torch.zeros(30, dtype=torch.float64))
    estimate = hutchinson_trace(operator, 30, num_probes=3, generator=gen)
    assert estimate.value == pytest.approx(float(diag.sum()), rel=1e-12) and estimate.standard_error < 1e-12


def test_slq_quadrature_reproduces_moments():
    model, loss_fn, batches = _mlp_problem(1)
    exact = _exact_hessian(model, loss_fn, batches)
    operator = HessianOperator(model, loss_fn, batches)
    steps = 12
    density = spectral_density(operator, operator.dim, num_runs=1, num_steps=steps,
                               generator=torch.Generator().manual_seed(7))
    start = (torch.randint(0, 2, (operator.dim,), generator=torch.Generator().manual_seed(7)).double() * 2 - 1)
    start = start / start.norm()
    nodes, weights = density.nodes[0], density.weights[0]
    assert weights.sum() == pytest.approx(1.0, rel=1e-12)
    power = start.clone()
    for degree in range(1, 2 * steps):  # Gauss quadrature with m nodes is exact up to degree 2m - 1
        power = exact @ power
        assert float(weights @ nodes**degree) == pytest.approx(float(start @ power), rel=1e-6), degree
    grid = np.linspace(nodes.min() - 1, nodes.max() + 1, 20001)
    assert np.trapezoid(density.density(grid, 0.05), grid) == pytest.approx(1.0, rel=1e-6)
    full = spectral_density(operator, operator.dim, num_runs=3, num_steps=operator.dim,
                            generator=torch.Generator().manual_seed(0))
    assert full.trace() == pytest.approx(np.mean([s for s in hutchinson_trace(
        operator, operator.dim, 3, generator=torch.Generator().manual_seed(0)).samples]), rel=1e-8)


def test_indefinite_quadratic_is_reported_as_saddle_and_definite_ones_by_sign():
    for seed in range(6):
        gen = torch.Generator().manual_seed(seed)
        magnitudes = torch.rand(12, generator=gen, dtype=torch.float64) + 0.1
        cases = {
            "saddle": torch.cat([magnitudes[:6], -magnitudes[6:]]),
            "positive-definite": magnitudes,
            "positive-semidefinite": torch.cat([magnitudes[:9], torch.zeros(3, dtype=torch.float64)]),
            "negative-definite": -magnitudes,
        }
        for expected, eigenvalues in cases.items():
            matrix = random_symmetric(eigenvalues, gen)
            model = Point(torch.randn(12, generator=gen, dtype=torch.float64))
            report = analyze_curvature(model, quadratic_loss(matrix), torch.zeros(12, dtype=torch.float64), k=3,
                                       num_probes=None, generator=gen)
            assert report.sign_pattern == expected, (seed, expected, report.eigen.lambda_min, report.eigen.lambda_max)
            assert report.eigen.lambda_max == pytest.approx(float(eigenvalues.max()), rel=1e-9, abs=1e-12)
            assert report.eigen.lambda_min == pytest.approx(float(eigenvalues.min()), rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_stability_bound_separates_converging_and_diverging_sgd(momentum):
    for seed in range(3):
        gen = torch.Generator().manual_seed(seed)
        sharpness = float(10 ** (torch.rand(1, generator=gen) * 2 - 1))
        matrix = random_symmetric(torch.linspace(0.05 * sharpness, sharpness, 8), gen)
        start = torch.randn(8, generator=gen, dtype=torch.float64)
        loss_fn, shift = quadratic_loss(matrix), torch.zeros(8, dtype=torch.float64)
        bound = analyze_curvature(Point(start), loss_fn, shift, k=1, num_probes=None, generator=gen,
                                  momentum=momentum).stability_bound
        assert bound == pytest.approx(stability_bound(sharpness, momentum), rel=1e-9)
        for factor, converges in ((0.95, True), (1.05, False)):
            model = Point(start)
            report = analyze_curvature(model, loss_fn, shift, k=1, lr=factor * bound, momentum=momentum,
                                       num_probes=None, generator=gen)
            assert report.stable is converges
            optimizer = torch.optim.SGD(model.parameters(), lr=factor * bound, momentum=momentum)
            initial = float(loss_fn(model, shift).detach())
            for _ in range(400):
                optimizer.zero_grad()
                loss_fn(model, shift).backward()
                optimizer.step()
            final = float(loss_fn(model, shift).detach())
            assert (final < 1e-3 * initial) if converges else (final > 1e3 * initial)


def test_report_lines_and_spectrum_plot(tmp_path):
    model, loss_fn, batches = _mlp_problem(0)
    report = analyze_curvature(model, loss_fn, batches, k=3, lr=0.1, num_probes=10,
                               generator=torch.Generator().manual_seed(0))
    text = "\n".join(report.lines())
    for needle in ("top-3 eigenvalues", "sign pattern", "trace (Hutchinson, 10 probes)", "stability bound", "lr 0.1"):
        assert needle in text
    verdict = report.verdict()
    assert [line for line in report.lines() if "λmax" in line or "lr " in line] == [verdict]
    ratio = 0.1 * report.eigen.lambda_max / 2
    where, state = ("below", "stable") if ratio < 1 else ("above", "beyond the edge of stability")
    assert verdict == (f"stability bound (2+2β)/λmax: {2 / report.eigen.lambda_max:.6g}; lr 0.1 is {where} it "
                       f"({ratio:.3g} x the bound): {state}")
    operator = HessianOperator(model, loss_fn, batches)
    density = spectral_density(operator, operator.dim, num_runs=2, num_steps=30, generator=torch.Generator().manual_seed(0))
    path = plot_spectrum(density, tmp_path / "spectrum.png", report=report)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_operator_handles_unused_parameters_and_restores_mode():
    model = nn.Sequential(nn.Linear(3, 2), nn.Dropout(0.5)).double()
    unused = nn.Linear(2, 2).double()
    model.append(nn.Identity())
    model.train()
    holder = nn.ModuleDict({"used": model, "unused": unused})
    batch = torch.randn(4, 3, dtype=torch.float64)
    operator = HessianOperator(holder, lambda m, b: m["used"](b).pow(2).sum(), batch)
    assert model.training and holder.training
    product = operator.matvec(torch.ones(operator.dim, dtype=torch.float64))
    assert torch.equal(product[8:], torch.zeros(6, dtype=torch.float64))


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda op: lanczos_eigenvalues(op, op.dim, k=0), "k"),
        (lambda op: lanczos_eigenvalues(op, op.dim, tol=0.0), "tol"),
        (lambda op: lanczos_eigenvalues(op, op.dim, max_iter=0), "max_iter"),
        (lambda op: hutchinson_trace(op, op.dim, num_probes=1), "num_probes"),
        (lambda op: spectral_density(op, op.dim, num_runs=0), "num_runs"),
        (lambda op: stability_bound(1.0, momentum=1.0), "momentum"),
        (lambda op: classify_curvature(1.0, -1.0), "lambda_min"),
        (lambda op: op.matvec(torch.ones(3, dtype=torch.float64)), "vector"),
    ],
)
def test_bad_arguments_raise_value_error(call, match):
    model, loss_fn, batches = _mlp_problem(0)
    with pytest.raises(ValueError, match=match):
        call(HessianOperator(model, loss_fn, batches[0]))
