"""The fused (torch.compile) step of Adafactor and Muon: parity with the per-tensor reference for params and
every state tensor, no recompiles under 50 scheduled learning rates, state_dicts that move between the fused
and the reference path, MuonWithAdamW passing ``fused`` to both halves, and the fallback under
``OPTIMLAB_DISABLE_FUSED``.

Neither class has a multi-tensor path: the reference the harness asks for with ``foreach=False`` is their
per-tensor path, which they take whenever ``fused`` is off (:func:`per_tensor_reference`).

Compiling costs seconds per graph, so the cases are few and the other tests reuse their graphs. Adafactor
compiles one graph per layout (vector, matrix, batch of matrices), Muon one per matrix shape:

* Adafactor float64 with every option that changes the rule (first moment, weight decay, a parameter that
  skips steps) over every layout, a 0-dim, a transposed and a ``(1, n)`` parameter (those three run the
  same rule uncompiled): 3 graphs;
* Adafactor float32, absolute step (so the schedule test changes the step size): 2 graphs;
* Muon float64 with a float64 Newton–Schulz iteration, Nesterov, weight decay, a tall and a wide matrix
  (and a transposed one, uncompiled): 2 graphs;
* Muon float32 with the default bfloat16 iteration, shared by MuonWithAdamW: 1 graph, plus AdamW's.

The second param group of each case changes every hyperparameter the compiled rule receives as data, so a
graph that kept its first call's value would fail.
"""

from __future__ import annotations

import functools
import inspect
import warnings
from typing import Any, Callable

import pytest
import torch

from optimlab.optim import Adafactor, AdamW, Muon, MuonWithAdamW
from optimlab.optim import _fused
from optimlab.optim._fused import DISABLE_ENV

from .fused_harness import (FusedCase, assert_matches_reference, build, cross_load_and_continue, fused_check,
                            max_relative_error, needs_compiler, run_pair, set_grads, state_tensors)


def per_tensor_reference(cls: type[torch.optim.Optimizer]) -> Callable[..., torch.optim.Optimizer]:
    """``cls`` for the harness, which builds its reference with ``foreach=False``: Adafactor and Muon have no
    multi-tensor path, so their reference is the path they take with ``fused`` off."""

    @functools.wraps(cls, updated=())
    def make(params: Any, *, foreach: bool | None = None, **kwargs: Any) -> torch.optim.Optimizer:
        assert foreach is not True, f"{cls.__name__} has no multi-tensor path"
        return cls(params, **kwargs)

    return make


def adafactor_layout(dtype: torch.dtype, generator: torch.Generator, *, batched: bool = True,
                     **second: Any) -> list[dict[str, Any]]:
    """Matrices (compiled as one layout), vectors (another), a batch of matrices (a third, if ``batched``),
    and a 0-dim, a transposed and a ``(1, n)`` tensor (the rule uncompiled). ``second``: the second group's
    hyperparameters besides its halved lr."""

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(shape, generator=generator, dtype=dtype)

    first = [randn(7, 5), randn(13), randn(), randn(6, 4).t(), randn(1, 6)] + ([randn(2, 3, 4)] if batched else [])
    return [{"params": first}, {"params": [randn(5, 9), randn(4)], "lr_scale": 0.5, **second}]


def muon_layout(dtype: torch.dtype, generator: torch.Generator, *, shapes: tuple[tuple[int, int], ...],
                **second: Any) -> list[dict[str, Any]]:
    """The matrices of ``shapes`` (one compiled graph each) in two groups, and a transposed one (uncompiled)."""

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(shape, generator=generator, dtype=dtype)

    return [{"params": [randn(*shapes[0]), randn(4, 6).t()]},
            {"params": [randn(*shape) for shape in shapes[-1:]], "lr_scale": 0.5, **second}]


ADAFACTOR_F64 = FusedCase("adafactor-momentum-decay-f64", per_tensor_reference(Adafactor),
                          fused_check(Adafactor), skip_grads=True,
                          groups=functools.partial(adafactor_layout, beta1=0.5, d=1.2, eps=(None, 1e-2),
                                                   beta2_decay=-0.6))
