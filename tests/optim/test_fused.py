"""The fused (torch.compile) step: parity with the per-tensor reference, no recompiles under an LR
schedule, state_dict compatibility, and the fallback with a one-time warning.

Compiling is slow (seconds per graph), so every case here uses the same tensor layout and few
distinct constant configurations; each configuration compiles one or two small graphs once per run.
"""

from __future__ import annotations

import os
import warnings
from typing import Any

import pytest
import torch

from optimlab.optim import SGD, Adagrad, Adam, AdamW, Lion
from optimlab.optim import _fused
from optimlab.optim._fused import DISABLE_ENV, FusedStep, fused_step, fused_unavailable_reason, resolve_fused
from optimlab.optim.adam import _adam_tensor
from optimlab.optim.sgd import _sgd_tensor

from .fused_harness import (STEPS, FusedCase, assert_matches_reference, build, cross_load_and_continue, fused_check,
                            max_relative_error, needs_compiler, run_pair, set_grads)

CASES = [
    FusedCase("adam-amsgrad-l2-f64", Adam, fused_check(Adam), skip_grads=True),
    FusedCase("adamw-maximize-f64", AdamW, fused_check(AdamW)),
    FusedCase("adamw-f32", AdamW, {"lr": 1e-2}, torch.float32, 1e-6),
    FusedCase("sgd-nesterov-l2-f64", SGD, fused_check(SGD)),
    FusedCase("lion-decay-f64", Lion, fused_check(Lion)),
    FusedCase("adagrad-decay-f64", Adagrad, fused_check(Adagrad), skip_grads=True),
]


@needs_compiler
@pytest.mark.parametrize("case", CASES, ids=lambda case: case.id)
def test_fused_matches_per_tensor_reference(case: FusedCase) -> None:
    fused, fused_params, reference, reference_params = run_pair(case)
    assert_matches_reference(fused, fused_params, reference, reference_params, case.rtol)
    # the parameters really moved, and the compiled path (not only the uncompiled leftovers) ran
    initial, _ = build(case, fused=False)
    assert max_relative_error(fused_params, [p for g in initial.param_groups for p in g["params"]]) > 1e-4
    assert sum(entry["compiles"] for entry in _fused.compile_stats().values()) > 0


@needs_compiler
def test_lr_schedule_causes_no_recompilation() -> None:
    case = CASES[2]  # AdamW float32: its graph is shared with the parity test
    fused, fused_params = build(case, fused=True)
    reference, reference_params = build(case, fused=False)
    schedulers = [torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=50) for opt in (fused, reference)]
    step_fn = fused_step(_adam_tensor, {"weight_decay": 1e-2, "amsgrad": False, "maximize": False,
                                        "decoupled_weight_decay": True}, elementwise=True)
    compiles_after_first_step = None
    lrs = set()
    for step in range(50):
        set_grads(fused_params, step, False)
        set_grads(reference_params, step, False)
        fused.step()
        reference.step()
        if compiles_after_first_step is None:
            compiles_after_first_step = step_fn.compiles
        for scheduler in schedulers:
            scheduler.step()
        lrs.add(fused.param_groups[0]["lr"])
    assert len(lrs) == 50  # every step saw a new learning rate
    assert compiles_after_first_step >= 1
    assert step_fn.compiles == compiles_after_first_step
    assert max_relative_error(fused_params, reference_params) <= 1e-6


@needs_compiler
def test_state_dict_moves_between_fused_and_reference() -> None:
    case = CASES[2]
    continued_fused, continued_fused_params, continued_reference, continued_reference_params = (
        cross_load_and_continue(case))
    assert_matches_reference(continued_fused, continued_fused_params, continued_reference, continued_reference_params, 1e-6)


