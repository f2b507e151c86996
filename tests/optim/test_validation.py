"""Every argument check of the classic optimizers: the error type and a message naming the
argument, the bad value and the accepted range, starting with torch.optim's own phrase (``Invalid
weight_decay value: -0.01``, ``Invalid beta parameter at index 0: 1.0``) so that code matching torch's
errors keeps working."""

from __future__ import annotations

import math

import pytest
import torch

from optimlab.optim import SGD, Adadelta, Adagrad, Adam, Adamax, AdamW, NAdam, RAdam, RMSprop

ALL_CLASSES = [SGD, Adam, AdamW, Adagrad, RMSprop, Adamax, NAdam, RAdam, Adadelta]
BETA_CLASSES = [Adam, AdamW, Adamax, NAdam, RAdam]
EPS_CLASSES = [Adam, AdamW, Adagrad, RMSprop, Adamax, NAdam, RAdam, Adadelta]

INVALID = [
    *[(cls, {"lr": -0.1}, r"Invalid learning rate: -0\.1 \(lr; accepted range: a finite value >= 0\)") for cls in ALL_CLASSES],
    *[(cls, {"lr": math.nan}, r"Invalid learning rate: nan \(lr;") for cls in ALL_CLASSES],
    *[(cls, {"lr": math.inf}, r"Invalid learning rate: inf \(lr;") for cls in ALL_CLASSES],
    *[(cls, {"lr": torch.tensor([0.1, 0.2])}, r"Tensor lr must be 1-element \(Invalid lr: got shape \(2,\)\)")
      for cls in ALL_CLASSES],
    *[(cls, {"lr": torch.tensor(-1.0)}, r"Invalid learning rate: -1\.0 \(lr;") for cls in ALL_CLASSES],
    *[(cls, {"weight_decay": -0.01}, r"Invalid weight_decay value: -0\.01 \(accepted range: >= 0\)") for cls in ALL_CLASSES],
    *[(cls, {"eps": -1e-8}, r"Invalid epsilon value: -1e-08 \(eps; accepted range: >= 0\)") for cls in EPS_CLASSES],
    *[(cls, {"betas": (1.0, 0.999)}, r"Invalid beta parameter at index 0: 1\.0 \(betas\[0\] \(beta1\); accepted range: \[0\.0, 1\.0\)\)")
      for cls in BETA_CLASSES],
    *[(cls, {"betas": (0.9, -0.1)}, r"Invalid beta parameter at index 1: -0\.1 \(betas\[1\] \(beta2\); accepted range: \[0\.0, 1\.0\)\)")
      for cls in BETA_CLASSES],
    *[(cls, {"betas": (0.9,)}, r"Invalid betas: expected 2 values, got 1") for cls in BETA_CLASSES],
    (SGD, {"momentum": -0.5}, r"Invalid momentum value: -0\.5 \(accepted range: >= 0\)"),
    (SGD, {"dampening": 1.5}, r"Invalid dampening value: 1\.5 \(accepted range: \[0\.0, 1\.0\]\)"),
    (SGD, {"nesterov": True}, r"Invalid nesterov=True with momentum=0, dampening=0: .*momentum > 0 and dampening = 0"),
    (SGD, {"nesterov": True, "momentum": 0.9, "dampening": 0.1},
     r"Invalid nesterov=True with momentum=0\.9, dampening=0\.1: Nesterov momentum requires"),
    (Adagrad, {"lr_decay": -1.0}, r"Invalid lr_decay value: -1\.0 \(accepted range: >= 0\)"),
    (Adagrad, {"initial_accumulator_value": -0.1}, r"Invalid initial_accumulator_value value: -0\.1 \(accepted range: >= 0\)"),
    (RMSprop, {"alpha": -0.1}, r"Invalid alpha value: -0\.1 \(accepted range: \[0\.0, 1\.0\]\)"),
    (RMSprop, {"alpha": 1.1}, r"Invalid alpha value: 1\.1 \(accepted range: \[0\.0, 1\.0\]\)"),
    (RMSprop, {"momentum": -0.9}, r"Invalid momentum value: -0\.9 \(accepted range: >= 0\)"),
    (NAdam, {"momentum_decay": -0.004}, r"Invalid momentum_decay value: -0\.004 \(accepted range: >= 0\)"),
    (Adadelta, {"rho": 1.01}, r"Invalid rho value: 1\.01 \(accepted range: \[0\.0, 1\.0\]\)"),
    (Adadelta, {"rho": -0.5}, r"Invalid rho value: -0\.5 \(accepted range: \[0\.0, 1\.0\]\)"),
]


