"""Parity of every case that has a reference class (``torch.optim``): same trajectory, same state.

Parameters and every state tensor must agree within 1e-15 relative in float64 (README's claim; measured at
most 6.4e-16) and the case's float32 tolerance (1e-5) after 20 steps on an MLP (biases + LayerNorm, a layer
frozen then unfrozen) and on assorted shapes (0-dim, non-contiguous, 3-D, complex, a parameter without
gradient every third step), through both of our paths; state_dicts move both ways mid-training.
Run with ``-s`` to print the largest deviation per class.
"""

from __future__ import annotations

import inspect
from collections import defaultdict

import pytest
import torch

import optimlab.optim as optimlab_optim

from .cases import REFERENCE_CASES, Case
from .harness import PROBLEMS, MLPProblem, ShapesProblem, max_deviation, save_and_load, train

STEPS = 20
FLOAT64_PARITY = 1e-15
"""Relative deviation allowed from torch.optim in float64: what README claims (tighter than ``Case.tolerance``,
which also serves comparisons with other references)."""
CLASSIC_NAMES = ["SGD", "Adam", "AdamW", "Adagrad", "RMSprop", "Adamax", "NAdam", "RAdam", "Adadelta"]


@pytest.fixture(scope="module")
def deviation_log():
    """Collects (class, dtype) -> [number of comparisons, largest deviation]; printed at the end."""
    log: dict[tuple[str, str], list] = defaultdict(lambda: [0, 0.0])
    yield log
    print("\nlargest relative deviation from the reference, per class (params and every state tensor):")
    for (name, dtype), (count, worst) in sorted(log.items()):
        print(f"  {name:10s} {dtype:8s} runs={count:3d} max={worst:.3e}")


def _record(log, case: Case, dtype: torch.dtype, deviation: float) -> None:
    entry = log[(case.optimizer.__name__, str(dtype).removeprefix("torch."))]
    entry[0] += 1
    entry[1] = max(entry[1], deviation)


def _build(problem_name: str, dtype: torch.dtype, case: Case) -> torch.nn.Module:
    if problem_name == "shapes":
        with_complex = case.reference.__module__.startswith("torch.optim")
        return ShapesProblem(dtype, with_complex=with_complex)
    return PROBLEMS[problem_name](dtype)


def _run_pair(case: Case, problem_name: str, dtype: torch.dtype, foreach: bool | None):
    ours_problem, reference_problem = _build(problem_name, dtype, case), _build(problem_name, dtype, case)
    kwargs = dict(case.kwargs) if foreach is None else {**case.kwargs, "foreach": foreach}
    ours = case.optimizer(ours_problem.parameters(), **kwargs)
    reference = case.reference(reference_problem.parameters(), **case.kwargs)
    ours_losses = train(ours_problem, ours, STEPS)
    reference_losses = train(reference_problem, reference, STEPS)
    assert ours_losses[0] == reference_losses[0]
    assert ours_losses[-1] != ours_losses[0], "the optimizer did not move the parameters"
    return max_deviation(ours_problem.parameters(), ours, reference_problem.parameters(), reference)


@pytest.mark.parametrize("foreach", [False, True], ids=["per-tensor", "foreach"])
@pytest.mark.parametrize("problem_name", ["mlp", "shapes"])
@pytest.mark.parametrize("case", REFERENCE_CASES, ids=lambda case: case.id)
def test_float64_parity(case: Case, problem_name: str, foreach: bool, deviation_log) -> None:
    deviation = _run_pair(case, problem_name, torch.float64, foreach)
    _record(deviation_log, case, torch.float64, deviation)
    assert deviation <= FLOAT64_PARITY


@pytest.mark.parametrize("problem_name", ["mlp", "shapes"])
@pytest.mark.parametrize("case", REFERENCE_CASES, ids=lambda case: case.id)
def test_float32_parity(case: Case, problem_name: str, deviation_log) -> None:
    deviation = _run_pair(case, problem_name, torch.float32, None)
    _record(deviation_log, case, torch.float32, deviation)
    assert deviation <= case.float32_tolerance


def _save_and_resume(first_cls: type[torch.optim.Optimizer], second_cls: type[torch.optim.Optimizer] | None,
                     case: Case) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """Train 10 steps with ``first_cls``; unless ``second_cls`` is None, save its state_dict
    (torch.save / weights_only load) and resume 10 more steps with ``second_cls`` on a fresh model."""
    problem = MLPProblem()
    optimizer = first_cls(problem.parameters(), **case.kwargs)
    if second_cls is None:
        train(problem, optimizer, 20)
        return problem, optimizer
    train(problem, optimizer, 10)
    resumed_problem = MLPProblem()
    resumed_problem.load_state_dict(problem.state_dict())
    resumed = second_cls(resumed_problem.parameters(), **case.kwargs)
    resumed.load_state_dict(save_and_load(optimizer.state_dict()))
    train(resumed_problem, resumed, 10, start=10)
    return resumed_problem, resumed


