"""A tensor ``lr`` updated in place keeps a ``torch.compile``d optimizer step from recompiling."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.testing import CompileCounter

from optimlab.schedules import CosineAnnealingLR, OneCycleLR

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")


def _compiled_steps(lr: float | torch.Tensor, make_scheduler, steps: int = 5) -> tuple[int, list[float]]:
    """Run ``steps`` compiled Adam steps with a scheduler; return (number of compilations, the lrs seen)."""
    torch._dynamo.reset()
    model = torch.nn.Linear(4, 1)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, foreach=False)
    scheduler = make_scheduler(optimizer)
    counter = CompileCounter()

    @torch.compile(backend=counter)
    def optimizer_step() -> None:
        optimizer.step()

    inputs = torch.randn(8, 4)
    seen = []
    for _ in range(steps):
        model(inputs).pow(2).mean().backward()
        optimizer_step()
        scheduler.step()
        seen.append(float(optimizer.param_groups[0]["lr"]))
    torch._dynamo.reset()
    return counter.frame_count, seen


@pytest.mark.parametrize("make_scheduler", [lambda opt: CosineAnnealingLR(opt, T_max=10),
                                            lambda opt: OneCycleLR(opt, max_lr=0.01, total_steps=10,
                                                                   cycle_momentum=False)],
                         ids=["cosine", "onecycle"])
def test_tensor_lr_compiles_once(make_scheduler):
    compilations, seen = _compiled_steps(torch.tensor(0.01), make_scheduler)
    assert len(set(seen)) == len(seen)  # the learning rate changed at every step ...
    assert compilations == 1  # ... without a recompilation


def test_float_lr_recompiles_control():
    """The counter does see recompilations: with a Python-float lr every new value is a new constant."""
    compilations, _ = _compiled_steps(0.01, lambda opt: CosineAnnealingLR(opt, T_max=10))
    assert compilations > 1
