"""Tests generated from the registry for every registered optimizer class, and the meta-test that keeps the
registrations complete.

For each :class:`optimlab.optim.registry.Registration`: the declared state bytes hold; complex parameters are
handled (a complex parameter moves exactly like its real view) or rejected (torch's ``RuntimeError`` at
``step``, nothing changed) as declared; a class with ``fused=True`` runs its ``fused_check`` configuration
through the compiled step within 1e-12 (float64) of its per-tensor path; and the meta-test fails when an
optimizer class in ``optimlab.optim`` is not registered, declares nothing about ``fused`` although it takes
the argument, has no fused coverage, says nothing about complex parameters, or is in no matrix.
The generic behaviour and reference parity come from ``cases.py`` (``test_matrix.py``, ``test_parity_torch.py``).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import pytest
import torch
from torch.testing._internal.common_optimizers import optim_db

import optimlab.optim
from optimlab.optim._base import OptimlabOptimizer
from optimlab.optim.registry import Registration, registrations
from optimlab.optim.state import state_bytes_per_param

from .fused_harness import (FusedCase, assert_matches_reference, build, max_relative_error, needs_compiler,
                            param_groups, run_pair)

REGISTRATIONS = registrations()


def _id(registration: Registration) -> str:
    return registration.cls.__name__


def _matrices(dtype: torch.dtype, generator: torch.Generator) -> list[dict[str, Any]]:
    """For classes that take only matrices: two groups (the second at half the lr), a tall, a wide and a
    transposed matrix (the last one not contiguous)."""

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(shape, generator=generator, dtype=dtype)

    return [{"params": [randn(7, 5), randn(4, 6).t()]}, {"params": [randn(5, 9)], "lr_scale": 0.5}]


def _one_param_step(registration: Registration, param: torch.Tensor, grad: torch.Tensor) -> torch.optim.Optimizer:
    param.grad = grad
    optimizer = registration.cls([param], lr=registration.default_lr)
    optimizer.step()
    return optimizer


@pytest.mark.parametrize("registration", [r for r in REGISTRATIONS if r.state_bytes is not None], ids=_id)
def test_declared_state_bytes(registration: Registration) -> None:
    generator = torch.Generator().manual_seed(0)
    param = torch.nn.Parameter(torch.randn(32, 16, generator=generator))
    optimizer = _one_param_step(registration, param, torch.randn(32, 16, generator=generator))
    assert state_bytes_per_param(optimizer) == registration.state_bytes


def _complex_pair() -> tuple[torch.Tensor, torch.Tensor]:
    """A complex (6, 4) matrix and its real view as a separate parameter (a matrix for every class: LARS, for
    one, leaves tensors of one dimension out of its adaptation, which the (6, 4, 2) real view is not)."""
    value = torch.randn((6, 4), generator=torch.Generator().manual_seed(1), dtype=torch.complex128)
    return torch.nn.Parameter(value.clone()), torch.nn.Parameter(torch.view_as_real(value).clone())


@pytest.mark.parametrize("registration", [r for r in REGISTRATIONS if r.complex == "supported"], ids=_id)
def test_complex_parameter_moves_like_its_real_view(registration: Registration) -> None:
    """torch's convention: the rule treats a complex tensor as its real view (real and imaginary parts as
    independent real entries); 10 steps of a complex parameter equal those of its real view within 1e-12
    (float64; norms of a complex tensor and of its real view round differently, LARS's trust ratio uses them)."""
    complex_param, real_param = _complex_pair()
    options = next(iter(registration.checks.values()), {"lr": registration.default_lr})
    complex_opt, real_opt = registration.cls([complex_param], **options), registration.cls([real_param], **options)
    generator = torch.Generator().manual_seed(2)
    start = real_param.detach().clone()
    for _ in range(10):
        grad = torch.randn(complex_param.shape, generator=generator, dtype=torch.complex128)
        complex_param.grad, real_param.grad = grad, torch.view_as_real(grad).clone()
        complex_opt.step(_zero_loss)  # a closure, for classes whose step needs one (LBFGS)
        real_opt.step(_zero_loss)
    assert not torch.equal(real_param, start)
    assert max_relative_error([torch.view_as_real(complex_param)], [real_param]) <= 1e-12


@pytest.mark.parametrize("registration", [r for r in REGISTRATIONS if r.complex == "rejected"], ids=_id)
def test_complex_parameter_rejected_before_anything_changes(registration: Registration) -> None:
    complex_param, _ = _complex_pair()
    real_param = torch.nn.Parameter(torch.randn(3, 3, dtype=torch.float64))
    message = rf"{registration.cls.__name__} does not support complex parameters"
    try:
        optimizer = registration.cls([real_param, complex_param], lr=registration.default_lr)
    except ValueError as error:  # rejected already at construction, as torch's SparseAdam does
        assert re.search(message, str(error)), error
        return
    before = [real_param.detach().clone(), complex_param.detach().clone()]
    real_param.grad, complex_param.grad = torch.ones_like(real_param), torch.ones_like(complex_param)
    with pytest.raises(RuntimeError, match=message):
        optimizer.step()
    assert torch.equal(real_param, before[0]) and torch.equal(complex_param, before[1])
    assert not any(optimizer.state.values())


def _zero_loss() -> float:
    return 0.0


def _fused_case(registration: Registration) -> FusedCase:
    return FusedCase(f"{_id(registration)}-fused-check-f64", registration.cls, dict(registration.fused_check or {}),
                     skip_grads=True, groups=_matrices if registration.matrices_only else param_groups)


FUSED_CASES = [_fused_case(r) for r in REGISTRATIONS if r.fused]


@needs_compiler
@pytest.mark.parametrize("case", FUSED_CASES, ids=lambda case: case.id)
def test_fused_matches_per_tensor_path(case: FusedCase) -> None:
    """20 steps of the fused (compiled) step and of the per-tensor path (``foreach=False`` where the class
    has one) from identical parameters and gradients, one parameter skipping steps: parameters and every
    state tensor within 1e-12 (float64), and the parameters moved."""
    fused, fused_params, reference, reference_params = run_pair(case)
    assert_matches_reference(fused, fused_params, reference, reference_params, 1e-12)
    initial, _ = build(case, fused=False)
    assert max_relative_error(fused_params, [p for g in initial.param_groups for p in g["params"]]) > 1e-4


@pytest.mark.parametrize("registration", [r for r in REGISTRATIONS if r.fused is False], ids=_id)
def test_fused_refused_where_declared_unsupported(registration: Registration) -> None:
    with pytest.raises((ValueError, RuntimeError, NotImplementedError), match="fused"):
        registration.cls([torch.nn.Parameter(torch.zeros(2, 2))], fused=True)


def _optimizer_classes() -> list[type]:
    """Every optimizer class defined in optimlab's own modules (subclasses of the shared base, recursively)."""
    found, pending = [], list(OptimlabOptimizer.__subclasses__())
    while pending:
        cls = pending.pop()
        pending.extend(cls.__subclasses__())
        if cls.__module__.startswith("optimlab.") and cls not in found:
            found.append(cls)
    return found


def coverage_problems(classes: list[type], registered: list[Registration], fused_cases: list[FusedCase]) -> list[str]:
    """What keeps a class out of the generated tests: no registration, ``fused`` accepted but undeclared,
    fused support without fused coverage, complex handling undeclared, or neither matrix rows nor a reason."""
    by_class = {registration.cls: registration for registration in registered}
    fused_covered = {case.cls for case in fused_cases}
    problems = [f"{cls.__qualname__}: not registered (decorate it with optimlab.optim.registry.register)"
                for cls in classes if cls not in by_class]
    for registration in registered:
        name = registration.cls.__qualname__
        if registration.accepts_fused and registration.fused is None:
            problems.append(f"{name}: takes fused= but its registration says neither fused=True nor fused=False")
        if registration.fused and registration.cls not in fused_covered:
            problems.append(f"{name}: fused=True but no fused parity case covers it")
        if registration.complex is None:
            problems.append(f"{name}: complex parameters neither handled nor rejected (complex= undeclared)")
        if not registration.checks and not registration.matrix_exempt:
            problems.append(f"{name}: no checks (matrix rows) and no matrix_exempt reason")
    return problems


def test_every_optimizer_class_is_registered_and_covered() -> None:
    classes = _optimizer_classes()
    assert {"Adam", "Muon", "ScheduleFreeAdamW"} <= {cls.__name__ for cls in classes}  # the scan sees them
    assert coverage_problems(classes, REGISTRATIONS, FUSED_CASES) == []
    exported = set(optimlab.optim.__all__)
    assert all(registration.cls.__name__ in exported for registration in REGISTRATIONS)


class _Unlisted(OptimlabOptimizer):
    """A deliberately unregistered optimizer that takes ``fused`` (the meta-test must flag it)."""

    def __init__(self, params: Any, lr: float = 1e-3, *, fused: bool | None = None) -> None:
        super().__init__(params, {"lr": lr, "fused": fused})


def test_meta_test_flags_unlisted_and_undeclared_classes(monkeypatch: pytest.MonkeyPatch) -> None:
    adam = next(r for r in REGISTRATIONS if r.cls is optimlab.optim.Adam)
    # an optimlab class that forgot the decorator
    monkeypatch.setattr(_Unlisted, "__module__", "optimlab.optim.unlisted")
    assert coverage_problems([_Unlisted], [], []) == [
        "_Unlisted: not registered (decorate it with optimlab.optim.registry.register)"]
    # registered, but fused and complex undeclared, and no checks
    bare = dataclasses.replace(adam, cls=_Unlisted, fused=None, complex=None, checks={}, matrix_exempt=None)
    assert coverage_problems([_Unlisted], [bare], []) == [
        "_Unlisted: takes fused= but its registration says neither fused=True nor fused=False",
        "_Unlisted: complex parameters neither handled nor rejected (complex= undeclared)",
        "_Unlisted: no checks (matrix rows) and no matrix_exempt reason",
    ]
    # fused declared but the generated fused cases left it out (e.g. a hand-kept list that forgot it)
    assert coverage_problems([optimlab.optim.Adam], [adam], [c for c in FUSED_CASES if c.cls is not adam.cls]) == [
        "Adam: fused=True but no fused parity case covers it"]


def _param_for(registration: Registration, **options: object) -> torch.Tensor:
    return torch.nn.Parameter(torch.randn(4, 3, **options))


@pytest.mark.parametrize("registration", REGISTRATIONS, ids=_id)
def test_state_dict_is_stable_across_a_load(registration: Registration) -> None:
    """``load_state_dict(state_dict())`` leaves ``state_dict()`` as it was (no key added to the groups)."""
    optimizer = registration.cls([_param_for(registration)], lr=registration.default_lr)
    before = optimizer.state_dict()
    optimizer.load_state_dict(before)
    assert optimizer.state_dict() == before


@pytest.mark.parametrize("registration", [r for r in REGISTRATIONS if r.fused], ids=_id)
def test_fused_on_unsupported_tensors_raises_like_torch(registration: Registration) -> None:
    """torch raises at construction when ``fused=True`` meets a device without a fused kernel (here: meta)."""
    with pytest.raises(RuntimeError, match=r"`fused=True` requires all the params to be floating point Tensors of "
                                           r"supported devices: \['cpu', 'cuda'\].*meta"):
        registration.cls([_param_for(registration, device="meta")], lr=registration.default_lr, fused=True)


@pytest.mark.parametrize("registration", REGISTRATIONS, ids=_id)
def test_lr_given_as_a_string_is_rejected(registration: Registration) -> None:
    with pytest.raises(TypeError, match=r"Invalid lr: '0\.1' \(a str\); accepted: a float or a one-element tensor"):
        registration.cls([_param_for(registration)], lr="0.1")


def _compile_setup(registration: Registration) -> tuple[torch.optim.Optimizer, list[torch.Tensor]]:
    shapes = [(4, 3), (5, 3)] if registration.matrices_only else [(4, 3), (5,)]
    generator = torch.Generator().manual_seed(5)
    params = [torch.nn.Parameter(torch.randn(shape, generator=generator, dtype=torch.float64)) for shape in shapes]
    options = next(iter(registration.checks.values()), {"lr": registration.default_lr})
    return registration.cls(params, **options), params


# torch optimizers that take only sparse gradients (torch's own database says which): their counterparts get sparse ones
SPARSE_ONLY = {info.optim_cls for info in optim_db if info.only_supports_sparse_grads}


def _set_grads(params: list[torch.Tensor], step: int, sparse: bool = False) -> None:
    generator = torch.Generator().manual_seed(50 + step)
    for param in params:
        grad = torch.randn(param.shape, generator=generator, dtype=param.dtype)
        param.grad = grad.to_sparse() if sparse else grad


@pytest.mark.parametrize("registration", REGISTRATIONS, ids=_id)
def test_compiled_step_has_no_graph_breaks(registration: Registration) -> None:
    """``torch.compile(opt.step)`` (users compile their whole training step): Dynamo traces the step into one
    graph (``explain``: no graph break) and ``fullgraph=True`` compiles it, and three compiled steps equal three
    eager ones within 1e-9 (float64; the compiled step computes step-dependent scalars with tensor ops, e.g.
    torch.pow where eager Python uses ``**``, which can flip one rounding of NAdam's float32 ``mu_product``:
    2.5e-10 measured, the others <= 1e-15). A class declaring ``graph_breaks`` must still fail one of the two
    (the declaration stays true)."""
    sparse = registration.reference in SPARSE_ONLY
    torch._dynamo.reset()
    optimizer, params = _compile_setup(registration)
    _set_grads(params, 0, sparse)
    explanation = torch._dynamo.explain(optimizer.step)(_zero_loss)
    problems = [str(b.reason).splitlines()[0] for b in explanation.break_reasons] or (
        [f"{explanation.graph_break_count} graph breaks"] if explanation.graph_break_count else [])
    torch._dynamo.reset()
    compiled_optimizer, compiled_params = _compile_setup(registration)
    eager_optimizer, eager_params = _compile_setup(registration)
    compiled_step = torch.compile(compiled_optimizer.step, backend="eager", fullgraph=True)
    try:
        for step in range(3):
            _set_grads(compiled_params, step, sparse)
            _set_grads(eager_params, step, sparse)
            compiled_step(_zero_loss)
            eager_optimizer.step(_zero_loss)
    except (torch._dynamo.exc.Unsupported, torch._dynamo.exc.UserError) as error:
        problems.append(str(error).splitlines()[0])
    if registration.graph_breaks:
        assert problems, f"torch.compile(step) traces in one graph now: remove graph_breaks from {_id(registration)}"
        return
    assert problems == []
    assert max_relative_error(compiled_params, eager_params) <= 1e-9
