"""optimlab.guard: skipped steps leave parameters and state bit-for-bit unchanged; explosion detection."""

from __future__ import annotations

import copy
import logging
import math

import numpy as np
import pytest
import torch
from torch import nn

from optimlab.guard import ExplosionDetector, NonFiniteGradientError, NonFiniteGuard, nonfinite_grads, replay_first
from optimlab.optim.registry import create_optimizer

OPTIMIZERS = ["torch.adam", "torch.sgd-momentum", "adam", "adamw", "sgd-momentum", "rmsprop"]


def tiny_model() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.LayerNorm(8), nn.Linear(8, 2))


def loss_of(model: nn.Module, step: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(step)
    inputs, targets = torch.randn(16, 4, generator=generator), torch.randn(16, 2, generator=generator)
    return nn.functional.mse_loss(model(inputs), targets)


def backward(model: nn.Module, step: int) -> torch.Tensor:
    loss = loss_of(model, step)
    loss.backward()
    return loss


def snapshot(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """Every parameter and every state tensor (moments, step counters), cloned."""
    tensors = [p.detach().clone() for p in model.parameters()]
    for state in optimizer.state.values():
        tensors.extend(value.clone() for _, value in sorted(state.items()) if torch.is_tensor(value))
    return tensors


def assert_bitwise_equal(first: list[torch.Tensor], second: list[torch.Tensor]) -> None:
    assert len(first) == len(second)
    for a, b in zip(first, second):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert torch.equal(a.view(torch.uint8) if a.dim() else a.reshape(1).view(torch.uint8),
                           b.view(torch.uint8) if b.dim() else b.reshape(1).view(torch.uint8))


@pytest.mark.parametrize("name", OPTIMIZERS)
@pytest.mark.parametrize("bad_value", [math.nan, math.inf])
def test_nonfinite_step_is_skipped_bitwise_and_training_goes_on(name: str, bad_value: float) -> None:
    model = tiny_model()
    reference_model = copy.deepcopy(model)
    optimizer = create_optimizer(model.parameters(), name, lr=0.01)
    reference_optimizer = create_optimizer(reference_model.parameters(), name, lr=0.01)
    guard = NonFiniteGuard(optimizer, max_consecutive_skips=2, log=False)
    bad_step = 3
    for step in range(8):
        optimizer.zero_grad()
        backward(model, step)
        if step == bad_step:
            before = snapshot(model, optimizer)
            list(model.parameters())[2].grad[1] = bad_value  # the LayerNorm weight
            guard.step()
            assert guard.last_step_skipped
            assert_bitwise_equal(snapshot(model, optimizer), before)
            continue
        guard.step()
        assert not guard.last_step_skipped
        # the reference never sees the bad batch: the guarded run must equal it exactly
        reference_optimizer.zero_grad()
        backward(reference_model, step)
        reference_optimizer.step()
        assert_bitwise_equal(snapshot(model, optimizer), snapshot(reference_model, reference_optimizer))
    assert guard.skipped_steps == 1 and guard.steps == 8 and guard.consecutive_skips == 0


def test_max_consecutive_skips_raises_and_counts_reset() -> None:
    model = tiny_model()
    guard = NonFiniteGuard(torch.optim.SGD(model.parameters(), lr=0.1), max_consecutive_skips=2, log=False)
    poison = [True, True, False, True, True, True]
    with pytest.raises(NonFiniteGradientError, match="3 optimizer steps in a row.*max_consecutive_skips=2"):
        for step, bad in enumerate(poison):
            guard.zero_grad()
            backward(model, step)
            if bad:
                next(model.parameters()).grad.fill_(math.nan)
            guard.step()
    assert guard.skipped_steps == 5 and guard.consecutive_skips == 3


def test_state_dict_round_trip_and_logging(caplog: pytest.LogCaptureFixture) -> None:
    model = tiny_model()
    guard = NonFiniteGuard(torch.optim.SGD(model.parameters(), lr=0.1))
    backward(model, 0)
    list(model.parameters())[3].grad[0] = -math.inf
    with caplog.at_level(logging.WARNING, logger="optimlab.guard"):
        guard.step()
    assert "group 0 param 3" in caplog.text and "skipped" in caplog.text
    other = NonFiniteGuard(torch.optim.SGD(model.parameters(), lr=0.1), max_consecutive_skips=None)
    other.load_state_dict(guard.state_dict())
    assert other.state_dict() == {"steps": 1, "skipped_steps": 1, "consecutive_skips": 1, "last_step_skipped": True}


def test_closure_is_evaluated_once_for_the_check_and_replayed() -> None:
    model = tiny_model()
    calls = []

    def closure() -> torch.Tensor:
        calls.append(1)
        model.zero_grad()
        return backward(model, 0)

    guard = NonFiniteGuard(torch.optim.SGD(model.parameters(), lr=0.1))
    loss = guard.step(closure)
    assert len(calls) == 1 and torch.is_tensor(loss) and not guard.last_step_skipped
    calls.clear()
    NonFiniteGuard(torch.optim.LBFGS(model.parameters(), max_iter=3)).step(closure)
    assert len(calls) >= 2  # L-BFGS re-evaluated the closure after the replayed first call


def test_replay_first_hands_back_the_first_loss_then_evaluates() -> None:
    evaluations = []
    replay = replay_first(lambda: evaluations.append(1) or len(evaluations) * 10.0, first_loss=1.5)
    assert replay() == 1.5 and evaluations == []  # the first call evaluates nothing
    assert [replay(), replay()] == [10.0, 20.0] and len(evaluations) == 2
    other = replay_first(lambda: 0.0, first_loss=2.5)  # each replay counts its own calls
    assert other() == 2.5


def test_with_grad_scaler_reports_the_skip_and_leaves_state_alone() -> None:
    model = tiny_model()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    guard = NonFiniteGuard(optimizer, scaler=scaler, log=False)
    for step in range(3):
        optimizer.zero_grad()
        scaler.scale(loss_of(model, step)).backward()
        if step == 1:
            next(model.parameters()).grad[0, 0] = math.inf
            before = snapshot(model, optimizer)
        guard.step()
        scale_before = scaler.get_scale()
        scaler.update()
        if step == 1:
            assert guard.last_step_skipped and scaler.get_scale() < scale_before
            assert_bitwise_equal(snapshot(model, optimizer), before)
        else:
            assert not guard.last_step_skipped
    assert guard.skipped_steps == 1
    with pytest.raises(ValueError, match="closure"):
        guard.step(lambda: 0.0)


def test_nonfinite_grads_locates_parameters_and_validation() -> None:
    model = tiny_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    assert nonfinite_grads(optimizer) == []
    backward(model, 0)
    assert nonfinite_grads(optimizer) == []
    list(model.parameters())[5].grad[0] = math.nan
    assert nonfinite_grads(optimizer) == [(0, 5)]
    with pytest.raises(ValueError, match="max_consecutive_skips"):
        NonFiniteGuard(optimizer, max_consecutive_skips=-1)
    with pytest.raises(TypeError, match="torch.optim.Optimizer"):
        NonFiniteGuard(model)  # type: ignore[arg-type]


def test_remove_detaches_the_hook() -> None:
    optimizer = torch.optim.SGD(tiny_model().parameters(), lr=0.1)
    guard = NonFiniteGuard(optimizer)
    assert len(optimizer._optimizer_step_post_hooks) == 1
    guard.remove()
    assert len(optimizer._optimizer_step_post_hooks) == 0


def test_explosion_detector_k_sigma_matches_numpy_and_threshold() -> None:
    rng = np.random.default_rng(0)
    norms = list(rng.normal(10.0, 1.0, size=40))
    norms[25] = 100.0  # a spike
    detector = ExplosionDetector(k_sigma=4.0, window=20, min_history=5, log=False)
    kept: list[float] = []
    for step, norm in enumerate(norms, start=1):
        event = detector.update(norm)
        window = kept[-20:]
        expected_flag = len(window) >= 5 and norm > np.mean(window) + 4.0 * np.std(window)
        assert (event is not None) == expected_flag
        if event is None:
            kept.append(norm)
        else:
            assert event.step == step and event.reason == "sigma"
            assert event.mean == pytest.approx(np.mean(window)) and event.std == pytest.approx(np.std(window))
            assert event.z_score == pytest.approx((norm - np.mean(window)) / np.std(window))
    assert [e.step for e in detector.events] == [26]
    fixed = ExplosionDetector(threshold=5.0, k_sigma=None, log=False)
    assert fixed.update(4.0) is None
    assert fixed.update(torch.tensor(6.0)).reason == "threshold"
    assert fixed.update(math.nan).reason == "non-finite"
    restored = ExplosionDetector(threshold=1.0, log=False)
    restored.load_state_dict(detector.state_dict())
    assert restored.state_dict() == detector.state_dict()


def test_explosion_detector_validation() -> None:
    with pytest.raises(ValueError, match="threshold"):
        ExplosionDetector(threshold=None, k_sigma=None)
    with pytest.raises(ValueError, match="k_sigma"):
        ExplosionDetector(k_sigma=-1.0)
    with pytest.raises(ValueError, match="min_history"):
        ExplosionDetector(window=5, min_history=6)


def test_explosion_detector_check_parameters_uses_the_total_grad_norm() -> None:
    model = tiny_model()
    backward(model, 0)
    expected = float(torch.cat([p.grad.flatten() for p in model.parameters()]).norm())
    detector = ExplosionDetector(threshold=expected * 0.999, k_sigma=None, log=False)
    event = detector.check_parameters(model.parameters())
    assert event is not None and event.norm == pytest.approx(expected, rel=1e-6)
    assert ExplosionDetector(threshold=expected * 1.001, k_sigma=None).check_parameters(model.parameters()) is None


def test_disabled_grad_scaler_falls_back_to_the_guards_own_check() -> None:
    model = tiny_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    guard = NonFiniteGuard(optimizer, scaler=torch.amp.GradScaler("cpu", enabled=False), log=False)
    backward(model, 0)
    next(model.parameters()).grad[0, 0] = math.nan
    before = snapshot(model, optimizer)
    guard.step()
    assert guard.last_step_skipped and guard.skipped_steps == 1
    assert_bitwise_equal(snapshot(model, optimizer), before)


# ---------------------------------------------------------------- check_update: finite gradients, overflowing update

OVERFLOWS = {  # (optimizer factory, dtype, gradient): finite gradients whose update overflows
    "adafactor, grad 1e20": (lambda ps: create_optimizer(ps, "adafactor", lr=1e-2), torch.float32, 1e20),
    "sgd lr 10, grad 1e38": (lambda ps: torch.optim.SGD(ps, lr=10.0), torch.float32, 1e38),
    "adam fp16, grad 6e4": (lambda ps: torch.optim.Adam(ps, lr=1e-3, foreach=False), torch.float16, 6e4),
}


def _overflow_setup(case: str, check_update: bool):
    factory, dtype, big = OVERFLOWS[case]
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(4, 6).to(dtype)), torch.nn.Parameter(torch.randn(6).to(dtype))]
    optimizer = factory(params)
    return params, optimizer, NonFiniteGuard(optimizer, check_update=check_update, log=False), big


