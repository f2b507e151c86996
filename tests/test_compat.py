"""``optimlab._compat``: every probe passes silently on this torch, and where a private API is missing or
behaves otherwise, the fallback gives the same results with exactly one ``RuntimeWarning``."""

from __future__ import annotations

import warnings
from collections.abc import Iterator

import pytest
import torch

from optimlab import _compat
from optimlab.optim import Adam
from optimlab.schedules import CosineAnnealingLR

@pytest.fixture(autouse=True)
def fresh_probes() -> Iterator[None]:
    """Each test probes anew (and sees its own warning); later tests probe the real torch again."""
    _compat.reset_probes()
    yield
    _compat.reset_probes()


def _tensors() -> list[torch.Tensor]:
    return [torch.zeros(2), torch.zeros(3, dtype=torch.float64), torch.ones(4), torch.ones(1, dtype=torch.float64)]


def test_every_probe_passes_without_warning_on_this_torch() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _compat._grouping() is _compat._torch_grouping
        assert _compat.privateuse1_backend_name() == torch._C._get_privateuse1_backend_name()
        assert _compat.scheduler_calls_initial_step() is True


def test_grouping_falls_back_to_python_with_one_warning(monkeypatch: pytest.MonkeyPatch) -> None:
    tensors = _tensors()
    expected = torch.optim.Optimizer._group_tensors_by_device_and_dtype([tensors, [], tensors], with_indices=True)
    monkeypatch.delattr(torch.optim.Optimizer, "_group_tensors_by_device_and_dtype")
    with pytest.warns(RuntimeWarning, match=r"_group_tensors_by_device_and_dtype.*grouping tensors in Python") as record:
        first = _compat.group_tensors_by_device_and_dtype([tensors, [], tensors])
        _compat.group_tensors_by_device_and_dtype([tensors, [], tensors])
    assert len(record) == 1
    assert set(first) == set(expected)
    for key, (lists, indices) in expected.items():
        assert list(first[key][1]) == list(indices)
        assert [[id(t) for t in group] for group in first[key][0]] == [[id(t) for t in group] for group in lists]


def test_adam_foreach_path_runs_on_the_fallback_grouping(monkeypatch: pytest.MonkeyPatch) -> None:
    def run() -> list[torch.Tensor]:
        params = [torch.nn.Parameter(t.clone() + 1) for t in _tensors()]
        optimizer = Adam(params, lr=0.1, foreach=True)
        for _ in range(3):
            for param in params:
                param.grad = torch.full_like(param, 0.5)
            optimizer.step()
        return [param.detach() for param in params]

    expected = run()
    _compat._grouping.cache_clear()  # probe again, now without torch's helper
    monkeypatch.delattr(torch.optim.Optimizer, "_group_tensors_by_device_and_dtype")
    with pytest.warns(RuntimeWarning, match="grouping tensors in Python"):
        assert all(torch.equal(a, b) for a, b in zip(run(), expected))


def test_privateuse1_name_falls_back_with_one_warning(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delattr(torch._C, "_get_privateuse1_backend_name")
    with pytest.warns(RuntimeWarning, match=r"_get_privateuse1_backend_name.*'privateuseone'") as record:
        assert _compat.privateuse1_backend_name() == "privateuseone"
        assert _compat.privateuse1_backend_name() == "privateuseone"
    assert len(record) == 1


def test_scheduler_protocol_fallback_runs_the_initial_step_itself(monkeypatch: pytest.MonkeyPatch) -> None:
    """A torch whose ``LRScheduler.__init__`` does not call ``_initial_step``: the probe fails with one warning,
    optimlab's schedule runs its initial step itself (lr at step 0, one step counted), and the step-order
    warning, which relies on the same protocol, is skipped."""
    original = torch.optim.lr_scheduler.LRScheduler.__init__

    def init_without_initial_step(self, optimizer, last_epoch=-1):
        self._initial_step = lambda: None  # torch's constructor calls this no-op instead
        original(self, optimizer, last_epoch)
        del self._initial_step

    monkeypatch.setattr(torch.optim.lr_scheduler.LRScheduler, "__init__", init_without_initial_step)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=1.0)
    with pytest.warns(RuntimeWarning, match=r"LRScheduler's private protocol.*run their initial step") as record:
        scheduler = CosineAnnealingLR(optimizer, T_max=10)
        CosineAnnealingLR(torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=1.0), T_max=10)
    assert len(record) == 1
    assert scheduler._step_count == 1 and scheduler.last_epoch == 0 and optimizer.param_groups[0]["lr"] == 1.0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        scheduler.step()  # before optimizer.step(): torch would warn, the fallback cannot tell
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.5 * (1 + torch.cos(torch.tensor(torch.pi / 10)).item()))


def test_step_order_warning_uses_the_protocol_on_this_torch() -> None:
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=1.0)
    scheduler = CosineAnnealingLR(optimizer, T_max=10)
    assert _compat.optimizer_step_called(optimizer) is False
    with pytest.warns(UserWarning, match=r"lr_scheduler.step\(\)` before `optimizer.step\(\)"):
        scheduler.step()
    optimizer.step()
    assert _compat.optimizer_step_called(optimizer) is True
