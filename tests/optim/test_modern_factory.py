"""The modern optimizers through the factory (every registered name constructs and steps, typos raise)
and their argument validation (clear ValueErrors naming the argument)."""

from __future__ import annotations

import pytest
import torch

from optimlab import create_optimizer, list_optimizers
from optimlab.optim import LAMB, LARS, Adafactor, Lion, get_spec

MODERN_NAMES = ["lion", "lion-bf16", "lion-int8", "lamb", "lars", "adafactor", "muon", "schedule-free-adamw"]


def test_modern_names_are_registered() -> None:
    assert set(MODERN_NAMES) <= set(list_optimizers("optimlab"))
    for name in MODERN_NAMES:
        spec = get_spec(name)
        low, high = spec.lr_bounds
        assert low < spec.default_lr < high and spec.description


@pytest.mark.parametrize("name", MODERN_NAMES)
def test_every_modern_name_constructs_and_steps_a_model(name: str) -> None:
    model = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 2))
    optimizer = create_optimizer(model, name, weight_decay=0.01)
    assert optimizer.param_groups[0]["lr"] == get_spec(name).default_lr
    before = [p.detach().clone() for p in model.parameters()]
    for _ in range(3):
        optimizer.zero_grad()
        model(torch.randn(16, 5)).pow(2).mean().backward()
        optimizer.step()
    moved = [not torch.equal(b, p) for b, p in zip(before, model.parameters())]
    assert all(moved), (name, moved)


def test_state_dtype_presets() -> None:
    model = torch.nn.Linear(4, 4)
    assert create_optimizer(model, "lion-bf16").param_groups[0]["state_dtype"] == "bfloat16"
    assert create_optimizer(model, "lion-int8").param_groups[0]["state_dtype"] == "int8"
    assert create_optimizer(model, "lion-int8", state_dtype=None).param_groups[0]["state_dtype"] is None


@pytest.mark.parametrize(("name", "typo", "suggestion"), [
    ("lion", "beta", "betas"),
    ("lamb", "max_trust", "max_trust_ratio"),
    ("lars", "trust_coef", "trust_coefficient"),
    ("adafactor", "beta_1", "beta1"),
    ("muon", "adamw_betas2", "adamw_betas"),
    ("schedule-free-adamw", "warmup", "warmup_steps"),
])
def test_a_typo_in_a_keyword_raises(name: str, typo: str, suggestion: str) -> None:
    with pytest.raises(TypeError, match=rf"'{typo}'.*Did you mean: .*{suggestion}"):
        create_optimizer(torch.nn.Linear(2, 2), name, **{typo: 0.9})


@pytest.mark.parametrize(("cls", "kwargs", "match"), [
    (Lion, {"lr": -1.0}, "lr"),
    (Lion, {"betas": (1.0, 0.99)}, r"betas\[0\]"),
    (Lion, {"betas": (0.9, -0.1)}, r"betas\[1\]"),
    (Lion, {"weight_decay": -0.1}, "weight_decay"),
    (LAMB, {"eps": -1.0}, "eps"),
    (LAMB, {"max_trust_ratio": 0.0}, "max_trust_ratio"),
    (LAMB, {"betas": (0.9, 1.5)}, r"betas\[1\]"),
    (LARS, {"momentum": 1.0}, "momentum"),
    (LARS, {"trust_coefficient": 0.0}, "trust_coefficient"),
    (LARS, {"weight_decay": -1.0}, "weight_decay"),
    (Adafactor, {"beta2_decay": 0.5}, "beta2_decay"),
    (Adafactor, {"d": 0.5}, "d"),
    (Adafactor, {"eps": (None, -1.0)}, "eps2"),
    (Adafactor, {"eps": (-1.0, 1e-3)}, "eps1"),
    (Adafactor, {"eps": (1e-30,)}, "eps"),
    (Adafactor, {"beta1": 1.0}, "beta1"),
])
def test_invalid_arguments_raise_value_errors(cls, kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        cls([torch.nn.Parameter(torch.ones(3))], **kwargs)
