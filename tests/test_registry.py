import pytest
import torch

import optimlab
from optimlab.analysis._params import training_step
from optimlab.optim import create_optimizer, get_spec, list_optimizers, state_bytes, state_bytes_per_param


def test_torch_names_construct_and_step():
    for name in list_optimizers("torch"):
        model = torch.nn.Linear(3, 2)
        opt = create_optimizer(model, name)
        assert isinstance(opt, torch.optim.Optimizer)
        assert opt.param_groups[0]["lr"] == get_spec(name).default_lr
        before = [p.detach().clone() for p in model.parameters()]
        # with a closure for the names that need one (torch.lbfgs)
        training_step(model, opt, lambda m, inputs: m(inputs).pow(2).sum(), torch.randn(4, 3))
        assert any(not torch.equal(b, p) for b, p in zip(before, model.parameters())), name


def test_preset_is_applied_and_overridable():
    model = torch.nn.Linear(3, 2)
    opt = create_optimizer(model, "torch.sgd-momentum", lr=0.1)
    assert opt.param_groups[0]["momentum"] == 0.9
    opt = create_optimizer(model, "torch.sgd-momentum", lr=0.1, momentum=0.5)
    assert opt.param_groups[0]["momentum"] == 0.5


def test_unknown_name_lists_close_matches():
    with pytest.raises(KeyError, match=r"Did you mean: .*torch\.adamw"):
        create_optimizer(torch.nn.Linear(2, 2), "torch.adamww")


def test_unknown_kwarg_raises_with_suggestion():
    with pytest.raises(TypeError, match=r"'betaz'.*Did you mean: betas"):
        create_optimizer(torch.nn.Linear(2, 2), "torch.adam", betaz=(0.9, 0.99))


def test_list_optimizers_source_filter():
    torch_names = list_optimizers("torch")
    ours = list_optimizers("optimlab")
    assert torch_names and ours
    assert set(torch_names).isdisjoint(ours)
    assert set(torch_names) | set(ours) == set(optimlab.list_optimizers())
    with pytest.raises(ValueError, match="source"):
        list_optimizers("jax")


def test_state_bytes_counts_adam_moments():
    model = torch.nn.Linear(10, 10)  # 110 parameters
    opt = torch.optim.Adam(model.parameters())
    model(torch.randn(2, 10)).sum().backward()
    opt.step()
    assert state_bytes(opt) == 110 * 8
    assert state_bytes_per_param(opt) == 8.0
    assert state_bytes(opt, include_scalars=True) == 110 * 8 + 2 * 4