ADAFACTOR_F32 = FusedCase("adafactor-absolute-step-f32", per_tensor_reference(Adafactor),
                          {"lr": 1e-2, "relative_step": False}, torch.float32, 1e-6,
                          groups=functools.partial(adafactor_layout, batched=False, d=1.2, eps=(None, 1e-1)))
MUON_F64 = FusedCase("muon-nesterov-decay-f64", per_tensor_reference(Muon),
                     fused_check(Muon),
                     groups=functools.partial(muon_layout, shapes=((7, 5), (5, 9)), momentum=0.7))
# MuonWithAdamW's defaults (no weight decay, Nesterov, a bfloat16 iteration), so that it shares this graph
MUON_BF16 = FusedCase("muon-bf16-iteration-f32", per_tensor_reference(Muon), {"lr": 2e-2, "weight_decay": 0.0},
                      torch.float32, 1e-6, groups=functools.partial(muon_layout, shapes=((7, 5),), momentum=0.7))

CASES = [ADAFACTOR_F64, ADAFACTOR_F32, MUON_F64, MUON_BF16]

# The bfloat16 Newton-Schulz iteration: Inductor fuses its elementwise parts (the normalisation, a*X + P@X)
# and keeps their intermediates in float32 where the eager reference rounds each result to bfloat16, so the
# two orthogonalised updates differ by bfloat16 roundings (unit roundoff 2**-9 relative) of entries that
# are O(1) while each step moves a parameter by lr * O(1) = 2e-2 of it. The parameters after 20 steps may
# therefore differ by up to about one bfloat16 unit roundoff of their scale (measured: 7e-4); the momentum
# buffers never see the iteration and keep the float32 tolerance of 1e-6.
PARAM_RTOL = {MUON_BF16.id: 2.0**-9}


@needs_compiler
@pytest.mark.parametrize("case", CASES, ids=lambda case: case.id)
def test_fused_matches_per_tensor_reference(case: FusedCase) -> None:
    fused, fused_params, reference, reference_params = run_pair(case)
    assert_matches_reference(fused, fused_params, reference, reference_params, case.rtol,
                             param_rtol=PARAM_RTOL.get(case.id, case.rtol))
    # the parameters moved, and the compiled rule (not only the uncompiled leftovers) ran
    initial, _ = build(case, fused=False)
    assert max_relative_error(fused_params, [p for g in initial.param_groups for p in g["params"]]) > 1e-4
    rule = "muon_tensor" if "muon" in case.id else "adafactor_tensor"
    assert _fused.compile_stats()[rule]["compiles"] > 0


def test_layouts_and_uncompiled_shapes_are_exercised() -> None:
    """The float64 Adafactor layout holds every kind of tensor the fused step treats differently."""
    params = [p for group in ADAFACTOR_F64.groups(torch.float64, torch.Generator()) for p in group["params"]]
    from optimlab.optim.adafactor import _layout

    assert {_layout(p) for p in params} == {"vector", "matrix", "batched"}
    assert any(p.dim() == 0 for p in params) and any(not p.is_contiguous() for p in params)
    assert any(p.dim() == 2 and 1 in p.shape for p in params)


def _compiles(rule: str) -> int:
    return int(_fused.compile_stats().get(rule, {}).get("compiles", 0))


@needs_compiler
@pytest.mark.parametrize("case", [ADAFACTOR_F32, MUON_BF16], ids=lambda case: case.id)
def test_lr_schedule_causes_no_recompilation(case: FusedCase) -> None:
    rule = "muon_tensor" if "muon" in case.id else "adafactor_tensor"
    fused, fused_params = build(case, fused=True)
    reference, reference_params = build(case, fused=False)
    schedulers = [torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=50) for opt in (fused, reference)]
    compiles_after_first_step = None
    lrs = set()
    for step in range(50):
        set_grads(fused_params, step, False)
        set_grads(reference_params, step, False)
        fused.step()
        reference.step()
        if compiles_after_first_step is None:
            compiles_after_first_step = _compiles(rule)
        for scheduler in schedulers:
            scheduler.step()
        lrs.add(fused.param_groups[0]["lr"])
    assert len(lrs) == 50  # every step saw a new learning rate
    assert compiles_after_first_step >= 1
    assert _compiles(rule) == compiles_after_first_step
    assert max_relative_error(fused_params, reference_params) <= PARAM_RTOL.get(case.id, case.rtol)
    assert max_relative_error(state_tensors(fused, fused_params), state_tensors(reference, reference_params)) \
        <= case.rtol


