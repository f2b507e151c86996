"""The fused (torch.compile) step of ScheduleFreeAdamW, and Lookahead around fused / moded optimizers.

ScheduleFreeAdamW: parity with the per-tensor reference (``foreach=False``) for params and every state
tensor (``z``, ``exp_avg_sq``) and the group counters, in train mode and in eval mode (switched mid-run);
no recompiles while a scheduler, the warmup and the averaging weight change every step's scalars;
checkpoints saved in eval mode resume bitwise on the fused path and move to the reference path.
Lookahead: a fused inner optimizer keeps its fused step, the slow weights move by one foreach lerp,
and ``train()``/``eval()``/``eval_weights`` reach a schedule-free inner optimizer.

Compiling costs seconds per graph, so there are two constant configurations: weight decay on (float64,
with a parameter that skips steps and one large enough for the chunked call besides the packed one; and
float32 with a float64 tensor in the same group) and maximize on (float64, two groups sharing the graph
with different learning rates); every other test reuses their graphs.
"""

from __future__ import annotations

import inspect
import warnings
from typing import Any

import pytest
import torch

from optimlab.optim import SGD, Adam, Lookahead, ScheduleFreeAdamW
from optimlab.optim import _fused
from optimlab.optim import schedule_free as schedule_free_module
from optimlab.optim.modes import eval_weights, has_modes

from .fused_harness import (STEPS, FusedCase, assert_matches_reference, build, fused_check, max_relative_error,
                            needs_compiler, param_groups, run_pair, set_grads, state_tensors)
from .harness import save_and_load


def with_large_tensor(dtype: torch.dtype, generator: torch.Generator) -> list[dict[str, Any]]:
    """The harness's two groups plus, in the first, a tensor above ``_fused.PACK_NUMEL`` values: the small
    tensors are packed into one call, the large one goes through the chunked call (both compiled)."""
    groups = param_groups(dtype, generator)
    groups[0]["params"].append(torch.randn(_fused.PACK_NUMEL + 77, generator=generator, dtype=dtype))
    return groups


def with_float64_tensor(dtype: torch.dtype, generator: torch.Generator) -> list[dict[str, Any]]:
    """The harness's two groups plus a float64 tensor in the second (mixed dtypes: one call per dtype)."""
    groups = param_groups(dtype, generator)
    groups[1]["params"].append(torch.randn(5, 3, generator=generator, dtype=torch.float64))
    return groups


# warmup (3 steps) and r > 0 make the learning rate and the averaging weight c_t change on the early steps
DECAY = fused_check(ScheduleFreeAdamW)
SF_DECAY_F64 = FusedCase("sf-decay-skip-f64", ScheduleFreeAdamW, DECAY, skip_grads=True, groups=with_large_tensor)
SF_DECAY_F32 = FusedCase("sf-decay-mixed-f32", ScheduleFreeAdamW, DECAY, torch.float32, 1e-6,
                         groups=with_float64_tensor)
SF_MAXIMIZE_F64 = FusedCase("sf-maximize-f64", ScheduleFreeAdamW,
                            {"lr": 1e-2, "maximize": True, "weight_lr_power": 0.0, "eps": 1e-6})
COUNTERS = ("step", "weight_sum", "lr_max", "scheduled_lr", "train_mode")


def compiles() -> int:
    """Graphs compiled so far for the schedule-free rule (every configuration together)."""
    return int(_fused.compile_stats().get("schedule_free_adamw_tensor", {}).get("compiles", 0))


def assert_same_trajectory(fused: torch.optim.Optimizer, fused_params: list[torch.Tensor],
                           reference: torch.optim.Optimizer, reference_params: list[torch.Tensor], rtol: float) -> None:
    assert_matches_reference(fused, fused_params, reference, reference_params, rtol)
    assert len(state_tensors(fused, fused_params)) == 2 * len(fused_params)  # z and exp_avg_sq for each
    for fused_group, reference_group in zip(fused.param_groups, reference.param_groups):
        assert [fused_group[key] for key in COUNTERS] == pytest.approx([reference_group[key] for key in COUNTERS],
                                                                      rel=1e-15)