@pytest.mark.parametrize("direction", ["ours-to-reference", "reference-to-ours"])
@pytest.mark.parametrize("case", REFERENCE_CASES, ids=lambda case: case.id)
def test_state_dict_crosses_over(case: Case, direction: str, deviation_log) -> None:
    """Train 10 steps with one implementation, resume 10 steps with the other from its state_dict.

    reference -> ours must equal 20 uninterrupted steps of the reference. ours -> reference must
    equal the reference's own save-and-resume (torch casts non-``step`` state such as NAdam's
    ``mu_product`` to the parameter dtype on load, so for it that differs slightly from uninterrupted).
    """
    if direction == "ours-to-reference":
        resumed_problem, resumed = _save_and_resume(case.optimizer, case.reference, case)
        expected_problem, expected = _save_and_resume(case.reference, case.reference, case)
    else:
        resumed_problem, resumed = _save_and_resume(case.reference, case.optimizer, case)
        expected_problem, expected = _save_and_resume(case.reference, None, case)
    deviation = max_deviation(resumed_problem.parameters(), resumed, expected_problem.parameters(), expected)
    _record(deviation_log, case, torch.float64, deviation)
    assert deviation <= FLOAT64_PARITY


# the only arguments allowed beyond torch's: keyword-only, after torch's, default None (= torch's behaviour)
OPTIMLAB_EXTENSIONS: dict[str, set[str]] = {"Adam": {"state_dtype", "cautious"}, "AdamW": {"state_dtype", "cautious"},
                                            "SGD": {"momentum_style"},  # the EMA-form heavy ball
                                            # torch has no fused step for these; optimlab compiles one
                                            "NAdam": {"fused"}, "RAdam": {"fused"}, "Adamax": {"fused"},
                                            "RMSprop": {"fused"}, "Adadelta": {"fused"}}


@pytest.mark.parametrize("name", CLASSIC_NAMES)
def test_constructor_and_defaults_match_torch(name: str) -> None:
    """Same argument names, order, kinds and defaults, and the same param-group keys and values,
    apart from the keyword-only optimlab extensions listed in ``OPTIMLAB_EXTENSIONS``."""
    ours_cls, torch_cls = getattr(optimlab_optim, name), getattr(torch.optim, name)
    extensions = OPTIMLAB_EXTENSIONS.get(name, set())
    ours_signature = list(inspect.signature(ours_cls.__init__).parameters.values())
    torch_signature = list(inspect.signature(torch_cls.__init__).parameters.values())
    assert [(p.name, p.kind, p.default) for p in ours_signature[: len(torch_signature)]] == [
        (p.name, p.kind, p.default) for p in torch_signature
    ]
    extra = ours_signature[len(torch_signature):]
    assert {p.name for p in extra} == extensions
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY and p.default is None for p in extra)
    ours = ours_cls([torch.nn.Parameter(torch.zeros(2))])
    reference = torch_cls([torch.nn.Parameter(torch.zeros(2))])
    assert {key: ours.defaults[key] for key in extensions} == dict.fromkeys(extensions)
    assert {key: value for key, value in ours.defaults.items() if key not in extensions} == reference.defaults
    assert issubclass(ours_cls, torch.optim.Optimizer)


def _embedding_run(cls: type[torch.optim.Optimizer], kwargs: dict, steps: int = 12) -> tuple[torch.Tensor, dict]:
    embedding = torch.nn.Embedding(10, 4, sparse=True, dtype=torch.float64)
    with torch.no_grad():
        embedding.weight.copy_(torch.randn(10, 4, generator=torch.Generator().manual_seed(7), dtype=torch.float64))
    optimizer = cls(embedding.parameters(), **kwargs)
    generator = torch.Generator().manual_seed(8)
    for _ in range(steps):
        optimizer.zero_grad()
        indices = torch.randint(0, 10, (6,), generator=generator)  # repeated indices: the grad is uncoalesced
        embedding(indices).pow(2).sum().backward()
        assert embedding.weight.grad.is_sparse
        optimizer.step()
    return embedding.weight.detach(), optimizer.state[embedding.weight]


@pytest.mark.parametrize(
    ("name", "kwargs"),
    [
        ("SGD", {"lr": 0.1}),
        ("SGD", {"lr": 0.1, "momentum": 0.9, "dampening": 0.2}),
        ("SGD", {"lr": 0.1, "momentum": 0.9, "nesterov": True, "maximize": True}),
        ("Adagrad", {"lr": 0.3}),
        ("Adagrad", {"lr": 0.3, "lr_decay": 0.1, "initial_accumulator_value": 0.2, "maximize": True}),
    ],
)
@pytest.mark.parametrize("foreach", [False, True], ids=["per-tensor", "foreach"])
@pytest.mark.filterwarnings("ignore:Sparse invariant checks:UserWarning")  # raised inside torch.optim.Adagrad
def test_sparse_gradients_match_torch(name: str, kwargs: dict, foreach: bool) -> None:
    ours_weight, ours_state = _embedding_run(getattr(optimlab_optim, name), {**kwargs, "foreach": foreach})
    torch_weight, torch_state = _embedding_run(getattr(torch.optim, name), kwargs)
    torch.testing.assert_close(ours_weight, torch_weight, rtol=1e-12, atol=0)
    assert set(ours_state) == set(torch_state)
    for key, value in torch_state.items():
        torch.testing.assert_close(ours_state[key].to_dense(), value.to_dense(), rtol=1e-12, atol=0)
