"""SGD(momentum_style="ema"): the EMA-form heavy ball v ← βv + (1−β)g from v = 0, θ ← θ − ηv, checked
against the formula (a plain Python transcription), against torch's form at lr (1−β)η, and its first step."""

from __future__ import annotations

import pytest
import torch

from optimlab.optim import SGD


def _grad(theta: torch.Tensor, t: int) -> torch.Tensor:
    """Gradient of a fixed non-quadratic loss, 0.5·Σ a·θ² + Σ sin(θ + t/10)·c."""
    generator = torch.Generator().manual_seed(7)
    a = torch.rand(theta.shape, generator=generator, dtype=torch.float64) + 0.5
    c = torch.randn(theta.shape, generator=generator, dtype=torch.float64)
    return a * theta + c * torch.cos(theta + t / 10)


def _run(optimizer_cls, steps: int, **kwargs) -> tuple[torch.Tensor, torch.optim.Optimizer]:
    param = torch.nn.Parameter(torch.linspace(-2, 2, 9, dtype=torch.float64))
    optimizer = optimizer_cls([param], **kwargs)
    for t in range(steps):
        param.grad = _grad(param.detach(), t)
        optimizer.step()
    return param.detach(), optimizer


def _formula(steps: int, lr: float, beta: float, weight_decay: float = 0.0, maximize: bool = False) -> torch.Tensor:
    theta = [float(x) for x in torch.linspace(-2, 2, 9, dtype=torch.float64)]
    v = [0.0] * len(theta)
    for t in range(steps):
        g = _grad(torch.tensor(theta, dtype=torch.float64), t).tolist()
        for i in range(len(theta)):
            gi = (-g[i] if maximize else g[i]) + weight_decay * theta[i]
            v[i] = beta * v[i] + (1 - beta) * gi
            theta[i] -= lr * v[i]
    return torch.tensor(theta, dtype=torch.float64)


@pytest.mark.parametrize("foreach", [False, True], ids=["per-tensor", "foreach"])
@pytest.mark.parametrize(("beta", "weight_decay", "maximize"), [(0.9, 0.0, False), (0.5, 0.1, True)])
def test_ema_momentum_follows_the_formula(foreach: bool, beta: float, weight_decay: float, maximize: bool) -> None:
    theta, optimizer = _run(SGD, 25, lr=0.1, momentum=beta, weight_decay=weight_decay, maximize=maximize,
                            momentum_style="ema", foreach=foreach)
    torch.testing.assert_close(theta, _formula(25, 0.1, beta, weight_decay, maximize), rtol=1e-13, atol=1e-14)
    assert set(optimizer.state[optimizer.param_groups[0]["params"][0]]) == {"momentum_buffer"}


def test_ema_form_is_torch_form_at_lr_times_one_minus_beta() -> None:
    """From v = 0, v_t = (1−β)·b_t with torch's undampened buffer b: lr η here equals lr (1−β)η in torch."""
    ours, _ = _run(SGD, 30, lr=0.2, momentum=0.8, momentum_style="ema")
    reference, _ = _run(torch.optim.SGD, 30, lr=0.2 * (1 - 0.8), momentum=0.8)
    torch.testing.assert_close(ours, reference, rtol=1e-12, atol=1e-14)


def test_first_step_is_scaled_by_one_minus_beta() -> None:
    """The first step moves by η(1−β)g; torch's form (any dampening) starts with b₁ = g₁, a step of ηg."""
    start = torch.linspace(-2, 2, 9, dtype=torch.float64)
    g = _grad(start, 0)
    ours, _ = _run(SGD, 1, lr=0.1, momentum=0.9, momentum_style="ema")
    damped, _ = _run(torch.optim.SGD, 1, lr=0.1, momentum=0.9, dampening=0.9)
    torch.testing.assert_close(ours, start - 0.1 * 0.1 * g, rtol=1e-14, atol=1e-15)
    torch.testing.assert_close(damped, start - 0.1 * g, rtol=1e-14, atol=1e-15)


def test_default_is_torchs_form() -> None:
    ours, _ = _run(SGD, 10, lr=0.1, momentum=0.9)
    reference, _ = _run(torch.optim.SGD, 10, lr=0.1, momentum=0.9)
    assert torch.equal(ours, reference)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"momentum": 0.9, "momentum_style": "polyak"}, r"Invalid momentum_style: 'polyak' \(accepted: None"),
    ({"momentum": 0.9, "momentum_style": "ema", "nesterov": True}, "momentum_style='ema' does not combine with nesterov"),
    ({"momentum": 0.9, "momentum_style": "ema", "dampening": 0.5}, "momentum_style='ema' fixes the dampening"),
    ({"momentum": 1.0, "momentum_style": "ema"}, r"Invalid momentum value: 1.0 \(accepted range: \[0.0, 1.0\)"),
])
def test_bad_arguments(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.1, **kwargs)