def _state_tensors(params, optimizer) -> list[torch.Tensor]:
    tensors = [p.detach().clone() for p in params]
    for p in params:
        tensors.extend(v.clone() for _, v in sorted(optimizer.state.get(p, {}).items()) if torch.is_tensor(v))
    return tensors


def _set_grads(params, value: float) -> None:
    for index, p in enumerate(params):
        p.grad = torch.full_like(p, value) * ((1 + index) / 2)  # fp16: 6e4 stays finite


@pytest.mark.parametrize("case", list(OVERFLOWS))
def test_check_update_rolls_an_overflowing_step_back_bitwise(case: str) -> None:
    params, optimizer, guard, big = _overflow_setup(case, check_update=True)
    ref_params, ref_optimizer, ref_guard, _ = _overflow_setup(case, check_update=True)
    for step in range(3):  # good, overflowing (rolled back), good: the run of a reference without the middle step
        before = _state_tensors(params, optimizer)
        _set_grads(params, big if step == 1 else 0.5)
        guard.step()
        if step == 1:
            assert guard.last_step_skipped and guard.skipped_steps == 1
            after = _state_tensors(params, optimizer)
            assert len(after) == len(before) and all(torch.equal(a, b) for a, b in zip(after, before))
            continue
        assert not guard.last_step_skipped
        _set_grads(ref_params, 0.5)
        ref_guard.step()
        assert all(torch.equal(a, b) for a, b in zip(_state_tensors(params, optimizer),
                                                    _state_tensors(ref_params, ref_optimizer)))
        assert all(torch.isfinite(t).all() for t in _state_tensors(params, optimizer))


