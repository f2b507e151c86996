"""MultiSteps (gradient accumulation, optax's MultiSteps for torch): k micro-batches equal one k-times larger
batch, bit for bit on a linear model with dyadic data (every operation exact) and within 1e-12 in general."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from optimlab.optim import AdamW, MultiSteps

K, MICRO = 4, 8


def _dyadic_problem() -> tuple[nn.Linear, torch.Tensor, torch.Tensor]:
    """A linear model and data whose values are small multiples of powers of two, so that forward, backward,
    means over power-of-two batch sizes and SGD steps with a power-of-two lr are exact in float64."""
    generator = torch.Generator().manual_seed(0)
    model = nn.Linear(5, 2, dtype=torch.float64)
    with torch.no_grad():
        model.weight.copy_(torch.randint(-4, 5, (2, 5), generator=generator) / 4)
        model.bias.copy_(torch.randint(-4, 5, (2,), generator=generator) / 8)
    inputs = torch.randint(-3, 4, (3 * K * MICRO, 5), generator=generator).double()
    targets = torch.randint(-3, 4, (3 * K * MICRO, 2), generator=generator).double()
    return model, inputs, targets


def _large_batch(model: nn.Module, optimizer: torch.optim.Optimizer, inputs, targets, steps: int) -> None:
    for step in range(steps):
        rows = slice(step * K * MICRO, (step + 1) * K * MICRO)
        optimizer.zero_grad()
        nn.functional.mse_loss(model(inputs[rows]), targets[rows]).backward()
        optimizer.step()


def _micro_batches(model: nn.Module, optimizer: MultiSteps, inputs, targets, micro_steps: int,
                   start: int = 0) -> list[bool]:
    applied = []
    for micro in range(start, start + micro_steps):
        rows = slice(micro * MICRO, (micro + 1) * MICRO)
        optimizer.zero_grad()
        nn.functional.mse_loss(model(inputs[rows]), targets[rows]).backward()
        before = [p.detach().clone() for p in model.parameters()]
        optimizer.step()
        applied.append(optimizer.last_step_applied)
        if not optimizer.last_step_applied:  # the parameters move only on the k-th call
            assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
    return applied


def test_k_micro_batches_equal_a_k_times_larger_batch_bit_for_bit() -> None:
    model, inputs, targets = _dyadic_problem()
    twin = copy.deepcopy(model)
    _large_batch(model, torch.optim.SGD(model.parameters(), lr=2**-4, momentum=0.5), inputs, targets, 3)
    accumulated = MultiSteps(torch.optim.SGD(twin.parameters(), lr=2**-4, momentum=0.5), every_k=K)
    applied = _micro_batches(twin, accumulated, inputs, targets, 3 * K)
    assert applied == [False, False, False, True] * 3
    for expected, actual in zip(model.parameters(), twin.parameters()):
        assert torch.equal(actual, expected)
    assert not torch.equal(model.weight, _dyadic_problem()[0].weight)


def test_adamw_on_random_data_within_1e_12() -> None:
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 2)).double()
    twin = copy.deepcopy(model)
    inputs, targets = torch.randn(3 * K * MICRO, 5, dtype=torch.float64), torch.randn(3 * K * MICRO, 2, dtype=torch.float64)
    _large_batch(model, AdamW(model.parameters(), lr=1e-2), inputs, targets, 3)
    _micro_batches(twin, MultiSteps(AdamW(twin.parameters(), lr=1e-2), every_k=K), inputs, targets, 3 * K)
    for expected, actual in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(actual, expected, rtol=1e-12, atol=1e-14)


def test_sum_of_gradients_with_use_grad_mean_false() -> None:
    """With the sum, the step equals one on the large batch's gradient times k."""
    model, inputs, targets = _dyadic_problem()
    twin = copy.deepcopy(model)
    _large_batch(model, torch.optim.SGD(model.parameters(), lr=K * 2**-5), inputs, targets, 2)
    _micro_batches(twin, MultiSteps(torch.optim.SGD(twin.parameters(), lr=2**-5), every_k=K, use_grad_mean=False),
                   inputs, targets, 2 * K)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), twin.parameters()))


def test_every_k_1_is_the_inner_optimizer_and_grads_are_restored() -> None:
    model, inputs, targets = _dyadic_problem()
    twin = copy.deepcopy(model)
    plain, wrapped = AdamW(model.parameters(), lr=0.01), MultiSteps(AdamW(twin.parameters(), lr=0.01), every_k=1)
    for step in range(5):
        for net, optimizer in ((model, plain), (twin, wrapped)):
            optimizer.zero_grad()
            nn.functional.mse_loss(net(inputs[step::7]), targets[step::7]).backward()
            grads = [p.grad for p in net.parameters()]
            optimizer.step()
            assert [p.grad for p in net.parameters()] == grads  # the same objects: the user's gradients
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), twin.parameters()))


def test_resume_mid_accumulation_is_exact() -> None:
    model, inputs, targets = _dyadic_problem()
    uninterrupted = MultiSteps(AdamW(model.parameters(), lr=0.01), every_k=K)
    _micro_batches(model, uninterrupted, inputs, targets, 2 * K + 2)
    checkpoint = copy.deepcopy((model.state_dict(), uninterrupted.state_dict()))
    _micro_batches(model, uninterrupted, inputs, targets, K + 2, start=2 * K + 2)

    resumed_model = _dyadic_problem()[0]
    resumed_model.load_state_dict(checkpoint[0])
    resumed = MultiSteps(AdamW(resumed_model.parameters(), lr=0.01), every_k=K)
    resumed.load_state_dict(checkpoint[1])
    assert resumed.mini_steps == 2
    _micro_batches(resumed_model, resumed, inputs, targets, K + 2, start=2 * K + 2)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), resumed_model.parameters()))


def test_parameter_without_gradient_in_some_micro_steps_counts_zero() -> None:
    param = nn.Parameter(torch.zeros(3, dtype=torch.float64))
    optimizer = MultiSteps(torch.optim.SGD([param], lr=1.0), every_k=4)
    for grad in (torch.ones(3), None, 3 * torch.ones(3), None):
        param.grad = None if grad is None else grad.double()
        optimizer.step()
    assert torch.equal(param.detach(), -torch.ones(3, dtype=torch.float64))  # mean (1 + 0 + 3 + 0) / 4


@pytest.mark.parametrize(("args", "error", "message"), [
    ((torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1), 0), ValueError, "Invalid every_k: 0"),
    ((torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1), 2.0), ValueError, "Invalid every_k: 2.0"),
    (("sgd", 2), TypeError, "expected a torch.optim.Optimizer, got str"),
])
def test_bad_arguments(args, error, message) -> None:
    with pytest.raises(error, match=message):
        MultiSteps(*args)