def spy_fused_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Count the calls of the fused step function (``ScheduleFreeAdamW`` looks it up at each step)."""
    calls: list[int] = []
    original = schedule_free_module.schedule_free_adamw_step_fused

    def counting(*args, **kwargs) -> None:
        calls.append(len(args[0]))
        original(*args, **kwargs)

    monkeypatch.setattr(schedule_free_module, "schedule_free_adamw_step_fused", counting)
    return calls


@needs_compiler
@pytest.mark.parametrize("case", [SF_DECAY_F64, SF_DECAY_F32, SF_MAXIMIZE_F64], ids=lambda case: case.id)
def test_fused_matches_per_tensor_reference(case: FusedCase, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = spy_fused_calls(monkeypatch)
    fused, fused_params, reference, reference_params = run_pair(case)
    assert len(calls) == 2 * STEPS  # both groups took the fused path on every step
    assert_same_trajectory(fused, fused_params, reference, reference_params, case.rtol)
    initial, initial_params = build(case, fused=False)
    assert max_relative_error(fused_params, initial_params) > 1e-3  # the parameters really moved
    assert compiles() > 0


@needs_compiler
def test_train_eval_switching_mid_run() -> None:
    """eval() at steps 7 and 14 (then train()): both paths hold the same averaged x, which is
    (y - (1 - beta1) z) / beta1 of the fused path's own y and z; training continues identically."""
    case = SF_DECAY_F64
    fused, fused_params, reference, reference_params = build(case, True) + build(case, False)
    beta1 = DECAY["betas"][0]
    for step in range(STEPS + 1):
        if step in (7, 14, STEPS):
            y = [p.detach().clone() for p in fused_params]
            z = [fused.state[p]["z"].clone() for p in fused_params]
            fused.eval()
            reference.eval()
            assert not any(group["train_mode"] for group in fused.param_groups)
            assert max_relative_error(fused_params, reference_params) <= case.rtol
            expected_x = [(y_value - (1 - beta1) * z_value) / beta1 for y_value, z_value in zip(y, z)]
            assert max_relative_error(fused_params, expected_x) <= 1e-12
            assert max_relative_error(fused_params, y) > 1e-4  # x and y are told apart
            if step == STEPS:
                break
            fused.train()
            reference.train()
            assert max_relative_error(fused_params, y) <= 1e-13
        set_grads(fused_params, step, case.skip_grads)
        set_grads(reference_params, step, case.skip_grads)
        fused.step()
        reference.step()
    assert_same_trajectory(fused, fused_params, reference, reference_params, case.rtol)


@needs_compiler
def test_scheduled_lr_warmup_and_averaging_weights_cause_no_recompilation() -> None:
    case = SF_DECAY_F32  # its graph is shared with the parity test
    fused, fused_params, reference, reference_params = build(case, True) + build(case, False)
    schedulers = [torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=50, eta_min=1e-3) for opt in (fused, reference)]
    compiles_after_first_step = None
    seen = set()
    for step in range(50):
        set_grads(fused_params, step, False)
        set_grads(reference_params, step, False)
        fused.step()
        reference.step()
        if compiles_after_first_step is None:
            compiles_after_first_step = compiles()
        seen.add((fused.param_groups[0]["scheduled_lr"], fused.param_groups[0]["weight_sum"]))
        for scheduler in schedulers:
            scheduler.step()
    assert len(seen) == 50  # every step had a new learning rate and averaging weight
    assert compiles_after_first_step >= 1
    assert compiles() == compiles_after_first_step
    assert_same_trajectory(fused, fused_params, reference, reference_params, 1e-6)


