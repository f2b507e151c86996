"""ASGD, Rprop, SparseAdam and LBFGS against torch.optim 2.13: same trajectories and state over torch's own
OptimizerInfo configurations plus random draws (float64 and float32), torch's OptimizerInfo bad inputs, and
torch's special semantics (LBFGS needs a closure and one param group, its state_dict moves both ways;
SparseAdam needs sparse gradients and dense real parameters). ASGD and Rprop are also registered with
checks, so the generated matrix (test_matrix.py, test_parity_torch.py: both paths, state_dict crossovers)
covers them. Run with ``-s`` to print the largest deviation per class and dtype."""

from __future__ import annotations

import random
from collections import defaultdict
from typing import Any

import pytest
import torch
from torch import nn
from torch.testing._internal.common_optimizers import optim_db

import optimlab.optim as ours

from .harness import MLPProblem, ShapesProblem, relative_deviation, save_and_load, train

TOL = {torch.float64: 1e-12, torch.float32: 1e-6}
DRAWS = 4


def _draw_asgd(rng: random.Random) -> dict[str, Any]:
    return {"lr": 10 ** rng.uniform(-3, -1), "lambd": rng.choice([1e-4, 0.1, 0.5]), "alpha": rng.uniform(0.5, 1.0),
            "t0": rng.choice([0, 3, 10, 1e6]), "weight_decay": rng.choice([0, 0.1]), "maximize": rng.random() < 0.3}


def _draw_rprop(rng: random.Random) -> dict[str, Any]:
    return {"lr": 10 ** rng.uniform(-3, -1), "etas": (rng.uniform(0.3, 0.7), rng.uniform(1.1, 1.5)),
            "step_sizes": (rng.choice([1e-6, 1e-3]), rng.choice([0.05, 50.0])), "maximize": rng.random() < 0.3}


def _draw_sparse_adam(rng: random.Random) -> dict[str, Any]:
    return {"lr": 10 ** rng.uniform(-3, -1), "betas": (rng.uniform(0.5, 0.95), rng.uniform(0.9, 0.9999)),
            "eps": rng.choice([1e-8, 1e-3]), "maximize": rng.random() < 0.3}


def _draw_lbfgs(rng: random.Random) -> dict[str, Any]:
    kwargs = {"lr": rng.choice([1.0, 0.5, 0.1]), "max_iter": rng.choice([1, 4, 20]),
              "history_size": rng.choice([2, 5, 100]), "line_search_fn": rng.choice([None, "strong_wolfe"]),
              "tolerance_grad": rng.choice([1e-7, 1e-5]), "tolerance_change": rng.choice([1e-9, 1e-4])}
    if rng.random() < 0.3:
        kwargs["max_eval"] = rng.choice([3, 10])
    return kwargs


DRAW = {"ASGD": _draw_asgd, "Rprop": _draw_rprop, "SparseAdam": _draw_sparse_adam, "LBFGS": _draw_lbfgs}


def configurations(name: str) -> list[dict[str, Any]]:
    """torch's own OptimizerInfo configurations for ``name`` (CPU) plus ``DRAWS`` random draws."""
    info = next(i for i in optim_db if i.optim_cls.__name__ == name)
    torch_configs = [dict(inp.kwargs) for inp in info.optim_inputs_func("cpu")]
    rng = random.Random(name)
    return torch_configs + [DRAW[name](rng) for _ in range(DRAWS)]


@pytest.fixture(scope="module")
def deviation_log():
    log: dict[tuple[str, str], float] = defaultdict(float)
    yield log
    print("\nlargest relative deviation from torch.optim (params and every state entry):")
    for (name, dtype), worst in sorted(log.items()):
        print(f"  {name:10s} {dtype:8s} max={worst:.3e}")


def deviation(actual: Any, expected: Any) -> float:
    """Largest relative deviation between two states (tensors, numbers, lists of them, dicts)."""
    if isinstance(expected, dict):
        assert set(actual) == set(expected), f"state keys {sorted(actual)} != {sorted(expected)}"
        return max((deviation(actual[k], expected[k]) for k in expected), default=0.0)
    if isinstance(expected, list):
        assert isinstance(actual, list) and len(actual) == len(expected)
        return max((deviation(a, e) for a, e in zip(actual, expected)), default=0.0)
    if torch.is_tensor(expected) or torch.is_tensor(actual):
        assert torch.is_tensor(actual) and torch.is_tensor(expected), (type(actual), type(expected))
        return relative_deviation(actual, expected)
    assert type(actual) is type(expected), (actual, expected)
    return 0.0 if actual == expected else abs(actual - expected) / max(abs(expected), 1e-300)


