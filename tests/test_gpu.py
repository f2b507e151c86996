"""CUDA paths: the same parity checks as on the CPU, run on a GPU when one is present.

Every test here is marked ``gpu``; ``tests/conftest.py`` skips them cleanly on machines without CUDA
(CI has none). On a GPU machine they check that the optimizers, the clipping functions and the fused
(Triton) path give torch's results on the device, not only on the CPU.
"""

from __future__ import annotations

import pytest
import torch

from optimlab.clip import clip_grad_norm_
from optimlab.optim import flatten_parameters
from optimlab.optim.flat import ELEMENTWISE
from tests.optim.cases import REFERENCE_CASES

pytestmark = pytest.mark.gpu

STEPS = 20


def _params(device: str, dtype: torch.dtype) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    shapes = [(), (7,), (5, 4), (2, 3, 4)]
    return [torch.randn(shape, generator=generator, dtype=dtype).to(device).requires_grad_() for shape in shapes]


def _train(optimizer_cls: type[torch.optim.Optimizer], kwargs: dict, device: str, dtype: torch.dtype,
           flat: bool = False) -> list[torch.Tensor]:
    params = _params(device, dtype)
    optimizer = optimizer_cls(params, **{k: (v.to(device) if torch.is_tensor(v) else v) for k, v in kwargs.items()})
    if flat:
        flatten_parameters(optimizer)
    for step in range(STEPS):
        optimizer.zero_grad()
        loss = sum(((p - 0.1 * step) ** 2).sum() + torch.sin(3 * p).sum() for p in params)
        loss.backward()
        optimizer.step()
    return [p.detach().cpu() for p in params]


def _max_relative(ours: list[torch.Tensor], reference: list[torch.Tensor]) -> float:
    return max(float((a - b).abs().max() / b.abs().max().clamp(min=1e-30)) for a, b in zip(ours, reference))


@pytest.mark.parametrize("case", REFERENCE_CASES, ids=lambda case: case.id)
def test_optimizer_matches_torch_on_cuda(case) -> None:
    ours = _train(case.optimizer, case.kwargs, "cuda", torch.float64)
    reference = _train(case.reference, case.kwargs, "cuda", torch.float64)
    assert _max_relative(ours, reference) <= case.tolerance


@pytest.mark.parametrize("norm_type", [1.0, 2.0, float("inf"), 0.5, 3.5])
def test_clip_grad_norm_matches_torch_on_cuda(norm_type: float) -> None:
    ours, reference = _params("cuda", torch.float32), _params("cuda", torch.float32)
    for a, b in zip(ours, reference):
        a.grad = torch.randn_like(a) * 10
        b.grad = a.grad.clone()
    total_ours = clip_grad_norm_(ours, 1.0, norm_type=norm_type)
    total_reference = torch.nn.utils.clip_grad_norm_(reference, 1.0, norm_type=norm_type)
    torch.testing.assert_close(total_ours, total_reference, rtol=1e-6, atol=0)
    for a, b in zip(ours, reference):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=0)


FUSED_KWARGS = {
    "Adam": {"lr": 0.01}, "AdamW": {"lr": 0.01}, "SGD": {"lr": 0.01, "momentum": 0.9}, "Adagrad": {"lr": 0.05},
    "Lion": {"lr": 1e-3}, "NAdam": {"lr": 0.01}, "RAdam": {"lr": 0.01}, "Adamax": {"lr": 0.01},
    "RMSprop": {"lr": 0.01, "momentum": 0.5, "centered": True}, "Adadelta": {"lr": 1.0}, "LAMB": {"lr": 0.01},
    "LARS": {"lr": 0.01}, "ScheduleFreeAdamW": {"lr": 0.01}, "Adafactor": {"lr": 0.01},
}


@pytest.mark.parametrize("name", sorted(FUSED_KWARGS))
def test_fused_triton_path_matches_reference_on_cuda(name: str) -> None:
    import inspect

    import optimlab.optim as optim

    cls = getattr(optim, name)
    kwargs = FUSED_KWARGS[name]
    fused = _train(cls, {**kwargs, "fused": True}, "cuda", torch.float32)
    reference_kwargs = {**kwargs, "foreach": False} if "foreach" in inspect.signature(cls).parameters else kwargs
    reference = _train(cls, reference_kwargs, "cuda", torch.float32)
    assert _max_relative(fused, reference) <= 1e-6


@pytest.mark.parametrize("name", sorted(set(FUSED_KWARGS) & set(ELEMENTWISE)))
def test_flat_fused_step_matches_reference_on_cuda(name: str) -> None:
    """Flat-buffer mode with the fused step on the GPU: one Triton kernel per buffer, the reference's results."""
    import inspect

    import optimlab.optim as optim

    cls = getattr(optim, name)
    kwargs = FUSED_KWARGS[name]
    flat = _train(cls, {**kwargs, "fused": True}, "cuda", torch.float32, flat=True)
    reference_kwargs = {**kwargs, "foreach": False} if "foreach" in inspect.signature(cls).parameters else kwargs
    reference = _train(cls, reference_kwargs, "cuda", torch.float32)
    assert _max_relative(flat, reference) <= 1e-6