@needs_compiler
def test_checkpoint_saved_in_eval_mode_resumes_bitwise_and_moves_to_the_reference_path() -> None:
    """Fused run: 8 steps, eval(), save (params + optimizer). Resumed on the fused path, 12 more steps
    are bitwise those of the uninterrupted run; resumed on the reference path (its fused/foreach settings
    reset, since loading restores the saved group settings), within 1e-12 of the reference run."""
    case = SF_DECAY_F64
    fused, fused_params, reference, reference_params = build(case, True) + build(case, False)
    for step in range(8):
        for params in (fused_params, reference_params):
            set_grads(params, step, case.skip_grads)
        fused.step()
        reference.step()
    fused.eval()
    reference.eval()
    snapshot = {"params": [p.detach().clone() for p in fused_params], "optimizer": fused.state_dict()}
    resumed, resumed_params = build(case, True, seed=1)
    on_reference, on_reference_params = build(case, False, seed=2)
    for optimizer, params in ((resumed, resumed_params), (on_reference, on_reference_params)):
        # one load each: load_state_dict keeps the loaded tensors (no copy), which two optimizers must not share
        checkpoint = save_and_load(snapshot)
        assert checkpoint["optimizer"]["param_groups"][0]["fused"] is True
        with torch.no_grad():
            for param, value in zip(params, checkpoint["params"]):
                param.copy_(value)
        optimizer.load_state_dict(checkpoint["optimizer"])
        assert not optimizer.param_groups[0]["train_mode"]
    for group in on_reference.param_groups:
        group["fused"], group["foreach"] = None, False
    runs = ((fused, fused_params), (resumed, resumed_params), (reference, reference_params),
            (on_reference, on_reference_params))
    for optimizer, _ in runs:
        optimizer.train()
    for step in range(8, STEPS):
        for optimizer, params in runs:
            set_grads(params, step, case.skip_grads)
            optimizer.step()
    for optimizer, _ in runs:
        optimizer.eval()
    for ours, expected in zip(resumed_params, fused_params):
        assert torch.equal(ours, expected)
    for ours, expected in zip(state_tensors(resumed, resumed_params), state_tensors(fused, fused_params)):
        assert torch.equal(ours, expected)
    assert resumed.param_groups[0]["step"] == fused.param_groups[0]["step"] == STEPS
    assert_same_trajectory(on_reference, on_reference_params, reference, reference_params, case.rtol)


def test_fused_option_and_fallback_when_disabled(monkeypatch: pytest.MonkeyPatch) -> None:
    """``fused`` is keyword-only, off by default and kept per group; with compilation disabled by the
    environment switch it warns once and takes the foreach path, which matches the reference."""
    param = torch.nn.Parameter(torch.ones(3))
    signature = inspect.signature(ScheduleFreeAdamW).parameters["fused"]
    assert (signature.kind, signature.default) == (inspect.Parameter.KEYWORD_ONLY, None)
    assert ScheduleFreeAdamW([param]).defaults["fused"] is None
    assert ScheduleFreeAdamW([{"params": [param], "fused": True}]).param_groups[0]["fused"] is True
    monkeypatch.setenv(_fused.DISABLE_ENV, "1")
    monkeypatch.setattr(_fused, "_warned", set())
    case = FusedCase("sf-decay-skip-f64", ScheduleFreeAdamW, DECAY, skip_grads=True)
    with pytest.warns(RuntimeWarning, match=rf"ScheduleFreeAdamW\(fused=True\).*{_fused.DISABLE_ENV}=1") as record:
        fused, fused_params, reference, reference_params = run_pair(case, steps=5)
    assert len([w for w in record if issubclass(w.category, RuntimeWarning)]) == 1
    assert_same_trajectory(fused, fused_params, reference, reference_params, 1e-12)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per process
        param.grad = torch.ones(3)
        ScheduleFreeAdamW([param], fused=True).step()


