"""The path ``foreach=None`` takes per device (optimlab.optim._base.default_foreach), and that the optimizers follow it."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

import optimlab.optim.adam as adam_module
from optimlab.optim import Adam
from optimlab.optim._base import FOREACH_CPU_MAX_MEAN_NUMEL, default_foreach


def _fake(device: str, numel: int) -> SimpleNamespace:
    # the rule reads only the device type and the size
    return SimpleNamespace(device=torch.device(device), numel=lambda: numel)


def test_rule_per_device() -> None:
    big, small = FOREACH_CPU_MAX_MEAN_NUMEL + 1, FOREACH_CPU_MAX_MEAN_NUMEL
    assert default_foreach([torch.zeros(big), torch.zeros(big)]) is False  # CPU, large tensors: the loop
    assert default_foreach([torch.zeros(small), torch.zeros(small)]) is True  # CPU, small tensors: foreach
    assert default_foreach([torch.zeros(2 * small - 10), torch.zeros(10)]) is True  # the mean decides
    assert default_foreach([_fake("cuda", big), _fake("cuda", 3)]) is True  # CUDA: foreach whatever the sizes
    assert default_foreach([_fake("cuda", big), torch.zeros(big)]) is False  # CUDA and CPU: the CPU rule
    assert default_foreach([torch.zeros(3, device="meta")]) is False  # no foreach kernels: the loop
    assert default_foreach([]) is False


@pytest.mark.parametrize("numel,expected", [(FOREACH_CPU_MAX_MEAN_NUMEL * 2, "loop"), (64, "foreach")])
def test_adam_takes_the_chosen_path(monkeypatch: pytest.MonkeyPatch, numel: int, expected: str) -> None:
    taken: list[str] = []
    for name, label in (("_adam_single_tensor", "loop"), ("_adam_multi_tensor", "foreach")):
        real = getattr(adam_module, name)
        monkeypatch.setattr(adam_module, name,
                            lambda *args, _real=real, _label=label, **kwargs: (taken.append(_label), _real(*args, **kwargs)))
    params = [torch.zeros(numel, requires_grad=True) for _ in range(3)]
    for p in params:
        p.grad = torch.ones(numel)
    Adam(params, lr=0.1).step()
    Adam(params, lr=0.1, foreach=True).step()
    Adam(params, lr=0.1, foreach=False).step()
    assert taken == [expected, "foreach", "loop"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_default_is_foreach() -> None:
    assert default_foreach([torch.zeros(FOREACH_CPU_MAX_MEAN_NUMEL * 4, device="cuda")]) is True
