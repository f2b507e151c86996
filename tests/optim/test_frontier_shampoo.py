"""Shampoo in float64 against a NumPy transcription of the paper's algorithm with the practical recipe
(Gupta et al. 2018; Anil et al. 2020; Distributed Shampoo): blocks, per-block grafting, start step,
inverse p-th roots by ``numpy.linalg.eigh``; the coupled Newton roots against the same transcription;
resumption bit for bit; blocking by shape; no NaN on rank-deficient gradients."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from optimlab.optim.shampoo import Shampoo, block_slices, inverse_root
from optimlab.optim.soap import merged_shape

from .frontier_helpers import (assert_resumes_bit_for_bit, check_numpy_parity, numpy_grads, random_structure,
                              sample_problem)
from .modern_helpers import random_configs

STEPS = 20
TOLERANCE = 1e-9  # inverse roots through two LAPACK eigensolvers, 20 steps
NEWTON_TOLERANCE = 1e-9  # the Newton roots stop at max|M - I| <= 1e-10
COUNT = 20


def _config(rng: np.random.Generator) -> dict:
    frequency = int(rng.choice([1, 2, 3, 5]))
    kwargs = {
        "lr": float(math.exp(rng.uniform(math.log(1e-3), math.log(3e-2)))),
        "betas": (float(rng.choice([0.0, rng.uniform(0.5, 0.95)])), float(rng.uniform(0.9, 0.999))),
        "shampoo_beta": None if rng.uniform() < 0.4 else float(rng.choice([1.0, rng.uniform(0.8, 0.99)])),
        # a tiny epsilon on a rank-deficient factor makes the roots ill-conditioned (1e12), amplifying rounding
        # differences between any two implementations: that regime is tested for safety below, not parity
        "epsilon": float(rng.choice([1e-4, 1e-3, 1e-2])),
        "weight_decay": float(rng.choice([0.0, rng.uniform(0.0, 0.1)])),
        "precondition_frequency": frequency,
        "start_preconditioning_step": int(rng.integers(1, 8)),
        "block_size": int(rng.choice([3, 4, 5, 1024])),
        "grafting": str(rng.choice(["adam", "adagrad", "none"])),
        "graft_eps": float(rng.choice([1e-8, 1e-4])),
        "inverse_exponent_override": None if rng.uniform() < 0.7 else int(rng.choice([2, 4])),
        "merge_dims": bool(rng.uniform() < 0.3),
    }
    group = {"lr": float(rng.uniform(1e-3, 1e-2)), "weight_decay": float(rng.uniform(0.0, 0.1))}
    return {"kwargs": kwargs, "structure": random_structure(rng, extra_shapes=[(9, 3)], group_options=group)}


CONFIGS = random_configs(191, COUNT, _config)


def numpy_shampoo(problem, structure, steps, *, lr, betas, shampoo_beta, epsilon, weight_decay, precondition_frequency,
                  start_preconditioning_step, block_size, grafting, graft_eps, inverse_exponent_override, merge_dims):
    """The algorithm of the module docstring of optimlab.optim.shampoo, per parameter, in NumPy float64."""
    beta1, beta2 = betas
    beta_s = beta2 if shampoo_beta is None else shampoo_beta
    params = problem.numpy_params()
    state = [None] * len(params)

    def root(factor, p):
        values, vectors = np.linalg.eigh(factor)
        return (vectors * (np.maximum(values, 0) + epsilon) ** (-1.0 / p)) @ vectors.T

    for step in range(1, steps + 1):
        for i, g in enumerate(numpy_grads(problem, structure, params, step)):
            if g is None:
                continue
            options = {"lr": lr, "weight_decay": weight_decay}
            if structure.group_index(i) == 1:
                options.update(structure.group_options)
            x = params[i]
            view = None if x.ndim < 2 else (merged_shape(x.shape, block_size) if merge_dims else list(x.shape))
            if state[i] is None:
                state[i] = {"t": 0, "m": np.zeros(x.shape), "v": np.zeros(x.shape), "blocks": {}}
            s = state[i]
            s["t"] += 1
            t = s["t"]
            if beta1 > 0:
                s["m"] = beta1 * s["m"] + (1 - beta1) * g
                filtered = s["m"] / (1 - beta1**t)
            else:
                filtered = g
            if grafting == "adam":
                s["v"] = beta2 * s["v"] + (1 - beta2) * g * g
                graft = filtered / (np.sqrt(s["v"] / (1 - beta2**t)) + graft_eps)
            elif grafting == "adagrad":
                s["v"] = s["v"] + g * g
                graft = filtered / (np.sqrt(s["v"]) + graft_eps)
            else:
                graft = filtered
            direction = graft.copy()
            if view is not None:
                gv, fv, av, dv = g.reshape(view), filtered.reshape(view), graft.reshape(view), direction.reshape(view)
                p = inverse_exponent_override or 2 * len(view)
                chunks = [[slice(a, min(a + block_size, n)) for a in range(0, n, block_size)] for n in view]
                for number, block in enumerate(itertools.product(*chunks)):
                    gb = gv[block]
                    entry = s["blocks"].setdefault(number, {"L": [np.zeros((gb.shape[d],) * 2) for d in range(gb.ndim)],
                                                           "P": [None] * gb.ndim})
                    for d in range(gb.ndim):
                        others = [j for j in range(gb.ndim) if j != d]
                        outer = np.tensordot(gb, gb, axes=(others, others))
                        entry["L"][d] = entry["L"][d] + outer if beta_s == 1.0 else beta_s * entry["L"][d] + (1 - beta_s) * outer
                        if t >= start_preconditioning_step and (t - start_preconditioning_step) % precondition_frequency == 0:
                            entry["P"][d] = root(entry["L"][d], p)
                    if t < start_preconditioning_step:
                        continue
                    shampoo = fv[block]
                    for d in range(gb.ndim):  # mode-d product with the (symmetric) root
                        shampoo = np.moveaxis(np.tensordot(entry["P"][d], shampoo, axes=([1], [d])), 0, d)
                    if grafting != "none":
                        norm = np.linalg.norm(shampoo)
                        shampoo = shampoo * (np.linalg.norm(av[block]) / norm if norm > 0 else 0.0)
                    dv[block] = shampoo
                direction = dv.reshape(x.shape)
            params[i] = x * (1 - options["lr"] * options["weight_decay"]) - options["lr"] * direction
    return params


@pytest.mark.parametrize("index", range(COUNT))
def test_matches_numpy_transcription(index: int) -> None:
    config = CONFIGS[index]
    check_numpy_parity(lambda groups: Shampoo(groups, **config["kwargs"]), numpy_shampoo, config, 1200 + index, STEPS,
                       TOLERANCE)


@pytest.mark.parametrize("index", range(COUNT))
def test_newton_roots_match_numpy_transcription(index: int) -> None:
    config = {**CONFIGS[index], "kwargs": {**CONFIGS[index]["kwargs"], "epsilon": 1e-3}}  # Newton: bounded condition
    check_numpy_parity(lambda groups: Shampoo(groups, **config["kwargs"], root_method="newton"), numpy_shampoo, config,
                       1300 + index, STEPS, NEWTON_TOLERANCE)


def test_inverse_root_methods_agree_with_numpy() -> None:
    rng = np.random.default_rng(0)
    for size, p in [(1, 2), (5, 2), (8, 4), (12, 6), (30, 4)]:
        a = rng.standard_normal((size, size + 3))
        matrix = a @ a.T
        values, vectors = np.linalg.eigh(matrix + 1e-6 * np.eye(size))
        expected = (vectors * values ** (-1.0 / p)) @ vectors.T
        for method, tolerance in (("eigh", 1e-11), ("newton", 1e-8)):
            root = inverse_root(torch.tensor(matrix), p, 1e-6, method)
            assert root is not None
            assert float(np.max(np.abs(root.numpy() - expected))) <= tolerance * float(np.max(np.abs(expected)))


def test_state_dict_round_trip_resumes_bit_for_bit() -> None:
    structure = random_structure(np.random.default_rng(9), extra_shapes=[(9, 3), (7,)])
    structure.skip_every = 3
    kwargs = {"lr": 0.01, "precondition_frequency": 2, "start_preconditioning_step": 3, "block_size": 4}
    resumed = assert_resumes_bit_for_bit(lambda groups: Shampoo(groups, **kwargs), sample_problem(9, structure),
                                         structure, 6, 14)
    assert any("P1_1" in state for state in resumed.state.values())  # blocked factors and roots compared


def test_large_dimensions_are_blocked() -> None:
    """A (3000, 4) weight with block_size 1024: three blocks, factors of at most 1024 x 1024 (never
    3000 x 3000); roots of the same shapes; 1-D and 0-dim parameters hold no factor at all."""
    params = [torch.randn(3000, 4, requires_grad=True), torch.randn(3000, requires_grad=True), torch.randn((), requires_grad=True)]
    optimizer = Shampoo(params, precondition_frequency=1, start_preconditioning_step=1)
    for _ in range(2):
        optimizer.zero_grad()
        sum((p**2).sum() for p in params).backward()
        optimizer.step()
    matrix, vector, scalar = (optimizer.state[p] for p in params)
    expected = {"0_0": (1024, 1024), "0_1": (4, 4), "1_0": (1024, 1024), "1_1": (4, 4), "2_0": (952, 952), "2_1": (4, 4)}
    assert {key[1:]: tuple(value.shape) for key, value in matrix.items() if key[0] == "L"} == expected
    assert {key[1:]: tuple(value.shape) for key, value in matrix.items() if key[0] == "P"} == expected
    assert set(vector) == set(scalar) == {"step", "exp_avg", "graft_sq"}


def test_gpt2_token_embedding_blocks() -> None:
    """GPT-2's 50257 x 768 token embedding with the default block_size (1024): 50 blocks of at most
    1024 x 768 (the last one 81 rows), so no factor is larger than 1024 x 1024."""
    blocks = block_slices([50257, 768], 1024)
    sides = [tuple(chunk.stop - chunk.start for chunk in block) for block in blocks]
    assert len(sides) == 50 and set(sides[:-1]) == {(1024, 768)} and sides[-1] == (81, 768)
    assert Shampoo([torch.zeros(1, 1, requires_grad=True)]).defaults["block_size"] == 1024


def test_rank_deficient_gradients_never_produce_nan() -> None:
    """Rank-1 gradients with epsilon=0: the factors are singular, so eigh's inverse roots are infinite
    (a failed decomposition): the previous root is kept (the grafting direction until one succeeds), and
    parameters stay finite; with a tiny epsilon the roots exist and stay finite."""
    for epsilon, method in ((0.0, "eigh"), (0.0, "newton"), (1e-12, "eigh")):
        generator = torch.Generator().manual_seed(1)
        param = torch.randn(8, 6, dtype=torch.float64, requires_grad=True)
        optimizer = Shampoo([param], lr=0.01, epsilon=epsilon, precondition_frequency=1, start_preconditioning_step=1,
                            root_method=method)
        for step in range(15):
            u = torch.randn(8, 1, generator=generator, dtype=torch.float64)
            w = torch.randn(1, 6, generator=generator, dtype=torch.float64)
            param.grad = torch.zeros_like(param) if step in (0, 4) else u @ w
            optimizer.step()
            assert torch.isfinite(param).all(), (epsilon, method, step)
        state = optimizer.state[param]
        assert all(torch.isfinite(value).all() for value in state.values())
        if epsilon > 0:
            assert "P0_0" in state and "P0_1" in state


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"lr": -1.0}, "lr"), ({"betas": (0.9, 1.0)}, "betas"), ({"shampoo_beta": 1.5}, "shampoo_beta"),
    ({"epsilon": -1.0}, "epsilon"), ({"precondition_frequency": 0}, "precondition_frequency"),
    ({"start_preconditioning_step": 0}, "start_preconditioning_step"), ({"block_size": 0}, "block_size"),
    ({"grafting": "sgd"}, "grafting"), ({"root_method": "svd"}, "root_method"),
    ({"inverse_exponent_override": 0}, "inverse_exponent_override"), ({"graft_eps": -1.0}, "graft_eps")])
def test_validation(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        Shampoo([torch.zeros(2, requires_grad=True)], **kwargs)


def test_failed_decomposition_keeps_the_previous_root() -> None:
    """Full-rank gradients build the roots; then, with shampoo_beta=0 (the factor is the last outer product
    alone) and epsilon=0, a zero gradient makes the factor zero, whose inverse root does not exist: the
    refresh fails and the previous roots stay, bit for bit."""
    generator = torch.Generator().manual_seed(2)
    param = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    optimizer = Shampoo([param], lr=0.01, shampoo_beta=0.0, epsilon=0.0, precondition_frequency=1,
                        start_preconditioning_step=1)
    assert inverse_root(torch.zeros(3, 3, dtype=torch.float64), 4, 0.0) is None
    param.grad = torch.randn(4, 3, generator=generator, dtype=torch.float64) @ torch.randn(3, 3, generator=generator,
                                                                                            dtype=torch.float64)
    optimizer.step()
    roots = {key: value.clone() for key, value in optimizer.state[param].items() if key.startswith("P")}
    assert set(roots) == {"P0_0", "P0_1"}
    param.grad = torch.zeros_like(param)
    optimizer.step()
    assert all(torch.equal(optimizer.state[param][key], value) for key, value in roots.items())
    assert torch.isfinite(param).all()