@needs_compiler
@pytest.mark.parametrize("case", [ADAFACTOR_F32, MUON_F64], ids=lambda case: case.id)
def test_state_dict_moves_between_fused_and_reference(case: FusedCase) -> None:
    continued_fused, continued_fused_params, continued_reference, continued_reference_params = (
        cross_load_and_continue(case))
    assert_matches_reference(continued_fused, continued_fused_params, continued_reference, continued_reference_params, case.rtol)


@needs_compiler
def test_muon_with_adamw_passes_fused_to_both_halves() -> None:
    """Fused MuonWithAdamW equals fused Muon on its matrices plus fused AdamW on the rest, bit for bit, and
    its unfused twin within the tolerances (AdamW float32 1e-6; the Muon part as in ``PARAM_RTOL``)."""
    generator = torch.Generator().manual_seed(3)
    initial = [torch.randn(7, 5, generator=generator), torch.randn(13, generator=generator),
               torch.randn(3, generator=generator)]
    combined, unfused, muon_params, adamw_params = ([p.clone() for p in initial] for _ in range(4))
    options = {"lr": 2e-2, "momentum": 0.9}
    adamw_options = {"adamw_lr": 1e-2, "adamw_weight_decay": 1e-2}
    optimizers = [MuonWithAdamW(combined, **options, **adamw_options, fused=True),
                  MuonWithAdamW(unfused, **options, **adamw_options)]
    assert [group["fused"] for group in optimizers[0].param_groups] == [True, True]
    separate = [Muon(muon_params[:1], **options, weight_decay=0.0, fused=True),
                AdamW(adamw_params[1:], lr=1e-2, betas=(0.9, 0.95), weight_decay=1e-2, fused=True)]
    for step in range(10):
        for params in (combined, unfused, muon_params, adamw_params):
            set_grads(params, step, False)
        for optimizer in optimizers + separate:
            optimizer.step()
    assert max_relative_error(combined[:1], muon_params[:1]) == 0.0
    assert max_relative_error(combined[1:], adamw_params[1:]) == 0.0
    assert max_relative_error(combined[1:], unfused[1:]) <= 1e-6
    assert max_relative_error(combined[:1], unfused[:1]) <= PARAM_RTOL[MUON_BF16.id]


@pytest.mark.parametrize("case", [ADAFACTOR_F64, MUON_F64], ids=lambda case: case.id)
def test_disabled_by_environment_falls_back_with_one_warning(case: FusedCase,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(DISABLE_ENV, "1")
    monkeypatch.setattr(_fused, "_warned", set())
    name = "Muon" if "muon" in case.id else "Adafactor"
    with pytest.warns(RuntimeWarning, match=rf"{name}\(fused=True\).*{DISABLE_ENV}=1") as record:
        fused, fused_params, reference, reference_params = run_pair(case, steps=3)
    assert len([w for w in record if issubclass(w.category, RuntimeWarning)]) == 1
    assert max_relative_error(fused_params, reference_params) == 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per process, not per step or per optimizer
        build(case, fused=True)[0].step()


def test_fused_is_a_keyword_only_option_kept_per_group() -> None:
    for cls in (Adafactor, Muon, MuonWithAdamW):
        parameter = inspect.signature(cls.__init__).parameters["fused"]
        assert parameter.kind is inspect.Parameter.KEYWORD_ONLY and parameter.default is None
        optimizer = cls([{"params": [torch.zeros(3, 3)]}, {"params": [torch.zeros(2, 2)], "fused": True}])
        assert optimizer.defaults["fused"] is None
        assert [group["fused"] for group in optimizer.param_groups] == [None, True]