def test_disabled_by_environment_falls_back_with_one_warning(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(DISABLE_ENV, "1")
    monkeypatch.setattr(_fused, "_warned", set())
    case = FusedCase("adamw-f64", AdamW, {"lr": 1e-2})
    with pytest.warns(RuntimeWarning, match=rf"AdamW\(fused=True\).*{DISABLE_ENV}=1.*foreach") as record:
        fused, fused_params, reference, reference_params = run_pair(case, steps=3)
    assert len([w for w in record if issubclass(w.category, RuntimeWarning)]) == 1
    assert max_relative_error(fused_params, reference_params) <= 1e-12
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # shown once per process, not once per step or per optimizer
        param = torch.zeros(2, requires_grad=True)
        param.grad = torch.ones(2)
        AdamW([param], fused=True).step()


def test_unavailable_reasons(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(DISABLE_ENV, raising=False)
    assert fused_unavailable_reason("cpu") is None
    for value in ("0", "false", ""):
        monkeypatch.setenv(DISABLE_ENV, value)
        assert fused_unavailable_reason("cpu") is None
    monkeypatch.delenv(DISABLE_ENV)
    monkeypatch.setattr(_fused, "_has_cpp_compiler", lambda: False)
    assert "C++ compiler" in fused_unavailable_reason("cpu")
    assert fused_unavailable_reason("meta") is not None
    monkeypatch.setattr(_fused, "_warned", set())
    params = [torch.zeros(3)]
    with pytest.warns(RuntimeWarning, match="no C\\+\\+ compiler"):
        assert resolve_fused(True, params, "Adam") is False


def test_fused_is_off_by_default_and_for_sparse_gradients() -> None:
    param = torch.zeros(4)
    assert resolve_fused(None, [param], "SGD") is False
    assert resolve_fused(False, [param], "SGD") is False
    param.grad = torch.zeros(4).to_sparse()
    assert resolve_fused(True, [param], "SGD") is False


def test_invalid_chunk_size() -> None:
    with pytest.raises(ValueError, match=r"Invalid chunk_size: 0 \(accepted range: >= 1\)"):
        FusedStep(_adam_tensor, chunk_size=0)


@needs_compiler
def test_compile_time_is_reported() -> None:
    case = CASES[2]
    run_pair(case, steps=1)
    stats = _fused.compile_stats()
    assert stats["_adam_tensor"]["compiles"] >= 1
    assert stats["_adam_tensor"]["compile_seconds"] > 0


def test_compile_cache_folder(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", default_cache_dir())  # what importing Inductor sets
    threads = torch.get_num_threads()
    _fused._ensure_cache_dir()
    chosen = tmp_path / "xdg" / "optimlab" / "inductor" / f"threads-{threads}"
    assert chosen.is_dir() and os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(chosen)
    try:  # kernels compiled for another thread count live in another folder
        torch.set_num_threads(threads + 1)
        _fused._ensure_cache_dir()
        assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(chosen.with_name(f"threads-{threads + 1}"))
    finally:
        torch.set_num_threads(threads)
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "mine"))  # a folder the user chose is kept
    _fused._ensure_cache_dir()
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "mine")


@needs_compiler
def test_full_chunks_of_many_tensors() -> None:
    """Nine tensors of different shapes: one compiled graph over a full chunk of 8 and one over the last."""
    generator = torch.Generator().manual_seed(1)
    shapes = [(17, 3), (40,), (5, 5, 2), (101,), (2, 2), (33, 7), (9,), (64,), (3, 11)]
    fused_params = [torch.randn(shape, generator=generator, dtype=torch.float64) for shape in shapes]
    reference_params = [p.clone() for p in fused_params]
    options = {"lr": 1e-2, "amsgrad": True, "weight_decay": 0.1}
    fused, reference = Adam(fused_params, fused=True, **options), Adam(reference_params, foreach=False, **options)
    for step in range(STEPS):
        set_grads(fused_params, step, False)
        set_grads(reference_params, step, False)
        fused.step()
        reference.step()
    assert_matches_reference(fused, fused_params, reference, reference_params, 1e-12)


# --- small tensors packed into one call (elementwise rules) -----------------------------------------------------

PACKED_SGD = {"lr": 1e-2, "momentum": 0.9, "nesterov": True, "weight_decay": 0.01}  # graphs shared with CASES
PACKED_ADAGRAD = dict(CASES[5].kwargs)


