"""Test functions against independent NumPy formulas, their minima, and their registry."""

import math

import numpy as np
import pytest
import torch

from optimlab.bench.problems import get_problem, list_problems


def np_rosenbrock(p):
    x, y = p[..., 0], p[..., 1]
    return (1 - x) ** 2 + 100 * (y - x**2) ** 2


def np_rastrigin(p):
    return 10 * p.shape[-1] + (p**2 - 10 * np.cos(2 * np.pi * p)).sum(-1)


def np_beale(p):
    x, y = p[..., 0], p[..., 1]
    return (1.5 - x + x * y) ** 2 + (2.25 - x + x * y**2) ** 2 + (2.625 - x + x * y**3) ** 2


def np_quadratic(p, kappa=100.0):
    n = p.shape[-1]
    lam = np.logspace(0, np.log10(kappa), n)
    v = np.arange(1, n + 1, dtype=float)
    q = np.eye(n) - 2 * np.outer(v, v) / v.dot(v)
    h = q @ np.diag(lam) @ q.T
    return 0.5 * np.einsum("...i,ij,...j->...", p, h, p)


def np_nonconvex(p):
    i = np.arange(p.shape[-1])
    return ((p - i) ** 2 + 0.1 * np.sin(10 * p) ** 2 + 0.01 * p**4).sum(-1)


REFERENCES = {"rosenbrock": np_rosenbrock, "rastrigin": np_rastrigin, "beale": np_beale,
              "quadratic": np_quadratic, "nonconvex-10d": np_nonconvex}


def test_registry_lists_every_problem():
    assert list_problems() == sorted(REFERENCES)


@pytest.mark.parametrize("name", sorted(REFERENCES))
def test_matches_numpy_reference_pointwise_and_batched(name):
    problem = get_problem(name)
    rng = np.random.default_rng(0)
    points = rng.uniform(-3, 3, size=(6, 7, problem.dim))
    expected = REFERENCES[name](points)
    batched = problem(torch.tensor(points)).numpy()
    np.testing.assert_allclose(batched, expected, rtol=1e-12, atol=1e-12)
    single = np.array([[float(problem(torch.tensor(points[i, j]))) for j in range(7)] for i in range(6)])
    np.testing.assert_allclose(single, expected, rtol=1e-12, atol=1e-12)
    assert float(problem(problem.start_tensor())) == pytest.approx(REFERENCES[name](np.array(problem.start)), rel=1e-12)


@pytest.mark.parametrize("name", sorted(REFERENCES))
def test_minimum_value_and_zero_gradient(name):
    problem = get_problem(name)
    for minimum in problem.minima:
        x = torch.tensor(minimum, dtype=torch.float64, requires_grad=True)
        value = problem(x)
        value.backward()
        assert value.item() == pytest.approx(problem.min_value, abs=1e-12)
        assert float(x.grad.abs().max()) < 1e-8
        assert problem.distance_to_minimum(x) == 0.0


def test_nonconvex_minimum_is_global_by_brute_force():
    problem = get_problem("nonconvex-10d")
    grid = np.linspace(-10, 20, 600_001)  # step 5e-5, far wider than where the minima can be
    total = 0.0
    for i in range(problem.dim):
        values = (grid - i) ** 2 + 0.1 * np.sin(10 * grid) ** 2 + 0.01 * grid**4
        total += values.min()
    assert problem.min_value <= total + 1e-12
    assert total - problem.min_value < 1e-6  # the grid gets within its resolution of the stored minimum


def test_quadratic_condition_number_and_rotation():
    problem = get_problem("quadratic", condition_number=1000.0, dim=4)
    hessian = torch.autograd.functional.hessian(problem, torch.zeros(4, dtype=torch.float64))
    eigenvalues = torch.linalg.eigvalsh(hessian)
    assert float(eigenvalues.max() / eigenvalues.min()) == pytest.approx(1000.0, rel=1e-10)
    off_diagonal = hessian - torch.diag(torch.diag(hessian))
    assert float(off_diagonal.abs().max()) > 1.0  # not axis-aligned


def test_conventional_start_points():
    assert get_problem("rosenbrock").start == (-2.0, 2.0)
    assert get_problem("rastrigin").start == (-2.0, 3.5)
    assert get_problem("rosenbrock", start=(-1.0, 1.0)).start == (-1.0, 1.0)
    assert all(get_problem(n).bounds is not None for n in list_problems() if get_problem(n).dim == 2)
    assert get_problem("nonconvex-10d").bounds is None


def test_bad_names_and_arguments():
    with pytest.raises(KeyError, match=r"Unknown problem 'rosenbrok'.*Did you mean: rosenbrock.*Valid names: beale"):
        get_problem("rosenbrok")
    with pytest.raises(ValueError, match=r"Invalid condition_number: 0.5 \(accepted range: finite and >= 1\)"):
        get_problem("quadratic", condition_number=0.5)
    with pytest.raises(ValueError, match=r"Invalid dim: 0"):
        get_problem("nonconvex-10d", dim=0)
    with pytest.raises(ValueError, match=r"last dimension 3, expected 2"):
        get_problem("beale")(torch.zeros(3))
    assert math.isclose(get_problem("rastrigin", amplitude=0.0)(torch.tensor([1.0, 2.0])).item(), 5.0)
