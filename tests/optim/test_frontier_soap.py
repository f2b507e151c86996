"""SOAP in float64 against a NumPy transcription of the paper's Algorithm 3 (the authors' code's details:
preconditioner-only first step, eigenbasis by eigh first, then one power-iteration step + QR every f steps
with the columns sorted by estimated eigenvalue and v permuted along) and against pytorch-optimizer's ``SOAP``.

Shapes are chosen so the factors have full rank at their first eigendecomposition (square matrices, conv
weights, 3-D tensors, a matrix whose long side exceeds ``max_precondition_dim``): a rank-deficient factor
has a degenerate eigenspace whose basis LAPACK picks arbitrarily, and SOAP's Adam runs in that basis, so two
correct implementations legitimately differ there (tested separately: no NaN, state finite)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from pytorch_optimizer import SOAP as ReferenceSOAP

from optimlab.optim.soap import SOAP, load_pytorch_optimizer_state, merged_shape

from .frontier_helpers import (Structure, assert_close, assert_resumes_bit_for_bit, check_numpy_parity, continue_run,
                              numpy_grads, random_structure, run_torch, sample_problem)
from .modern_helpers import random_configs

STEPS = 25
NUMPY_TOLERANCE = 1e-7  # eigh/QR in LAPACK through two libraries, 25 steps, bases refreshed 2-12 times
# pytorch-optimizer runs its QR in float32 (``power_iter.to(torch.float32)``), so after the first basis
# refresh the two trajectories agree to float32 accuracy only
PO_TOLERANCE = 2e-5
COUNT = 20
FULL_RANK_SHAPES = ((7,), (), (4, 4), (5, 5), (3, 2, 4), (4, 3, 3, 3), (2, 6, 5), (3, 3, 3))


def _config(rng: np.random.Generator, *, reference: bool) -> dict:
    kwargs = {
        "lr": float(math.exp(rng.uniform(math.log(1e-3), math.log(3e-2)))),
        "betas": (float(rng.uniform(0.8, 0.97)), float(rng.uniform(0.9, 0.99))),
        "shampoo_beta": None if rng.uniform() < 0.5 else float(rng.uniform(0.8, 0.99)),
        "eps": float(rng.choice([1e-8, 1e-6])),
        "weight_decay": float(rng.choice([0.0, rng.uniform(0.0, 0.1)])),
        "precondition_frequency": int(rng.choice([2, 3, 5, 10])),
        "max_precondition_dim": int(rng.choice([10, 40, 10000])),
        "correct_bias": bool(rng.uniform() < 0.7),
        "normalize_gradient": bool(rng.uniform() < 0.2),
    }
    if not reference:
        kwargs["merge_dims"] = bool(rng.uniform() < 0.4)
    extra = [(40, 6)] if kwargs["max_precondition_dim"] == 10 else []  # one side blocked out, one rotated
    group = {"lr": float(rng.uniform(1e-3, 1e-2)), "weight_decay": float(rng.uniform(0.0, 0.1))}
    structure = random_structure(rng, extra_shapes=extra, allow_skips=not reference, group_options=group,
                                 pool=FULL_RANK_SHAPES)
    structure.shapes = [shape for shape in structure.shapes if _full_rank_at_first(shape, kwargs)]
    return {"kwargs": kwargs, "structure": structure}


def _full_rank_at_first(shape: tuple[int, ...], kwargs: dict) -> bool:
    """Whether every rotated factor of the (merged) view has full rank after one generic gradient:
    n_i <= the product of the other dimensions."""
    view = merged_shape(shape, kwargs["max_precondition_dim"]) if kwargs.get("merge_dims") and len(shape) > 1 else shape
    if len(view) < 2:
        return True
    return all(size > kwargs["max_precondition_dim"] or size <= math.prod(view) // size for size in view)


PO_CONFIGS = random_configs(181, COUNT, lambda rng: _config(rng, reference=True))
NUMPY_CONFIGS = random_configs(182, COUNT, lambda rng: _config(rng, reference=False))


def numpy_soap(problem, structure, steps, *, lr, betas, shampoo_beta=None, eps, weight_decay, precondition_frequency,
               max_precondition_dim, correct_bias, normalize_gradient, merge_dims=False):
    """Vyas et al. 2024, Algorithm 3, per parameter (each with its own step count)."""
    beta_s = betas[1] if shampoo_beta is None else shampoo_beta
    params = problem.numpy_params()
    state: list[dict | None] = [None] * len(params)

    def view(x):
        shape = list(x.shape)
        if x.ndim > 1 and merge_dims:
            shape = merged_shape(tuple(x.shape), max_precondition_dim)
        return x.reshape(shape)

    def rotate(x, bases, back=False):
        for basis in bases:  # mode-i product with Q^T (forward) or Q (back), dims cycling to the end
            x = np.moveaxis(x, 0, -1) if basis is None else np.tensordot(x, basis, axes=([0], [1 if back else 0]))
        return x

    def accumulate(s, g):
        for i, factor in enumerate(s["L"]):
            if factor is not None:
                others = [j for j in range(g.ndim) if j != i]
                s["L"][i] = beta_s * factor + (1 - beta_s) * np.tensordot(g, g, axes=(others, others))

    for step in range(1, steps + 1):
        for i, g in enumerate(numpy_grads(problem, structure, params, step)):
            if g is None:
                continue
            options = {"lr": lr, "weight_decay": weight_decay}
            if structure.group_index(i) == 1:
                options.update(structure.group_options)
            g = view(g)
            if state[i] is None:
                rotated = [size <= max_precondition_dim and g.ndim > 1 for size in g.shape]
                s = state[i] = {"t": 0, "m": np.zeros(g.shape), "v": np.zeros(g.shape),
                                "L": [np.zeros((n, n)) if r else None for n, r in zip(g.shape, rotated)]}
                accumulate(s, g)
                s["Q"] = [None if f is None else np.linalg.eigh(f)[1][:, ::-1] for f in s["L"]]
                continue
            s = state[i]
            s["t"] += 1
            t = s["t"]
            s["m"] = betas[0] * s["m"] + (1 - betas[0]) * g
            s["v"] = betas[1] * s["v"] + (1 - betas[1]) * rotate(g, s["Q"]) ** 2
            n = rotate(rotate(s["m"], s["Q"]) / (np.sqrt(s["v"]) + eps), s["Q"], back=True)
            if normalize_gradient:
                n = n / (np.sqrt(np.mean(n**2)) + eps)
            size = options["lr"] * (math.sqrt(1 - betas[1] ** t) / (1 - betas[0] ** t) if correct_bias else 1.0)
            params[i] = (params[i] - size * n.reshape(params[i].shape)) * (1 - options["lr"] * options["weight_decay"])
            accumulate(s, g)
            if t % precondition_frequency == 0:
                for d, (factor, basis) in enumerate(zip(s["L"], s["Q"])):
                    if factor is None:
                        continue
                    power = factor @ basis
                    order = np.argsort(-np.sum(basis * power, axis=0), kind="stable")
                    s["v"] = np.take(s["v"], order, axis=d)
                    s["Q"][d] = np.linalg.qr(power[:, order])[0]
    return params


@pytest.mark.parametrize("index", range(COUNT))
def test_matches_numpy_transcription(index: int) -> None:
    config = NUMPY_CONFIGS[index]
    check_numpy_parity(lambda groups: SOAP(groups, **config["kwargs"]), numpy_soap, config, 1000 + index, STEPS,
                       NUMPY_TOLERANCE)


@pytest.mark.parametrize("index", range(COUNT))
def test_matches_pytorch_optimizer(index: int) -> None:
    config = PO_CONFIGS[index]
    structure = config["structure"]
    problem = sample_problem(1100 + index, structure)
    ours, _ = run_torch(lambda groups: SOAP(groups, **config["kwargs"]), problem, structure, STEPS)
    reference, _ = run_torch(lambda groups: ReferenceSOAP(groups, **config["kwargs"]), problem, structure, STEPS)
    assert_close(ours, reference, PO_TOLERANCE)


def test_state_dict_round_trip_resumes_bit_for_bit() -> None:
    """Stop after 7 steps (bases refreshed at 3 and 6, one parameter skipping), save, load into a fresh
    optimizer, continue to 15: identical to an uninterrupted run, factors and bases included."""
    structure = random_structure(np.random.default_rng(5), extra_shapes=[(40, 6), (6,)], pool=FULL_RANK_SHAPES)
    structure.skip_every = 3
    kwargs = {"lr": 0.01, "precondition_frequency": 3, "max_precondition_dim": 10, "precondition_1d": True}
    resumed = assert_resumes_bit_for_bit(lambda groups: SOAP(groups, **kwargs), sample_problem(5, structure),
                                         structure, 7, 15)
    assert any("Q1" in state for state in resumed.state.values())  # the bases are part of the comparison


def test_gradients_are_left_unchanged() -> None:
    """Unrotated tensors (a vector, a matrix with both sides above max_precondition_dim) once had their
    gradient squared in place by the second-moment update."""
    params = [torch.ones(3, requires_grad=True), torch.ones(3, 5, requires_grad=True), torch.ones(4, 4, requires_grad=True)]
    optimizer = SOAP(params, max_precondition_dim=2)
    for _ in range(3):
        grads = [torch.full_like(p, -2.0) for p in params]
        for param, grad in zip(params, grads):
            param.grad = grad.clone()
        optimizer.step()
        assert all(torch.equal(param.grad, grad) for param, grad in zip(params, grads))


def test_pytorch_optimizer_checkpoint_continues_here() -> None:
    """A run of pytorch-optimizer's SOAP stopped after 7 steps (bases refreshed at steps 3 and 6), its
    state_dict loaded here, continued to 15: equal to pytorch-optimizer's own continuation to its float32-QR
    accuracy, with rotated, one-sided and unrotated (1-D) parameters in two groups."""
    structure = Structure([(4, 4), (3, 2, 4), (40, 6), (7,), (5, 5)], two_groups=True,
                          group_options={"lr": 0.004, "weight_decay": 0.05})
    kwargs = {"lr": 0.01, "betas": (0.9, 0.95), "shampoo_beta": 0.9, "precondition_frequency": 3,
              "max_precondition_dim": 10}
    problem = sample_problem(31, structure)
    theirs_full, _ = run_torch(lambda groups: ReferenceSOAP(groups, **kwargs), problem, structure, 15)
    params, theirs = run_torch(lambda groups: ReferenceSOAP(groups, **kwargs), problem, structure, 7)
    ours = SOAP(structure.param_groups(params), **{**kwargs, "lr": 0.5, "weight_decay": 0.3})
    load_pytorch_optimizer_state(ours, theirs.state_dict())
    assert ours.param_groups[0]["lr"] == 0.01 and ours.param_groups[1]["weight_decay"] == 0.05  # theirs restored
    continue_run(ours, problem, structure, params, 8, 15)
    assert_close(params, theirs_full, PO_TOLERANCE)
    assert {key for state in ours.state.values() for key in state} >= {"GG0", "Q0", "GG1", "Q1", "GG2", "Q2"}


def test_pytorch_optimizer_checkpoint_with_merged_dims_is_refused() -> None:
    param = torch.zeros(3, 4, requires_grad=True)
    theirs = ReferenceSOAP([param], merge_dims=True)
    with pytest.raises(ValueError, match="merge_dims"):
        load_pytorch_optimizer_state(SOAP([param]), theirs.state_dict())


def test_large_dimensions_are_never_factored() -> None:
    """A (3000, 4) weight with max_precondition_dim=1024: the 3000 side keeps the identity (no 3000 x 3000
    factor or eigendecomposition), the 4 side is rotated; a (3000,) vector is plain Adam even with precondition_1d."""
    params = [torch.randn(3000, 4, requires_grad=True), torch.randn(3000, requires_grad=True)]
    optimizer = SOAP(params, max_precondition_dim=1024, precondition_1d=True)
    for _ in range(3):
        optimizer.zero_grad()
        sum((p**2).sum() for p in params).backward()
        optimizer.step()
    matrix, vector = (optimizer.state[p] for p in params)
    assert set(matrix) == {"step", "exp_avg", "exp_avg_sq", "GG1", "Q1"}
    assert tuple(matrix["GG1"].shape) == (4, 4) and tuple(matrix["Q1"].shape) == (4, 4)
    assert set(vector) == {"step", "exp_avg", "exp_avg_sq"}


def test_gpt2_token_embedding_is_one_sided_with_the_defaults() -> None:
    """GPT-2's 50257-row token embedding (8 columns here instead of 768, to stay small) with the default
    max_precondition_dim (10000): only the column side gets a factor and a basis."""
    param = torch.randn(50257, 8, requires_grad=True)
    optimizer = SOAP([param])
    for _ in range(2):
        param.grad = torch.randn_like(param)
        optimizer.step()
    state = optimizer.state[param]
    assert {key: tuple(value.shape) for key, value in state.items() if key[0] in "GQ"} == {"GG1": (8, 8), "Q1": (8, 8)}


def test_rank_deficient_gradients_stay_finite() -> None:
    """Rank-1 gradients (outer products, and an all-zero step) for 40 steps, bases refreshed every 2: the
    factors are singular throughout; parameters and state stay finite."""
    generator = torch.Generator().manual_seed(0)
    param = torch.randn(8, 6, dtype=torch.float64, requires_grad=True)
    vector = torch.randn(5, dtype=torch.float64, requires_grad=True)
    optimizer = SOAP([param, vector], lr=0.01, precondition_frequency=2, precondition_1d=True)
    for step in range(40):
        u = torch.randn(8, 1, generator=generator, dtype=torch.float64)
        w = torch.randn(1, 6, generator=generator, dtype=torch.float64)
        param.grad = torch.zeros_like(param) if step == 5 else u @ w
        vector.grad = torch.zeros_like(vector) if step < 3 else torch.randn(5, generator=generator, dtype=torch.float64)
        optimizer.step()
    assert torch.isfinite(param).all() and torch.isfinite(vector).all()
    for state in optimizer.state.values():
        assert all(torch.isfinite(t).all() for t in state.values())


@pytest.mark.parametrize(("kwargs", "match"), [({"lr": -1.0}, "lr"), ({"betas": (0.9, 1.5)}, "betas"),
                                               ({"shampoo_beta": 1.0}, "shampoo_beta"),
                                               ({"precondition_frequency": 0}, "precondition_frequency"),
                                               ({"max_precondition_dim": 2.5}, "max_precondition_dim"),
                                               ({"eps": -1.0}, "eps")])
def test_validation(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        SOAP([torch.zeros(2, requires_grad=True)], **kwargs)


class SwitchingQuadratic:
    """sum S_t * (p - target)^2 whose elementwise scales S_t switch at step 8 from weighting the first rows and
    columns to weighting the last ones, so the factors' eigenvalue order changes and a basis refresh must
    reorder its columns (and v with them)."""

    def __init__(self, shapes, seed: int) -> None:
        rng = np.random.default_rng(seed)
        self.starts = [rng.standard_normal(shape) for shape in shapes]
        self.targets = [rng.standard_normal(shape) for shape in shapes]
        self.scales = []
        for shape in shapes:
            ramp = np.ones(shape)
            for dim, size in enumerate(shape):
                ramp = ramp * np.linspace(3.0, 0.2, size).reshape([-1 if d == dim else 1 for d in range(len(shape))])
            self.scales.append((ramp, np.flip(ramp).copy()))
        self.calls = 0

    def torch_params(self, dtype=torch.float64):
        return [torch.tensor(start, dtype=dtype).requires_grad_() for start in self.starts]

    def numpy_params(self):
        return [start.copy() for start in self.starts]

    def _phase(self) -> int:
        self.calls += 1
        return 0 if self.calls <= 8 else 1

    def loss(self, params):
        phase = self._phase()
        return sum((torch.as_tensor(s[phase]) * (p - torch.as_tensor(t)) ** 2).sum()
                   for p, t, s in zip(params, self.targets, self.scales))

    def numpy_grads(self, params):
        phase = self._phase()
        return [2 * s[phase] * (p - t) for p, t, s in zip(params, self.targets, self.scales)]


def test_basis_refresh_reorders_columns_and_second_moment() -> None:
    structure = Structure([(4, 4), (3, 2, 4), (5, 5)])
    kwargs = {"lr": 0.02, "betas": (0.9, 0.95), "shampoo_beta": 0.5, "eps": 1e-8, "weight_decay": 0.0,
              "precondition_frequency": 2, "max_precondition_dim": 10000, "correct_bias": True,
              "normalize_gradient": False}
    problem = SwitchingQuadratic(structure.shapes, 3)
    ours, _ = run_torch(lambda groups: SOAP(groups, **kwargs), problem, structure, STEPS)
    problem.calls = 0
    assert_close(ours, numpy_soap(problem, structure, STEPS, **kwargs), NUMPY_TOLERANCE)