def _mixed_layout(dtype: torch.dtype, generator: torch.Generator) -> list[dict[str, Any]]:
    """Small tensors of many shapes (0-dim, one value, transposed, 3-D) around one tensor too large to pack."""

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(shape, generator=generator, dtype=dtype)

    small = [randn(), randn(1), randn(6, 4).t(), randn(3, 2, 5), *[randn(17 + k) for k in range(12)]]
    return [{"params": small[:9] + [randn(_fused.PACK_NUMEL + 5)] + small[9:]}]


@needs_compiler
@pytest.mark.parametrize("cls, kwargs", [(SGD, PACKED_SGD), (Adagrad, PACKED_ADAGRAD)], ids=["sgd", "adagrad"])
def test_packed_small_tensors_match_reference(cls: type, kwargs: dict[str, Any]) -> None:
    case = FusedCase(f"packed-{cls.__name__}", cls, kwargs, skip_grads=True, groups=_mixed_layout)
    fused, fused_params, reference, reference_params = run_pair(case)
    assert_matches_reference(fused, fused_params, reference, reference_params, 1e-12)
    # the small tensors' state was adopted into shared flat buffers (the large one keeps its own)
    key = "momentum_buffer" if cls is SGD else "sum"
    storages = {fused.state[p][key].untyped_storage().data_ptr() for p in fused_params if p.numel() <= _fused.PACK_NUMEL}
    assert len(storages) <= 2  # one buffer, or two while a parameter skips steps (a second layout)
    assert all(fused.state[p][key].shape == p.shape for p in fused_params)


@needs_compiler
def test_small_tensors_take_one_compiled_call(monkeypatch: pytest.MonkeyPatch) -> None:
    case = FusedCase("packed-sgd", SGD, PACKED_SGD, groups=_mixed_layout)
    fused, fused_params, _, _ = run_pair(case, steps=2)  # momentum buffers exist from here on
    step_fn = fused_step(_sgd_tensor, {key: value for key, value in PACKED_SGD.items() if key != "lr"}
                         | {"dampening": 0, "maximize": False}, elementwise=True)
    calls: list[int] = []
    call = step_fn._call
    monkeypatch.setattr(step_fn, "_call", lambda columns, *args: (calls.append(len(columns[0])), call(columns, *args)))
    set_grads(fused_params, 2, False)
    fused.step()
    assert calls == [1, 1]  # 16 small tensors in one call, the large one in another


@needs_compiler
def test_packed_state_survives_checkpoint_and_deepcopy() -> None:
    import copy
    import io

    case = FusedCase("packed-sgd", SGD, PACKED_SGD, groups=_mixed_layout)
    fused, fused_params, reference, reference_params = run_pair(case, steps=4)
    buffer = io.BytesIO()
    torch.save(fused.state_dict(), buffer)
    restored, restored_params = build(case, fused=True)
    with torch.no_grad():
        for target, source in zip(restored_params, fused_params):
            target.copy_(source)
    buffer.seek(0)
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    twin = copy.deepcopy(fused)
    twin_params = [p for group in twin.param_groups for p in group["params"]]
    for step in range(4, 10):
        for params in (fused_params, reference_params, restored_params, twin_params):
            set_grads(params, step, False)
        for optimizer in (fused, reference, restored, twin):
            optimizer.step()
    for params, optimizer in ((fused_params, fused), (restored_params, restored), (twin_params, twin)):
        assert_matches_reference(optimizer, params, reference, reference_params, 1e-12)


@needs_compiler
def test_two_optimizers_with_the_same_shapes_keep_their_own_state() -> None:
    """The compiled rule and its scratch buffers are shared per process; adopted state never is."""
    case = FusedCase("packed-sgd", SGD, PACKED_SGD, groups=_mixed_layout)
    first, first_params = build(case, fused=True, seed=1)
    second, second_params = build(case, fused=True, seed=2)
    first_reference, first_reference_params = build(case, fused=False, seed=1)
    second_reference, second_reference_params = build(case, fused=False, seed=2)
    for step in range(6):
        set_grads(first_params, step, False)
        set_grads(first_reference_params, step, False)
        set_grads(second_params, 100 + step, False)
        set_grads(second_reference_params, 100 + step, False)
        for optimizer in (first, second, first_reference, second_reference):
            optimizer.step()
    assert max_relative_error(first_params, first_reference_params) <= 1e-12
    assert max_relative_error(second_params, second_reference_params) <= 1e-12


