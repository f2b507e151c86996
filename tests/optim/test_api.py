"""Drop-in details of the classic optimizers beyond the matrix: registry names, named parameters,
old-format state_dicts, AdamW's identity, Adagrad's eager state, pickling."""

from __future__ import annotations

import pickle

import pytest
import torch

import optimlab.optim as optimlab_optim
from optimlab.optim import SGD, Adagrad, Adam, AdamW, NAdam, create_optimizer, get_spec, list_optimizers

from .harness import ShapesProblem, max_deviation, train

CLASSIC_NAMES = ["SGD", "Adam", "AdamW", "Adagrad", "RMSprop", "Adamax", "NAdam", "RAdam", "Adadelta"]


def test_registry_names_resolve_to_these_classes() -> None:
    for name in list_optimizers("optimlab"):
        cls = get_spec(name).resolve()
        if cls.__name__ in CLASSIC_NAMES and cls.__module__.startswith("optimlab.optim."):
            optimizer = create_optimizer(torch.nn.Linear(3, 2), name)
            assert isinstance(optimizer, getattr(optimlab_optim, cls.__name__))
    assert isinstance(create_optimizer(torch.nn.Linear(3, 2), "sgd-nesterov"), SGD)
    assert create_optimizer(torch.nn.Linear(3, 2), "amsgrad").defaults["amsgrad"] is True


@pytest.mark.parametrize("name", CLASSIC_NAMES)
def test_named_parameters_are_accepted_and_saved(name: str) -> None:
    model = torch.nn.Linear(3, 2)
    optimizer = getattr(optimlab_optim, name)(model.named_parameters(), lr=0.01)
    model(torch.randn(4, 3)).sum().backward()
    optimizer.step()
    assert optimizer.state_dict()["param_groups"][0]["param_names"] == ["weight", "bias"]


def test_old_format_float_scalars_in_a_state_dict_become_tensors() -> None:
    """state_dicts from older torch versions hold ``step`` (and NAdam's ``mu_product``) as floats."""
    problem = ShapesProblem()
    optimizer = NAdam(problem.parameters(), lr=0.01)
    train(problem, optimizer, 3)
    state_dict = optimizer.state_dict()
    for param_state in state_dict["state"].values():
        param_state["step"] = float(param_state["step"])
        param_state["mu_product"] = float(param_state["mu_product"])
    resumed = NAdam(ShapesProblem().parameters(), lr=0.01)
    resumed.load_state_dict(state_dict)
    for param_state in resumed.state.values():
        assert torch.is_tensor(param_state["step"]) and param_state["step"].dtype == torch.float32
        assert torch.is_tensor(param_state["mu_product"]) and param_state["mu_product"].dtype == torch.float32


def test_adamw_is_an_adam_with_decoupled_decay_even_after_loading() -> None:
    model = torch.nn.Linear(3, 2)
    optimizer = AdamW(model.parameters())
    assert isinstance(optimizer, Adam)
    assert optimizer.defaults["decoupled_weight_decay"] is True
    state_dict = optimizer.state_dict()
    state_dict["param_groups"][0]["decoupled_weight_decay"] = False
    optimizer.load_state_dict(state_dict)
    assert optimizer.param_groups[0]["decoupled_weight_decay"] is True


def test_adagrad_creates_its_state_at_construction_like_torch() -> None:
    model = torch.nn.Linear(3, 2)
    ours = Adagrad(model.parameters(), initial_accumulator_value=0.25)
    reference = torch.optim.Adagrad(model.parameters(), initial_accumulator_value=0.25)
    assert ours.state_dict()["state"].keys() == reference.state_dict()["state"].keys() == {0, 1}
    for index in (0, 1):
        assert torch.equal(ours.state_dict()["state"][index]["sum"], reference.state_dict()["state"][index]["sum"])
    ours.share_memory()
    assert all(state["sum"].is_shared() for state in ours.state.values())


