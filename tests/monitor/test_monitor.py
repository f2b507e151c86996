"""OptimizerMonitor: recorded values equal hand computations for SGD and Adam (torch's and optimlab's)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from optimlab.guard import NonFiniteGuard
from optimlab.monitor import MemorySink, OptimizerMonitor
from optimlab.optim.registry import create_optimizer, list_optimizers, needs_closure


def tiny_model(dtype: torch.dtype) -> nn.Module:
    return nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)).to(dtype)


def flat(tensors: list[torch.Tensor]) -> np.ndarray:
    return torch.cat([t.detach().reshape(-1) for t in tensors]).double().numpy()


def train_and_check(name: str, dtype: torch.dtype, rtol: float, **optimizer_kwargs: float) -> list[str]:
    """Train a few steps with two param groups, recompute every recorded metric by hand with NumPy, and
    return the recorded keys."""
    model = tiny_model(dtype)
    first, second = list(model[0].parameters()), list(model[2].parameters())
    optimizer = create_optimizer([{"params": first}, {"params": second, "lr": 0.03}], name, lr=0.01,
                                 **optimizer_kwargs)
    sink = MemorySink()
    monitor = OptimizerMonitor(optimizer, every=1, sinks=[sink], per_parameter=True,
                               param_names=model.named_parameters())
    groups = [first, second]
    for step in range(1, 5):
        optimizer.zero_grad()
        generator = torch.Generator().manual_seed(step)
        inputs = torch.randn(8, 3, generator=generator).to(dtype)
        nn.functional.mse_loss(model(inputs), torch.ones(8, 2, dtype=dtype)).backward()
        before = [[p.detach().clone() for p in group] for group in groups]
        grads = [[p.grad.clone() for p in group] for group in groups]
        optimizer.step()
        record = monitor.summary()
        assert record["step"] == step and sink.history[-1]["step"] == step
        expected: dict[str, float] = {}
        for g, group in enumerate(groups):
            after = flat(list(group))
            update = flat(before[g]) - after
            expected[f"grad_norm/group{g}"] = np.linalg.norm(flat(grads[g]))
            expected[f"param_norm/group{g}"] = np.linalg.norm(after)
            expected[f"update_norm/group{g}"] = np.linalg.norm(update)
            expected[f"update_ratio/group{g}"] = np.linalg.norm(update) / np.linalg.norm(after)
            expected[f"lr/group{g}"] = optimizer.param_groups[g]["lr"]
            states = [optimizer.state[p] for p in group]
            for key in states[0]:
                if states[0][key].dim() > 0:
                    expected[f"{key}_norm/group{g}"] = np.linalg.norm(flat([s[key] for s in states]))
            if "exp_avg_sq" in states[0]:
                beta2 = optimizer.param_groups[g]["betas"][1]
                lr, eps = optimizer.param_groups[g]["lr"], optimizer.param_groups[g]["eps"]
                moment = "max_exp_avg_sq" if optimizer.param_groups[g].get("amsgrad") else "exp_avg_sq"
                v_hat = flat([s[moment] for s in states]) / (1.0 - beta2 ** step)
                effective = lr / (np.sqrt(v_hat) + eps)
                expected[f"eff_lr_mean/group{g}"] = effective.mean()
                expected[f"eff_lr_min/group{g}"] = effective.min()
                expected[f"eff_lr_max/group{g}"] = effective.max()
        for name_, param in model.named_parameters():
            g = 0 if name_.startswith("0.") else 1
            index = [id(p) for p in groups[g]].index(id(param))
            expected[f"grad_norm/{name_}"] = np.linalg.norm(flat([grads[g][index]]))
            expected[f"param_norm/{name_}"] = np.linalg.norm(flat([param]))
            update = flat([before[g][index]]) - flat([param])
            expected[f"update_norm/{name_}"] = np.linalg.norm(update)
            expected[f"update_ratio/{name_}"] = np.linalg.norm(update) / np.linalg.norm(flat([param]))
        expected["grad_norm/total"] = math.hypot(expected["grad_norm/group0"], expected["grad_norm/group1"])
        expected["update_norm/total"] = math.hypot(expected["update_norm/group0"], expected["update_norm/group1"])
        expected["state_bytes"] = sum(v.numel() * v.element_size() for s in optimizer.state.values()
                                      for v in s.values() if v.dim() > 0)
        assert set(record) - {"step"} == set(expected)
        for key, value in expected.items():
            assert record[key] == pytest.approx(float(value), rel=rtol, abs=1e-300), key
    monitor.remove()
    return list(record)


@pytest.mark.parametrize("name", ["torch.adam", "adam", "adamw", "amsgrad"])
@pytest.mark.parametrize(("dtype", "rtol"), [(torch.float64, 1e-10), (torch.float32, 2e-5)])
def test_adam_family_values_match_hand_computation(name: str, dtype: torch.dtype, rtol: float) -> None:
    keys = train_and_check(name, dtype, rtol)
    assert {"exp_avg_norm/group1", "exp_avg_sq_norm/group0", "eff_lr_mean/group1", "eff_lr_max/group0"} <= set(keys)


@pytest.mark.parametrize("name", ["torch.sgd-momentum", "sgd-momentum", "sgd", "rmsprop"])
def test_sgd_values_match_hand_computation(name: str) -> None:
    keys = train_and_check(name, torch.float64, 1e-10)
    assert not any(key.startswith("eff_lr") for key in keys)
    if "momentum" in name:
        assert "momentum_buffer_norm/group0" in keys


def test_every_records_on_multiples_and_hooks_are_removed() -> None:
    model = tiny_model(torch.float32)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sink = MemorySink()
    monitor = OptimizerMonitor(optimizer, every=3, sinks=[sink])
    assert monitor.summary() == {}
    assert len(optimizer._optimizer_step_pre_hooks) == 1 and len(optimizer._optimizer_step_post_hooks) == 1
    for _ in range(7):
        optimizer.zero_grad()
        model(torch.randn(4, 3)).sum().backward()
        optimizer.step()
    assert [row["step"] for row in sink.history] == [3, 6]
    assert monitor.summary()["step"] == 6
    monitor.remove()
    assert len(optimizer._optimizer_step_pre_hooks) == 0 and len(optimizer._optimizer_step_post_hooks) == 0
    for _ in range(3):
        optimizer.step()
    assert len(sink.history) == 2
    monitor.remove()  # idempotent


def test_guard_skipped_steps_are_not_recorded_and_state_dict_resumes() -> None:
    model = tiny_model(torch.float32)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
    sink = MemorySink()
    monitor = OptimizerMonitor(optimizer, every=1, sinks=[sink])
    guard = NonFiniteGuard(optimizer, log=False)
    for step in range(4):
        guard.zero_grad()
        model(torch.randn(4, 3)).sum().backward()
        if step == 1:
            model[0].weight.grad[0, 0] = math.nan
        guard.step()
    assert [row["step"] for row in sink.history] == [1, 2, 3]
    assert all(math.isfinite(value) for row in sink.history for value in row.values())
    resumed = OptimizerMonitor(torch.optim.Adam(model.parameters()), every=2)
    resumed.load_state_dict(monitor.state_dict())
    assert resumed.step == 3


def test_validation() -> None:
    optimizer = torch.optim.SGD(tiny_model(torch.float32).parameters(), lr=0.1)
    with pytest.raises(ValueError, match="every"):
        OptimizerMonitor(optimizer, every=0)
    with pytest.raises(TypeError, match="write"):
        OptimizerMonitor(optimizer, sinks=[object()])
    with pytest.raises(TypeError, match="torch.optim.Optimizer"):
        OptimizerMonitor(tiny_model(torch.float32))  # type: ignore[arg-type]


@pytest.mark.parametrize("name", list_optimizers())
def test_every_registered_optimizer_is_monitored(name: str) -> None:
    """Data-driven over the registry (torch's and optimlab's): finite records with the group norms, and the
    state norms of whatever floating state the optimizer keeps."""
    model = tiny_model(torch.float32)
    optimizer = create_optimizer(model.parameters(), name)
    monitor = OptimizerMonitor(optimizer, every=1)
    for _ in range(3):
        inputs = torch.randn(5, 3)

        def closure() -> torch.Tensor:
            optimizer.zero_grad()
            loss = model(inputs).pow(2).mean()
            loss.backward()
            return loss

        closure()
        optimizer.step(closure if needs_closure(name) else None)  # SAM evaluates it again (its second gradient)
    record = monitor.summary()
    assert record["step"] == 3
    assert all(math.isfinite(value) for value in record.values()), record
    assert record["update_norm/group0"] > 0 and record["state_bytes"] >= 0
    # state larger than its parameter is no per-parameter moment and is left out (LBFGS's flat d and
    # prev_flat_grad over all parameters, kept under the first)
    expected = {f"{key}_norm/group{g}" for g, group in enumerate(optimizer.param_groups) for p in group["params"]
                for key, value in optimizer.state[p].items()
                if torch.is_tensor(value) and value.is_floating_point() and 0 < value.dim() and value.numel() <= p.numel()}
    assert expected <= set(record)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_effective_lr_of_large_moments_taken_in_slices(monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype) -> None:
    """Moments larger than a slice are mapped slice by slice (here slices of 1,000 values): the mean, min and max
    equal a NumPy computation over all coordinates, with the extremes placed in the last slices."""
    import optimlab.optim._base as base_module
    from optimlab.monitor.metrics import effective_lr_summary

    monkeypatch.setattr(base_module, "LOOP_CHUNK_NUMEL", 1000)
    generator = torch.Generator().manual_seed(0)
    moments = [torch.rand(2500, generator=generator, dtype=dtype), torch.rand(3, 7, generator=generator, dtype=dtype),
               torch.rand(1001, generator=generator, dtype=dtype)]
    moments[0][2400], moments[2][1000] = 50.0, 1e-12  # the smallest and largest effective lr, in last slices
    steps = [3.0, 5.0, 2.0]
    group = {"lr": 0.01, "eps": 1e-8, "betas": (0.9, 0.999)}
    params = [torch.zeros_like(m) for m in moments]
    states = [{"step": torch.tensor(t), "exp_avg_sq": m} for t, m in zip(steps, moments)]
    mean, smallest, largest = effective_lr_summary(group, params, states)
    effective = np.concatenate([group["lr"] / (np.sqrt(m.double().numpy().ravel() / (1 - 0.999 ** t)) + 1e-8)
                                for m, t in zip(moments, steps)])
    rtol = 1e-6 if dtype == torch.float32 else 1e-12
    assert float(mean) == pytest.approx(effective.mean(), rel=rtol)
    assert float(smallest) == pytest.approx(effective.min(), rel=rtol)
    assert float(largest) == pytest.approx(effective.max(), rel=rtol)