@needs_compiler
def test_packed_complex_parameters() -> None:
    """A complex parameter reaches the rule as a real view, whose state is copied in and out, not adopted."""
    generator = torch.Generator().manual_seed(3)

    def layout(dtype: torch.dtype, _: torch.Generator) -> list[dict[str, Any]]:
        return [{"params": [torch.randn(5, 3, generator=generator, dtype=torch.complex128),
                            torch.randn(7, generator=generator, dtype=dtype), torch.randn(4, 4, generator=generator,
                                                                                          dtype=dtype)]}]

    case = FusedCase("packed-complex", SGD, PACKED_SGD, groups=layout)
    fused, fused_params = build(case, fused=True)
    generator.manual_seed(3)
    reference, reference_params = build(case, fused=False)
    for step in range(8):
        for params in (fused_params, reference_params):
            generator_step = torch.Generator().manual_seed(step)
            for p in params:
                p.grad = torch.randn(p.shape, generator=generator_step, dtype=p.dtype)
        fused.step()
        reference.step()
    assert max_relative_error([torch.view_as_real(p) if p.is_complex() else p for p in fused_params],
                              [torch.view_as_real(p) if p.is_complex() else p for p in reference_params]) <= 1e-12


@needs_compiler
def test_compiled_graph_is_called_directly_after_the_first_step(monkeypatch: pytest.MonkeyPatch) -> None:
    """Calls skip Dynamo once a layout has passed its guards; a layout with other sizes passes them once
    (no recompile: the graph's sizes are symbolic), then skips them too; both equal the reference."""
    step_fn = fused_step(_sgd_tensor, {key: value for key, value in PACKED_SGD.items() if key != "lr"}
                         | {"dampening": 0, "maximize": False}, elementwise=True)

    def layout(sizes: list[int]) -> Any:
        return lambda dtype, generator: [{"params": [torch.randn(size, generator=generator, dtype=dtype)
                                                     for size in sizes]}]

    first = FusedCase("direct-a", SGD, PACKED_SGD, groups=layout([_fused.PACK_NUMEL + 1, 3 * _fused.PACK_NUMEL + 5]))
    second = FusedCase("direct-b", SGD, PACKED_SGD, groups=layout([2 * _fused.PACK_NUMEL + 7, _fused.PACK_NUMEL + 2]))
    run_pair(first, steps=3)
    compiles = step_fn.compiles
    dynamo_calls: list[str] = []
    compiled = step_fn._compiled
    for case in (first, second):
        monkeypatch.setattr(step_fn, "_compiled", lambda *args, case=case: (dynamo_calls.append(case.id),
                                                                            compiled(*args)))
        fused, fused_params, reference, reference_params = run_pair(case)
        assert_matches_reference(fused, fused_params, reference, reference_params, 1e-12)
    assert dynamo_calls == ["direct-b"]  # one entry for the new layout, 18 direct calls after it
    assert step_fn.compiles == compiles


@needs_compiler
def test_calls_go_through_dynamo_when_the_inputs_cannot_be_read_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_fused, "_argument_extractor", lambda graph_module: None)
    step_fn = FusedStep(_sgd_tensor, {key: value for key, value in PACKED_SGD.items() if key != "lr"}
                        | {"dampening": 0, "maximize": False}, elementwise=True)
    params = [torch.randn(_fused.PACK_NUMEL + 3, dtype=torch.float64) for _ in range(2)]
    grads = [torch.randn_like(p) for p in params]
    buffers = [torch.randn_like(p) for p in params]
    expected_params, expected_buffers = [t.clone() for t in params], [t.clone() for t in buffers]
    for param, grad, buffer in zip(expected_params, grads, expected_buffers):
        for _ in range(3):
            _sgd_tensor(param, grad, buffer, lr=1e-2, **step_fn.static)
    with torch.no_grad():
        for _ in range(3):
            step_fn([params, grads, buffers], {"lr": 1e-2})
    assert step_fn._direct == {}
    assert max_relative_error(params + buffers, expected_params + expected_buffers) <= 1e-12


