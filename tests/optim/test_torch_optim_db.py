"""optimlab's optimizers through torch's own optimizer database (``torch.testing._internal.common_optimizers
.optim_db``, shipped with torch): every configuration of ``optim_inputs_func`` (with torch's foreach and
differentiable variants) gives the same trajectory and state as the torch class, and every bad input of
``optim_error_inputs_func`` raises torch's error type with a message matching torch's regex, at the same
moment (construction or step).

Each torch class maps to the optimlab class of the same name (``optimlab.optim.<Name>``); torch classes
without one are left out (listed by ``test_every_torch_optimizer_has_a_counterpart``). Deliberate differences
are listed in :data:`REFUSED` with the reason; each such entry is checked to still differ (so the list
cannot go stale). Run with ``-s`` for the counts.
"""

from __future__ import annotations

import copy
import warnings
from collections import Counter
from typing import Any

import pytest
import torch
from torch.testing._internal.common_optimizers import (OptimizerErrorEnum,
                                                        _get_optim_inputs_including_global_cliquey_kwargs, optim_db)

import optimlab.optim

from .fused_harness import max_relative_error

STEPS = 5
TOLERANCE = 1e-10  # float64, parameters and every state tensor, relative to each tensor's largest value

INFOS = {info.optim_cls.__name__: info for info in optim_db}
COUNTERPARTS = {name: getattr(optimlab.optim, name) for name in INFOS if hasattr(optimlab.optim, name)}

# torch behaviour optimlab deliberately does not follow: (class, torch's description of the input) -> reason.
# Each runs as a strict xfail, so an entry that stops differing fails the suite.
_TENSOR_HYPERPARAMETERS = ("optimlab accepts 0-dim tensor hyperparameters on every path (its multi-tensor path "
                           "reads them as floats; docs/optimizers.md), where torch refuses them with foreach=True "
                           "or mixed with floats")
REFUSED: dict[tuple[str, str], str] = {
    **{(name, desc): _TENSOR_HYPERPARAMETERS for name in ("Adam", "AdamW") for desc in (
        "lr as Tensor doesn't work with foreach & not capturable", "betas must be either both floats or both Tensors",
        "betas\\[0\\] as a Tensor is not supported for capturable=False and foreach=True")},
    ("Muon", "Tensor lr"): "torch's Muon multiplies the parameter by 1 - lr * weight_decay computed in the float32 "
                           "of a float32 tensor lr; optimlab reads lr as a float, so float64 parameters differ "
                           "from torch's by ~1e-7 relative after 5 steps",
}


def _params(name: str) -> list[torch.Tensor]:
    """float64 parameters (plain tensors: the closure below sets their gradients, so that differentiable
    configurations need no graph); Muon takes matrices only."""
    generator = torch.Generator().manual_seed(0)
    shapes = [(5, 3), (4, 6)] if name == "Muon" else [(5, 3), (5,), (2, 3, 4)]
    return [torch.randn(shape, generator=generator, dtype=torch.float64) for shape in shapes]


def _closure(params: list[torch.Tensor], step: int, sparse: bool = False):
    """f(p) = sum(w p^2 / 2 + b p) with w > 0, b fixed per step: sets each gradient w p + b (as a sparse
    tensor for optimizers that take only those, e.g. SparseAdam), returns f."""
    generator = torch.Generator().manual_seed(100 + step)
    weights = [torch.rand(p.shape, generator=generator, dtype=p.dtype) + 0.5 for p in params]
    shifts = [torch.randn(p.shape, generator=generator, dtype=p.dtype) for p in params]

    def closure() -> torch.Tensor:
        loss = torch.zeros((), dtype=torch.float64)
        for p, w, b in zip(params, weights, shifts):
            p.grad = (w * p.detach() + b).to_sparse() if sparse else w * p.detach() + b
            loss = loss + (0.5 * w * p.detach() ** 2 + b * p.detach()).sum()
        return loss

    return closure


def _run(cls: type, name: str, kwargs: dict[str, Any]) -> tuple[list[torch.Tensor], torch.optim.Optimizer]:
    params = _params(name)
    optimizer = cls(params, **copy.deepcopy(kwargs))
    for step in range(STEPS):
        optimizer.step(_closure(params, step, INFOS[name].only_supports_sparse_grads))
    return params, optimizer