def _param() -> torch.nn.Parameter:
    return torch.nn.Parameter(torch.zeros(3))


@pytest.mark.parametrize(("cls", "kwargs", "message"), INVALID,
                         ids=lambda value: value.__name__ if isinstance(value, type) else None)
def test_invalid_argument_raises_value_error(cls: type, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        cls([_param()], **kwargs)


BOUNDARY_VALUES = [
    (SGD, {"lr": 0.0, "momentum": 0.0, "dampening": 1.0, "weight_decay": 0.0}),
    (Adam, {"lr": torch.tensor(0.0), "betas": (0.0, 0.0), "eps": 0.0}),
    (RMSprop, {"alpha": 1.0}),
    (RMSprop, {"alpha": 0.0}),
    (Adadelta, {"rho": 1.0}),
    (Adadelta, {"rho": 0.0}),
    (Adagrad, {"lr_decay": 0.0, "initial_accumulator_value": 0.0}),
]


@pytest.mark.parametrize(("cls", "kwargs"), BOUNDARY_VALUES, ids=lambda value: getattr(value, "__name__", None))
def test_boundary_values_are_accepted(cls: type, kwargs: dict) -> None:
    optimizer = cls([_param()], **kwargs)
    assert all(optimizer.defaults[key] is value for key, value in kwargs.items())


UNSUPPORTED = [(Adam, "capturable"), (AdamW, "capturable"), (RMSprop, "capturable"), (Adamax, "capturable"),
               (NAdam, "capturable"), (RAdam, "capturable"), (Adadelta, "capturable")]


@pytest.mark.parametrize(("cls", "flag"), UNSUPPORTED, ids=lambda value: getattr(value, "__name__", value))
def test_unsupported_flags_raise(cls: type, flag: str) -> None:
    with pytest.raises(NotImplementedError, match=rf"{cls.__name__}\({flag}=True\) is not supported by optimlab"):
        cls([_param()], **{flag: True})
    cls([_param()], **{flag: False})  # the explicit default is fine


@pytest.mark.parametrize("cls", ALL_CLASSES, ids=lambda cls: cls.__name__)
def test_differentiable_refuses_the_foreach_and_fused_paths_like_torch(cls: type) -> None:
    """``differentiable=True`` runs the per-tensor path (compared with torch's in test_torch_optim_db.py)."""
    with pytest.raises(RuntimeError, match="`fused` does not support `differentiable`"):
        cls([_param()], differentiable=True, fused=True)
    with pytest.raises(RuntimeError, match="`foreach` does not support `differentiable`.*_foreach ops don't support"):
        cls([_param()], differentiable=True, foreach=True)
    assert cls([_param()], differentiable=True).defaults["differentiable"] is True


def _sparse_embedding() -> torch.nn.Embedding:
    embedding = torch.nn.Embedding(5, 2, sparse=True)
    embedding(torch.tensor([0, 3, 3])).sum().backward()
    return embedding


@pytest.mark.parametrize("cls", [Adam, AdamW, RMSprop, Adamax, NAdam, RAdam, Adadelta], ids=lambda cls: cls.__name__)
def test_sparse_gradients_rejected_where_torch_rejects_them(cls: type) -> None:
    embedding = _sparse_embedding()
    optimizer = cls(embedding.parameters())
    before = embedding.weight.detach().clone()
    with pytest.raises(RuntimeError, match=rf"{cls.__name__} does not support sparse gradients"):
        optimizer.step()
    assert torch.equal(embedding.weight, before)


@pytest.mark.parametrize("cls", [SGD, Adagrad], ids=lambda cls: cls.__name__)
def test_sparse_gradients_with_weight_decay_raise(cls: type) -> None:
    embedding = _sparse_embedding()
    optimizer = cls(embedding.parameters(), lr=0.1, weight_decay=0.1)
    with pytest.raises(RuntimeError, match=r"weight_decay=0\.1 is not compatible with sparse gradients"):
        optimizer.step()