def test_adagrad_honours_each_groups_initial_accumulator() -> None:
    first, second = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))
    optimizer = Adagrad([{"params": [first]}, {"params": [second], "initial_accumulator_value": 2.0}])
    assert torch.equal(optimizer.state[first]["sum"], torch.zeros(2))
    assert torch.equal(optimizer.state[second]["sum"], torch.full((2,), 2.0))


@pytest.mark.parametrize("name", CLASSIC_NAMES)
def test_pickle_round_trip_continues_identically(name: str) -> None:
    problem = ShapesProblem()
    optimizer = getattr(optimlab_optim, name)(problem.parameters(), lr=0.01)
    train(problem, optimizer, 4)
    problem_copy, optimizer_copy = pickle.loads(pickle.dumps((problem, optimizer)))
    train(problem, optimizer, 4, start=4)
    train(problem_copy, optimizer_copy, 4, start=4)
    assert max_deviation(problem_copy.parameters(), optimizer_copy, problem.parameters(), optimizer) == 0.0


def test_grads_are_not_modified_by_the_update() -> None:
    """Unlike torch's foreach Nesterov SGD, no path writes into ``p.grad``."""
    for name in CLASSIC_NAMES:
        for foreach in (False, True):
            param = torch.nn.Parameter(torch.randn(5))
            kwargs = {"momentum": 0.9, "nesterov": True} if name == "SGD" else {}
            optimizer = getattr(optimlab_optim, name)([param], lr=0.1, weight_decay=0.1, foreach=foreach, **kwargs)
            for _ in range(2):
                param.grad = torch.randn(5)
                grad = param.grad.clone()
                optimizer.step()
                assert torch.equal(param.grad, grad), (name, foreach)


def _run(factory, steps: int = 6) -> tuple[ShapesProblem, torch.optim.Optimizer]:
    problem = ShapesProblem()
    optimizer = factory(problem.parameters())
    train(problem, optimizer, steps)
    return problem, optimizer


@pytest.mark.parametrize(
    ("cls", "tensor_kwargs", "float_kwargs"),
    [
        (Adam, {"betas": (torch.tensor(0.75), torch.tensor(0.9375))}, {"betas": (0.75, 0.9375)}),
        (SGD, {"weight_decay": torch.tensor(0.125), "momentum": 0.5}, {"weight_decay": 0.125, "momentum": 0.5}),
    ],
    ids=["adam-tensor-betas", "sgd-tensor-weight-decay"],
)
def test_tensor_hyperparameters_equal_floats(cls: type, tensor_kwargs: dict, float_kwargs: dict) -> None:
    """torch accepts these as 0-dim tensors too (values exactly representable in float32)."""
    tensor_problem, tensor_opt = _run(lambda params: cls(params, lr=0.01, **tensor_kwargs))
    float_problem, float_opt = _run(lambda params: cls(params, lr=0.01, **float_kwargs))
    assert max_deviation(tensor_problem.parameters(), tensor_opt, float_problem.parameters(), float_opt) == 0.0


def test_step_hooks_and_lr_schedulers_work_as_with_torch() -> None:
    """The hooks of torch.optim.Optimizer fire, and an LR scheduler drives our lr like torch's."""
    calls = []

    def make(cls):
        def factory(params):
            optimizer = cls(params, lr=0.1, momentum=0.9)
            optimizer.register_step_pre_hook(lambda *_: calls.append(("pre", cls.__module__)))
            optimizer.register_step_post_hook(lambda *_: calls.append(("post", cls.__module__)))
            return optimizer
        return factory

    results = []
    for cls in (SGD, torch.optim.SGD):
        problem = ShapesProblem()
        optimizer = make(cls)(problem.parameters())
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=3, gamma=0.5)
        for t in range(9):
            train(problem, optimizer, 1, start=t)
            scheduler.step()
        results.append((problem, optimizer))
    assert calls.count(("pre", SGD.__module__)) == calls.count(("post", SGD.__module__)) == 9
    (ours_problem, ours), (torch_problem, reference) = results
    assert ours.param_groups[0]["lr"] == reference.param_groups[0]["lr"] == pytest.approx(0.0125)
    assert max_deviation(ours_problem.parameters(), ours, torch_problem.parameters(), reference) <= 1e-12