def _assert_same_state(ours: Any, theirs: Any, key: str) -> None:
    if torch.is_tensor(theirs):
        assert max_relative_error([ours.to(theirs.dtype)], [theirs]) <= TOLERANCE, key
    elif isinstance(theirs, (list, tuple)):
        assert len(ours) == len(theirs), key
        for a, b in zip(ours, theirs):
            _assert_same_state(a, b, key)
    else:
        assert ours == theirs, key


def _configs() -> list[Any]:
    configs = []
    for name in sorted(COUNTERPARTS):
        # optimlab's fused=True is a compiled path (seconds per configuration), checked against the per-tensor
        # path in test_registered.py; torch's CPU fused kernels are not compared here. torch's helper leaves out
        # foreach on CPU (its list of foreach devices is the accelerators'), so the foreach variants are added.
        info = INFOS[name]
        for optim_input in _get_optim_inputs_including_global_cliquey_kwargs("cpu", torch.float64, info,
                                                                           skip=("fused", "differentiable")):
            variants = [(optim_input.kwargs, optim_input.desc)]
            if "foreach" in info.supported_impls:
                variants = [({**optim_input.kwargs, "foreach": value}, f"{optim_input.desc} & foreach={value}")
                            for value in (False, True)]
            refused = REFUSED.get((name, optim_input.desc))
            marks = [pytest.mark.xfail(reason=refused, strict=True)] if refused else []
            configs += [pytest.param(name, kwargs, id=f"{name}-{desc}", marks=marks) for kwargs, desc in variants]
    return configs


CONFIGS = _configs()


@pytest.mark.parametrize(("name", "kwargs"), CONFIGS)
def test_configuration_matches_torch(name: str, kwargs: dict[str, Any]) -> None:
    # the reference is torch's per-tensor path (its foreach ASGD differs from its own per-tensor path by 1.7e-9)
    reference_kwargs = {**kwargs, "foreach": False} if "foreach" in kwargs else kwargs
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's own deprecation warnings for some configurations
        reference_params, reference = _run(INFOS[name].optim_cls, name, reference_kwargs)
    params, optimizer = _run(COUNTERPARTS[name], name, kwargs)
    assert max_relative_error(params, reference_params) <= TOLERANCE
    for p, q in zip(params, reference_params):
        ours, theirs = optimizer.state.get(p, {}), reference.state.get(q, {})
        assert set(ours) == set(theirs)
        for key, value in theirs.items():
            _assert_same_state(ours[key], value, key)


def _error_inputs() -> list[Any]:
    cases = []
    for name in sorted(COUNTERPARTS):
        info = INFOS[name]
        if info.optim_error_inputs_func is None:
            continue
        for index, error_input in enumerate(info.optim_error_inputs_func("cpu", torch.float32)):
            desc = error_input.optimizer_error_input.desc
            marks = [pytest.mark.xfail(reason=REFUSED[(name, desc)], strict=True)] if (name, desc) in REFUSED else []
            cases.append(pytest.param(name, index, id=f"{name}-{desc}", marks=marks))
    return cases


@pytest.mark.parametrize(("name", "index"), _error_inputs())
def test_bad_input_raises_like_torch(name: str, index: int) -> None:
    error_input = INFOS[name].optim_error_inputs_func("cpu", torch.float32)[index]
    optim_input = error_input.optimizer_error_input
    params = optim_input.params
    if params is None:
        params = [torch.rand(2, 3, requires_grad=True)] if name == "Muon" else [torch.rand(3, requires_grad=True)]
    cls = COUNTERPARTS[name]
    expect = pytest.warns if issubclass(error_input.error_type, Warning) else pytest.raises
    if error_input.error_on == OptimizerErrorEnum.CONSTRUCTION_ERROR:
        with expect(error_input.error_type, match=error_input.error_regex):
            cls(params, **optim_input.kwargs)
    else:
        optimizer = cls(params, **optim_input.kwargs)
        with expect(error_input.error_type, match=error_input.error_regex):
            optimizer.step()