@pytest.mark.parametrize("case", list(OVERFLOWS))
def test_without_check_update_the_overflow_gets_through(case: str) -> None:
    """The break check_update fixes: the gradient check alone lets these updates write inf/NaN."""
    params, optimizer, guard, big = _overflow_setup(case, check_update=False)
    _set_grads(params, big)
    guard.step()
    assert not guard.last_step_skipped
    assert not all(torch.isfinite(t).all() for t in _state_tensors(params, optimizer))


def test_check_update_on_the_first_step_leaves_no_state() -> None:
    params, optimizer, guard, big = _overflow_setup("adam fp16, grad 6e4", check_update=True)
    before = _state_tensors(params, optimizer)
    _set_grads(params, big)
    guard.step()
    assert guard.last_step_skipped and not any(optimizer.state.values())
    assert all(torch.equal(a, b) for a, b in zip(_state_tensors(params, optimizer), before))


def test_explosion_detector_history_excludes_flagged_norms() -> None:
    """A sustained explosion (norm 50 for 30 steps after 20 steps near 1) is flagged at every step: the flagged
    norms never enter the history, which keeps the 20 normal norms (in order), so the explosion does not become
    the new normal."""
    rng = np.random.default_rng(1)
    normal = list(rng.normal(1.0, 0.05, size=20))
    detector = ExplosionDetector(k_sigma=6.0, window=50, min_history=10, log=False)
    flags = [detector.update(norm) is not None for norm in normal + [50.0] * 30 + [float("nan")]]
    assert flags == [False] * 20 + [True] * 31
    assert list(detector.history) == normal
    assert {e.reason for e in detector.events} == {"sigma", "non-finite"}