def _compare(problem, optimizer, reference_problem, reference) -> float:
    worst = 0.0
    for param, reference_param in zip(problem.parameters(), reference_problem.parameters(), strict=True):
        worst = max(worst, relative_deviation(param, reference_param),
                    deviation(optimizer.state.get(param, {}), reference.state.get(reference_param, {})))
    return worst


# ------------------------------------------------------------------------------------------------
# ASGD and Rprop: the shared harness problems (complex parameters included)
def _harness_problem(name: str, dtype: torch.dtype) -> nn.Module:
    return MLPProblem(dtype) if name == "mlp" else ShapesProblem(dtype, with_complex=True)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("problem_name", ["mlp", "shapes"])
@pytest.mark.parametrize("name", ["ASGD", "Rprop"])
def test_elementwise_parity(name: str, problem_name: str, dtype: torch.dtype, deviation_log) -> None:
    for kwargs in configurations(name):
        problems = [_harness_problem(problem_name, dtype) for _ in range(2)]
        optimizer = getattr(ours, name)(problems[0].parameters(), **kwargs)
        reference = getattr(torch.optim, name)(problems[1].parameters(), **kwargs)
        losses = train(problems[0], optimizer, 20)
        assert losses == train(problems[1], reference, 20) or dtype == torch.float32
        assert losses[-1] != losses[0]
        worst = _compare(problems[0], optimizer, problems[1], reference)
        deviation_log[(name, str(dtype)[6:])] = max(deviation_log[(name, str(dtype)[6:])], worst)
        assert worst <= TOL[dtype], kwargs


@pytest.mark.parametrize("name", ["ASGD", "Rprop"])
def test_foreach_flag_runs_the_same_rule_close_to_torch_foreach(name: str) -> None:
    """``foreach=True`` is accepted (torch's signature); the one rule stays within 1e-6 of torch's
    multi-tensor path, whose float32 scalar arithmetic differs from its own per-tensor path."""
    kwargs = configurations(name)[-1]
    problems = [MLPProblem() for _ in range(2)]
    optimizer = getattr(ours, name)(problems[0].parameters(), **kwargs, foreach=True)
    reference = getattr(torch.optim, name)(problems[1].parameters(), **kwargs, foreach=True)
    train(problems[0], optimizer, 20)
    train(problems[1], reference, 20)
    assert _compare(problems[0], optimizer, problems[1], reference) <= 1e-6