def test_every_torch_optimizer_has_a_counterpart() -> None:
    missing = sorted(set(INFOS) - set(COUNTERPARTS))
    print(f"\ntorch optimizers with an optimlab counterpart: {len(COUNTERPARTS)} of {len(INFOS)}; without: {missing}")
    print(f"configurations: {len(CONFIGS)} ({dict(Counter(p.values[0] for p in CONFIGS))})")
    assert {"SGD", "Adam", "AdamW", "Adagrad", "RMSprop", "Adamax", "NAdam", "RAdam", "Adadelta", "Adafactor",
            "Muon"} <= set(COUNTERPARTS)


_DIFFERENTIABLE_REFUSED: dict[str, str] = {}


def _differentiable_configs() -> list[Any]:
    configs = []
    for name in sorted(COUNTERPARTS):
        info = INFOS[name]
        if "differentiable" not in info.supported_impls:
            continue
        marks = [pytest.mark.xfail(reason=_DIFFERENTIABLE_REFUSED[name], strict=True,
                                   raises=NotImplementedError)] if name in _DIFFERENTIABLE_REFUSED else []
        for optim_input in _get_optim_inputs_including_global_cliquey_kwargs("cpu", torch.float64, info,
                                                                           skip=("fused", "foreach")):
            if optim_input.kwargs.get("differentiable"):
                configs.append(pytest.param(name, optim_input.kwargs, id=f"{name}-{optim_input.desc}", marks=marks))
    return configs


def _unrolled(cls: type, name: str, kwargs: dict[str, Any], steps: int) -> tuple[list[torch.Tensor], ...]:
    """``steps`` differentiable steps from parameters ``p = x.clone()`` with gradients ``w p + b`` that depend on
    ``p`` (so autograd runs through the gradients, the state and the update), then ``d sum(p^2) / dx``."""
    leaves = [p.requires_grad_() for p in _params(name)]
    params = [leaf.clone() for leaf in leaves]
    optimizer = cls(params, **copy.deepcopy(kwargs))
    for step in range(steps):
        generator = torch.Generator().manual_seed(100 + step)
        weights = [torch.rand(p.shape, generator=generator, dtype=p.dtype) + 0.5 for p in params]
        shifts = [torch.randn(p.shape, generator=generator, dtype=p.dtype) for p in params]

        def closure() -> torch.Tensor:
            for p, w, b in zip(params, weights, shifts):
                p.grad = w * p + b
            return torch.zeros(())

        optimizer.step(closure)
    loss = sum((p**2).sum() for p in params)
    return [p.detach() for p in params], list(torch.autograd.grad(loss, leaves))


@pytest.mark.parametrize(("name", "kwargs"), _differentiable_configs())
def test_differentiable_configuration_matches_torch(name: str, kwargs: dict[str, Any]) -> None:
    """``differentiable=True``: the parameters after three unrolled steps and the gradient of a loss of them with
    respect to the initial parameters equal torch's within 1e-12. float64 default dtype, so that both keep
    ``step`` in float64 (torch's differentiable path computes its bias corrections in the dtype of ``step``,
    float32 by default, which alone moves Adam's parameters by ~1e-8). Where torch's own path cannot be
    unrolled (it updates in place a state tensor its graph saved: AMSGrad, Adamax, centered or momentum
    RMSprop), both are compared on one step, and optimlab's is still unrolled over three."""
    torch.set_default_dtype(torch.float64)
    try:
        ours = _unrolled(COUNTERPARTS[name], name, kwargs, 3)
        try:
            steps, theirs = 3, _unrolled(INFOS[name].optim_cls, name, kwargs, 3)
        except RuntimeError as error:
            assert "modified by an inplace operation" in str(error)
            steps, theirs = 1, _unrolled(INFOS[name].optim_cls, name, kwargs, 1)
            ours = _unrolled(COUNTERPARTS[name], name, kwargs, 1)
    finally:
        torch.set_default_dtype(torch.float32)
    (params, grads), (reference_params, reference_grads) = ours, theirs
    assert max_relative_error(params, reference_params) <= 1e-12, steps
    assert max_relative_error(grads, reference_grads) <= 1e-12, steps