@needs_compiler
def test_more_graphs_than_dynamos_default_limit_stay_compiled() -> None:
    """Ten chunk lengths of one rule: ten graphs, beyond Dynamo's default limit of 8 per function."""
    step_fn = FusedStep(_sgd_tensor, {"weight_decay": 0.0, "momentum": 0.0, "dampening": 0.0, "nesterov": False,
                                      "maximize": False}, chunk_size=16)
    with torch.no_grad():
        for count in range(1, 11):
            params = [torch.randn(_fused.PACK_NUMEL + k, dtype=torch.float64) for k in range(count)]
            grads = [torch.randn_like(p) for p in params]
            expected = [p - 0.5 * g for p, g in zip(params, grads)]
            step_fn([params, grads, None], {"lr": 0.5})
            assert max_relative_error(params, expected) <= 1e-15
    assert len(step_fn._graphs) == 10  # every length got its compiled graph (none fell back to eager)


def _rule_with_subtraction(param: torch.Tensor, grad: torch.Tensor, *, lr: torch.Tensor) -> None:
    param.sub_(grad, alpha=lr)


@needs_compiler
def test_rules_that_inductor_miscompiles_are_refused() -> None:
    step_fn = FusedStep(_rule_with_subtraction)
    params, grads = [torch.ones(4, dtype=torch.float64)], [torch.ones(4, dtype=torch.float64)]
    with torch.no_grad(), pytest.raises(Exception, match=r"subtracts with a tensor alpha.*add_\(y, alpha=-s\)"):
        step_fn([params, grads], {"lr": 0.5})


_GLOBAL_SCALE = torch.tensor(0.5, dtype=torch.float64)


def _rule_reading_a_global(param: torch.Tensor, grad: torch.Tensor, *, lr: torch.Tensor) -> None:
    param.add_(grad * _GLOBAL_SCALE, alpha=-lr)


@needs_compiler
def test_a_rule_that_reads_a_global_works_and_says_why_it_is_slower(caplog: pytest.LogCaptureFixture) -> None:
    step_fn = FusedStep(_rule_reading_a_global)
    params = [torch.ones(_fused.PACK_NUMEL + 1, dtype=torch.float64)]
    grads = [torch.full_like(params[0], 2.0)]
    with torch.no_grad(), caplog.at_level("INFO", logger="optimlab.optim._fused"):
        for _ in range(3):
            step_fn([params, grads], {"lr": 0.1})
    assert "every call goes through Dynamo" in caplog.text
    assert step_fn._direct == {}
    assert max_relative_error(params, [torch.full_like(params[0], 1.0 - 3 * 0.1)]) <= 1e-15


@needs_compiler
def test_many_param_groups_keep_their_packed_state() -> None:
    """Ten groups (layer-wise learning rates): each group's small tensors keep their adopted buffers from
    step to step (no copy back and forth between groups), and the result equals the reference."""
    def layout(dtype: torch.dtype, generator: torch.Generator) -> list[dict[str, Any]]:
        return [{"params": [torch.randn(3, 4 + k, generator=generator, dtype=dtype) for _ in range(3)],
                 "lr_scale": 0.9**k} for k in range(10)]

    case = FusedCase("packed-groups", SGD, PACKED_SGD, groups=layout)
    fused, fused_params, reference, reference_params = run_pair(case, steps=3)
    addresses = [fused.state[p]["momentum_buffer"].data_ptr() for p in fused_params]
    for step in range(3, 8):
        for params, optimizer in ((fused_params, fused), (reference_params, reference)):
            set_grads(params, step, False)
            optimizer.step()
    assert [fused.state[p]["momentum_buffer"].data_ptr() for p in fused_params] == addresses
    assert_matches_reference(fused, fused_params, reference, reference_params, 1e-12)