# ------------------------------------------------------------------------------------------------
# SparseAdam: embeddings with sparse gradients (repeated indices, an empty gradient every fourth step)
class EmbeddingProblem(nn.Module):
    def __init__(self, dtype: torch.dtype) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(11)
        self.first = nn.Embedding(12, 4, sparse=True, dtype=dtype)
        self.second = nn.Embedding(7, 4, sparse=True, dtype=dtype)
        with torch.no_grad():
            for table in (self.first, self.second):
                table.weight.copy_(torch.randn(table.weight.shape, generator=generator, dtype=dtype))

    def loss(self, t: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(500 + t)
        first = torch.randint(0, 12, (9,), generator=generator)
        second = torch.randint(0, 7, (0 if t % 4 == 3 else 9,), generator=generator)
        a, b = self.first(first), self.second(second)
        return (torch.sin(a) * a).sum() + (b - 0.5).pow(2).sum() + a.sum() * b.sum()

    def frozen(self, t: int) -> set[int]:
        return set()

    def dropped(self, t: int) -> set[int]:
        return {0} if t % 5 == 2 else set()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
def test_sparse_adam_parity(dtype: torch.dtype, deviation_log) -> None:
    for kwargs in configurations("SparseAdam"):
        problems = [EmbeddingProblem(dtype) for _ in range(2)]
        optimizer = ours.SparseAdam(problems[0].parameters(), **kwargs)
        reference = torch.optim.SparseAdam(problems[1].parameters(), **kwargs)
        losses = train(problems[0], optimizer, 20)
        train(problems[1], reference, 20)
        assert losses[-1] != losses[0]
        worst = _compare(problems[0], optimizer, problems[1], reference)
        deviation_log[("SparseAdam", str(dtype)[6:])] = max(deviation_log[("SparseAdam", str(dtype)[6:])], worst)
        assert worst <= TOL[dtype], kwargs
    assert optimizer.state[problems[0].second.weight]["step"] == 20  # empty gradients count as steps


def test_sparse_adam_semantics_match_torch() -> None:
    """Dense gradients raise RuntimeError; sparse or complex parameters raise ValueError (torch's messages);
    rows without a gradient keep their parameters and moments exactly."""
    weight = nn.Parameter(torch.randn(5, 3))
    weight.grad = torch.randn(5, 3)
    with pytest.raises(RuntimeError, match="SparseAdam does not support dense gradients"):
        ours.SparseAdam([weight]).step()
    with pytest.raises(ValueError, match=r"Sparse params at indices \[\[0, 0\]\]: SparseAdam requires dense"):
        ours.SparseAdam([torch.zeros(3, layout=torch.sparse_coo)])
    with pytest.raises(ValueError, match=r"Complex params at indices \[\[0, 1\]\]"):
        ours.SparseAdam([weight, nn.Parameter(torch.zeros(2, dtype=torch.complex64))])
    table = nn.Embedding(6, 2, sparse=True)
    optimizer = ours.SparseAdam(table.parameters(), lr=0.1)
    table(torch.tensor([0, 1])).sum().backward()
    optimizer.step()
    before = table.weight.detach().clone()
    optimizer.zero_grad()
    table(torch.tensor([1, 1])).sum().backward()
    optimizer.step()
    assert torch.equal(table.weight[[0, 2, 3, 4, 5]], before[[0, 2, 3, 4, 5]])
    assert not torch.equal(table.weight[1], before[1])
    assert optimizer.state[table.weight]["exp_avg"][2:].abs().max() == 0


# ------------------------------------------------------------------------------------------------
# LBFGS: full-batch problems stepped with a closure
def _lbfgs_problem(name: str, dtype: torch.dtype) -> nn.Module:
    if name == "mlp":
        return MLPProblem(dtype)
    problem = ShapesProblem(dtype, with_complex=True)
    problem.transposed.data = problem.transposed.data.contiguous()  # torch's LBFGS views every grad flat
    return problem


def _lbfgs_run(cls: type, problem: nn.Module, kwargs: dict[str, Any], steps: int,
               optimizer: torch.optim.Optimizer | None = None) -> tuple[torch.optim.Optimizer, list[float]]:
    optimizer = optimizer or cls(problem.parameters(), **kwargs)

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = problem.loss(0)
        loss.backward()
        return loss

    return optimizer, [float(optimizer.step(closure).detach()) for _ in range(steps)]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("problem_name", ["mlp", "shapes"])
def test_lbfgs_parity(problem_name: str, dtype: torch.dtype, deviation_log) -> None:
    """Parameters and the whole state (history lists, step, direction, counters) after 4 steps."""
    for kwargs in configurations("LBFGS"):
        problems = [_lbfgs_problem(problem_name, dtype) for _ in range(2)]
        optimizer, losses = _lbfgs_run(ours.LBFGS, problems[0], kwargs, 4)
        reference, reference_losses = _lbfgs_run(torch.optim.LBFGS, problems[1], kwargs, 4)
        assert losses[-1] < losses[0]
        worst = _compare(problems[0], optimizer, problems[1], reference)
        deviation_log[("LBFGS", str(dtype)[6:])] = max(deviation_log[("LBFGS", str(dtype)[6:])], worst)
        assert worst <= TOL[dtype], kwargs


@pytest.mark.parametrize("direction", ["ours-to-torch", "torch-to-ours"])
def test_lbfgs_state_dict_crosses_over(direction: str) -> None:
    kwargs = {"history_size": 5, "max_iter": 4, "line_search_fn": "strong_wolfe"}
    first, second = (ours.LBFGS, torch.optim.LBFGS) if direction == "ours-to-torch" else (torch.optim.LBFGS, ours.LBFGS)
    problem = MLPProblem()
    optimizer, _ = _lbfgs_run(first, problem, kwargs, 2)
    resumed = second(problem.parameters(), **kwargs)
    resumed.load_state_dict(save_and_load(optimizer.state_dict()))
    _lbfgs_run(second, problem, kwargs, 2, optimizer=resumed)
    expected_problem = MLPProblem()
    expected, _ = _lbfgs_run(torch.optim.LBFGS, expected_problem, kwargs, 4)
    assert _compare(problem, resumed, expected_problem, expected) <= 1e-12


def test_lbfgs_semantics_match_torch() -> None:
    """A closure is required (TypeError, as torch's missing argument); one param group only; the first
    closure loss is returned; already optimal gradients return at once after one evaluation."""
    param = nn.Parameter(torch.tensor([1.0, -2.0]))
    optimizer = ours.LBFGS([param])
    with pytest.raises(TypeError, match="needs a closure"):
        optimizer.step()
    with pytest.raises(ValueError, match="doesn't support per-parameter options"):
        ours.LBFGS([{"params": [param]}, {"params": [nn.Parameter(torch.zeros(1))]}])
    with pytest.raises(ValueError, match="only 'strong_wolfe' is supported"):
        ours.LBFGS([param], line_search_fn="armijo")
    calls = []

    def closure() -> torch.Tensor:
        calls.append(1)
        optimizer.zero_grad()
        loss = (param**2).sum()
        loss.backward()
        return loss

    first = optimizer.step(closure)
    assert float(first) == 5.0 and len(calls) > 1 and param.abs().max() < 1e-6
    calls.clear()
    optimizer.step(closure)
    assert len(calls) == 1


def test_lbfgs_takes_non_contiguous_parameters() -> None:
    """Where torch's ``view`` fails on a transposed parameter's gradient, optimlab gives the contiguous result."""
    results = []
    for contiguous in (False, True):
        problem = ShapesProblem()
        if contiguous:
            problem.transposed.data = problem.transposed.data.contiguous()
        _lbfgs_run(ours.LBFGS, problem, {"line_search_fn": "strong_wolfe"}, 2)
        results.append([p.detach().clone() for p in problem.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*results))


# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["ASGD", "Rprop", "SparseAdam", "LBFGS"])
def test_torch_error_inputs_raise_the_same_errors(name: str) -> None:
    """torch's OptimizerInfo bad inputs: the same exception type, with a message matching torch's regex."""
    info = next(i for i in optim_db if i.optim_cls.__name__ == name)
    checked = 0
    for error in info.optim_error_inputs_func("cpu", torch.float32):
        inp = error.optimizer_error_input
        params = inp.params if inp.params is not None else [nn.Parameter(torch.randn(2, 2))]
        if error.error_type is UserWarning:
            with pytest.warns(UserWarning, match=error.error_regex):
                getattr(ours, name)(params, **inp.kwargs)
        else:
            with pytest.raises(error.error_type, match=error.error_regex):
                getattr(ours, name)(params, **inp.kwargs)
        checked += 1
    assert checked >= 6


@pytest.mark.parametrize("name", ["ASGD", "Rprop", "SparseAdam", "LBFGS"])
def test_constructor_and_defaults_match_torch(name: str) -> None:
    import inspect

    ours_cls, torch_cls = getattr(ours, name), getattr(torch.optim, name)
    ours_signature = [(p.name, p.kind, p.default) for p in inspect.signature(ours_cls.__init__).parameters.values()]
    torch_signature = [(p.name, p.kind, p.default) for p in inspect.signature(torch_cls.__init__).parameters.values()]
    assert ours_signature == torch_signature
    params = [nn.Parameter(torch.zeros(2))]
    assert ours_cls(params).defaults == torch_cls(params).defaults


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["ASGD", "Rprop", "SparseAdam", "LBFGS"])
def test_cuda_matches_torch(name: str) -> None:
    """The same comparison on a CUDA device (state created on the parameter's device where torch does)."""
    kwargs = configurations(name)[-1]
    results = []
    for lib in (ours, torch.optim):
        torch.manual_seed(0)
        table = nn.Embedding(10, 4, sparse=name == "SparseAdam", dtype=torch.float64, device="cuda")
        optimizer = getattr(lib, name)(table.parameters(), **kwargs)

        def closure() -> torch.Tensor:
            optimizer.zero_grad()
            loss = (torch.sin(table(torch.arange(10, device="cuda") % 7)) ** 2).sum()
            loss.backward()
            return loss

        for _ in range(5):
            optimizer.step(closure)
        results.append((table, optimizer))
    (table, optimizer), (reference_table, reference) = results
    assert _compare(table, optimizer, reference_table, reference) <= TOL[torch.float64]