@needs_compiler
def test_lookahead_around_fused_schedule_free(monkeypatch: pytest.MonkeyPatch) -> None:
    """Lookahead(ScheduleFreeAdamW(fused=True)) equals Lookahead around the reference path (params, slow
    weights, inner state) through syncs and eval_weights blocks; the inner step stays fused, each sync
    is one foreach lerp, and eval_weights swaps the averaged weights in and out."""
    case = SF_DECAY_F64
    calls = spy_fused_calls(monkeypatch)
    (inner_fused, fused_params), (inner_reference, reference_params) = build(case, True), build(case, False)
    fused, reference = Lookahead(inner_fused, k=4, alpha=0.5), Lookahead(inner_reference, k=4, alpha=0.5)
    assert fused.param_groups[0]["fused"] is True and fused.defaults is inner_fused.defaults
    assert has_modes(fused) and not has_modes(Lookahead(Adam([torch.nn.Parameter(torch.ones(2))])))
    lerps: list[tuple[int, float]] = []  # (tensors, weight) of each foreach lerp
    original_lerp = torch._foreach_lerp_

    def counting_lerp(*args, **kwargs):
        lerps.append((len(args[0]), args[2]))
        return original_lerp(*args, **kwargs)

    monkeypatch.setattr(torch, "_foreach_lerp_", counting_lerp)
    for step in range(12):
        set_grads(fused_params, step, case.skip_grads)
        set_grads(reference_params, step, case.skip_grads)
        fused.step()
        reference.step()
        if step % 5 == 4:
            y = [p.detach().clone() for p in fused_params]
            with eval_weights(fused), eval_weights(reference):
                assert not inner_fused.param_groups[0]["train_mode"]
                assert max_relative_error(fused_params, reference_params) <= case.rtol
                assert max_relative_error(fused_params, y) > 1e-4
            assert inner_fused.param_groups[0]["train_mode"]
            assert max_relative_error(fused_params, y) <= 1e-13
    # syncs at steps 4, 8, 12 on both: one lerp (weight alpha) over every param; the mode switches of the two
    # eval_weights blocks: one lerp per group there and back (weights 1 - 1/beta1 and 1 - beta1)
    assert [count for count, weight in lerps if weight == 0.5] == [len(fused_params)] * 2 * 3
    assert len([weight for _, weight in lerps if weight != 0.5]) == 2 * 2 * 2 * 2
    assert len(calls) == 2 * 12
    assert max_relative_error(fused_params, reference_params) <= case.rtol
    slow = [fused.state[p]["slow_param"] for p in fused_params]
    assert max_relative_error(slow, [reference.state[p]["slow_param"] for p in reference_params]) <= case.rtol
    assert max_relative_error(slow, fused_params) == 0.0  # just synchronised: fast = slow
    assert max_relative_error(state_tensors(inner_fused, fused_params),
                              state_tensors(inner_reference, reference_params)) <= case.rtol
    fused.eval()
    with pytest.raises(RuntimeError, match=r"train\(\)"):
        fused.step()
    fused.train()
    fused.step()


@needs_compiler
def test_lookahead_checkpoint_in_eval_mode_resumes_bitwise() -> None:
    """Lookahead(ScheduleFreeAdamW(fused=True)) saved in eval mode mid-cycle (6 steps, k = 4) and resumed:
    6 more steps give bitwise the uninterrupted run's params, slow weights and inner state."""
    case = SF_DECAY_F64

    def run(optimizer: Lookahead, params: list[torch.Tensor], steps: range) -> None:
        optimizer.train()
        for step in steps:
            set_grads(params, step, case.skip_grads)
            optimizer.step()
        optimizer.eval()

    inner, params = build(case, True)
    optimizer = Lookahead(inner, k=4, alpha=0.6)
    run(optimizer, params, range(6))
    checkpoint = save_and_load({"params": [p.detach().clone() for p in params], "optimizer": optimizer.state_dict()})
    resumed_inner, resumed_params = build(case, True, seed=1)
    resumed = Lookahead(resumed_inner, k=2, alpha=0.1)
    with torch.no_grad():
        for param, value in zip(resumed_params, checkpoint["params"]):
            param.copy_(value)
    resumed.load_state_dict(checkpoint["optimizer"])
    assert not resumed_inner.param_groups[0]["train_mode"] and resumed.param_groups[0]["fused"] is True
    run(optimizer, params, range(6, 12))
    run(resumed, resumed_params, range(6, 12))
    for ours, expected in zip(resumed_params, params):
        assert torch.equal(ours, expected)
        assert torch.equal(resumed.state[ours]["slow_param"], optimizer.state[expected]["slow_param"])
    for ours, expected in zip(state_tensors(resumed_inner, resumed_params), state_tensors(inner, params)):
        assert torch.equal(ours, expected)


def test_lookahead_train_eval_are_no_ops_without_inner_modes() -> None:
    param = torch.nn.Parameter(torch.tensor([1.0, -2.0], dtype=torch.float64))
    optimizer = Lookahead(SGD([param], lr=0.1), k=2)
    param.grad = torch.ones_like(param)
    optimizer.step()
    before = param.detach().clone()
    optimizer.eval()
    with eval_weights(optimizer):
        assert torch.equal(param, before)
    optimizer.train()
    assert torch.equal(param, before)
    assert not has_modes(optimizer)
