"""Flat-buffer mode (optimlab.optim.flat): the same steps as the per-tensor reference, state_dict in torch's
format, checkpoints in every direction, tied and frozen parameters, gradients kept in the buffer, and the
clear errors for what it cannot do."""

from __future__ import annotations

import inspect
import io

import pytest
import torch

from optimlab.optim import LAMB, SGD, Adagrad, Adam, AdamW, NAdam, flatten_parameters, is_flat
from optimlab.optim.flat import ELEMENTWISE

from .cases import ALL_CASES, Case
from .fused_harness import needs_compiler

FLAT_CASES = [case for case in ALL_CASES
              if case.optimizer.__name__ in ELEMENTWISE and case.kwargs.get("state_dtype") is None
              and not case.kwargs.get("cautious")]
NO_COMPLEX = ("Lion", "ScheduleFreeAdamW")  # their rules use sign() / have no complex support on any path
STEPS = 12


def _params(case_name: str, dtype: torch.dtype) -> list[torch.nn.Parameter]:
    generator = torch.Generator().manual_seed(0)
    tensors = [torch.randn(shape, generator=generator, dtype=dtype) for shape in ((7, 5), (13,), (), (3, 3), (4,))]
    tensors.append(torch.randn(6, 4, generator=generator, dtype=dtype).t())  # non-contiguous strides
    if case_name not in NO_COMPLEX:
        tensors.append(torch.randn(3, generator=generator, dtype=torch.complex128 if dtype == torch.float64
                                   else torch.complex64))
    return [torch.nn.Parameter(t) for t in tensors]


def _groups(params: list[torch.Tensor], lr: object) -> list[dict]:
    """Two param groups (different lr); the second mixes dtypes when a complex parameter is present."""
    scaled = lr * 0.5 if isinstance(lr, (float, int)) else lr
    return [{"params": params[:3]}, {"params": params[3:], "lr": scaled}]


def _set_grads(params: list[torch.Tensor], step: int) -> None:
    """Random gradients; parameter 1 has none every third step, parameter 3 is frozen for steps 4-7."""
    generator = torch.Generator().manual_seed(100 + step)
    params[3].requires_grad_(not 4 <= step < 8)
    for index, param in enumerate(params):
        grad = torch.randn(param.shape, generator=generator, dtype=param.dtype)
        skipped = (index == 1 and step % 3 == 1) or not param.requires_grad
        param.grad = None if skipped else grad


def _build(case: Case, dtype: torch.dtype, *, flat: bool, **options: object
           ) -> tuple[torch.optim.Optimizer, list[torch.Tensor]]:
    params = _params(case.optimizer.__name__, dtype)
    kwargs = dict(case.kwargs, **options)
    lr = kwargs.pop("lr", inspect.signature(case.optimizer.__init__).parameters["lr"].default)
    optimizer = case.optimizer(_groups(params, lr), lr=lr, **kwargs)
    if flat:
        flatten_parameters(optimizer)
    return optimizer, params


def _state_values(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    state = optimizer.state_dict()["state"]
    return [torch.as_tensor(value) for index in sorted(state) for _, value in sorted(state[index].items())]


def _run(optimizer: torch.optim.Optimizer, params: list[torch.Tensor], steps: range) -> None:
    for step in steps:
        _set_grads(params, step)
        optimizer.step()


def _foreach_option(case: Case) -> dict:
    return {"foreach": False} if "foreach" in inspect.signature(case.optimizer.__init__).parameters else {}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("case", FLAT_CASES, ids=lambda case: case.id)
def test_flat_step_equals_the_per_tensor_reference_bit_for_bit(case: Case, dtype: torch.dtype) -> None:
    """Unfused, the flat step runs the same operations on the concatenation: identical parameters and state,
    with two groups, a non-contiguous and a 0-dim parameter, skipped gradients and a frozen-then-unfrozen one."""
    flat, flat_params = _build(case, dtype, flat=True, **_foreach_option(case))
    reference, reference_params = _build(case, dtype, flat=False, **_foreach_option(case))
    storage = flat_params[0].untyped_storage().data_ptr()
    assert is_flat(flat) and flat_params[1].untyped_storage().data_ptr() == storage  # one buffer per group and dtype
    _run(flat, flat_params, range(STEPS))
    _run(reference, reference_params, range(STEPS))
    assert all(torch.equal(a, b) for a, b in zip(flat_params, reference_params))
    flat_state, reference_state = _state_values(flat), _state_values(reference)
    assert len(flat_state) == len(reference_state)  # (plain SGD keeps none)
    assert all(torch.equal(a, b) for a, b in zip(flat_state, reference_state))
    assert flat_params[0].untyped_storage().data_ptr() == storage  # still in the buffer


# the paths of the performance issue, plus NAdam (0-dim state besides the step) and Adagrad (state not starting at 0)
FUSED_CASES = [Case("adam", Adam, {"lr": 0.01}, torch.optim.Adam), Case("adamw", AdamW, {"lr": 0.01}, torch.optim.AdamW),
               Case("sgd-momentum", SGD, {"lr": 0.05, "momentum": 0.9}, torch.optim.SGD),
               Case("nadam", NAdam, {"lr": 0.02}, torch.optim.NAdam)]


@needs_compiler
@pytest.mark.parametrize("dtype,rtol", [(torch.float64, 1e-12), (torch.float32, 1e-6)], ids=["float64", "float32"])
@pytest.mark.parametrize("case", FUSED_CASES, ids=lambda case: case.id)
def test_flat_fused_step_matches_the_reference(case: Case, dtype: torch.dtype, rtol: float) -> None:
    """fused=True compiles the rule once for the whole buffer: within the fused path's tolerances of the
    reference (the compiler may contract a multiply and an add)."""
    flat, flat_params = _build(case, dtype, flat=True, fused=True)
    reference, reference_params = _build(case, dtype, flat=False, **_foreach_option(case))
    _run(flat, flat_params, range(STEPS))
    _run(reference, reference_params, range(STEPS))
    for actual, expected in ((flat_params, reference_params), (_state_values(flat), _state_values(reference))):
        for a, e in zip(actual, expected):
            assert ((a - e).abs().max() / e.abs().max().clamp_min(1e-30)).item() <= rtol


def _checkpoint(optimizer: torch.optim.Optimizer) -> dict:
    buffer = io.BytesIO()
    torch.save(optimizer.state_dict(), buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


# NAdam's mu_product goes to float64 in torch's load_state_dict (a documented difference of every path), so
# NAdam's round trips stay within optimlab
ROUND_TRIPS = [(case, direction) for case in [*FUSED_CASES[::2], FUSED_CASES[3],
                                             Case("adagrad", Adagrad, {"lr": 0.1}, torch.optim.Adagrad)]
               for direction in ("flat-to-plain", "plain-to-flat", "flat-to-torch", "torch-to-flat")
               if not (case.optimizer is NAdam and "torch" in direction)]


@pytest.mark.parametrize("case,direction", ROUND_TRIPS, ids=[f"{c.id}-{d}" for c, d in ROUND_TRIPS])
def test_checkpoint_round_trips(case: Case, direction: str) -> None:
    """Six steps on one side, its state_dict through torch.save / torch.load(weights_only=True) into the other,
    six more steps: equal, bit for bit, to twelve uninterrupted reference steps between optimlab's paths, and
    within the matrix's float64 tolerance of them when torch.optim takes part (its operations differ)."""
    dtype = torch.float64
    source_flat, target_flat = direction.startswith("flat"), direction.endswith("flat")
    uses_torch = "torch" in direction
    reference, reference_params = _build(case, dtype, flat=False, **_foreach_option(case))
    _run(reference, reference_params, range(STEPS))

    def make(flat: bool, torch_side: bool) -> tuple[torch.optim.Optimizer, list[torch.Tensor]]:
        if not torch_side:
            return _build(case, dtype, flat=flat, **_foreach_option(case))
        params = _params("torch", dtype)
        kwargs = dict(case.kwargs, foreach=False)
        lr = kwargs.pop("lr")
        return case.reference(_groups(params, lr), lr=lr, **kwargs), params

    first, first_params = make(source_flat, uses_torch and not source_flat)
    _run(first, first_params, range(STEPS // 2))
    second, second_params = make(target_flat, uses_torch and not target_flat)
    with torch.no_grad():
        for target, source in zip(second_params, first_params):
            target.copy_(source)
    second.load_state_dict(_checkpoint(first))
    _run(second, second_params, range(STEPS // 2, STEPS))
    for actual, expected in ((second_params, reference_params), (_state_values(second), _state_values(reference))):
        assert len(actual) == len(expected) > 0
        for a, e in zip(actual, expected):
            if uses_torch:
                assert ((a - e).abs().max() / e.abs().max().clamp_min(1e-30)).item() <= case.tolerance
            else:
                assert torch.equal(a, e)
    if target_flat:  # the loaded state lives in the buffers again
        exp_avg = next(iter(second.state.values()))
        buffers = {t.untyped_storage().data_ptr() for s in second.state.values() for t in s.values() if t.dim()}
        assert len(buffers) <= len(exp_avg) * 3  # a few buffers per group, not one per tensor


def test_state_dict_entries_are_views_of_the_flat_state() -> None:
    params = [torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(5))]
    optimizer = flatten_parameters(Adam(params, lr=0.1))
    for p in params:
        p.grad = torch.ones_like(p)
    optimizer.step()
    state = optimizer.state_dict()["state"]
    assert state[0]["exp_avg"].shape == (4, 3) and state[1]["exp_avg"].shape == (5,)
    assert state[0]["step"].shape == () and state[0]["step"].item() == 1.0
    assert state[0]["exp_avg"].untyped_storage().data_ptr() == state[1]["exp_avg"].untyped_storage().data_ptr()
    assert state[0]["step"].untyped_storage().data_ptr() == state[1]["step"].untyped_storage().data_ptr()


class _Tied(torch.nn.Module):
    """An embedding whose weight is also the output projection (one Parameter, two uses), and a frozen-able head."""

    def __init__(self) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(3)
        self.embedding = torch.nn.Embedding(11, 6)
        self.hidden = torch.nn.Linear(6, 6)
        self.norm = torch.nn.LayerNorm(6)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=generator))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.norm(torch.tanh(self.hidden(self.embedding(tokens)))) @ self.embedding.weight.t()


@pytest.mark.parametrize("set_to_none", [True, False])
def test_tied_weights_and_autograd_gradients_in_the_buffer(set_to_none: bool) -> None:
    """A model with tied weights trained by autograd: the flat and the ordinary optimizer stay equal bit for bit;
    gradients live in the flat buffer after each step (re-pointed after zero_grad(set_to_none=True),
    accumulated in place otherwise), and the tie holds."""
    tokens = torch.randint(0, 11, (4, 5), generator=torch.Generator().manual_seed(1))
    models = [_Tied().double(), _Tied().double()]
    optimizers = [flatten_parameters(AdamW(models[0].parameters(), lr=0.05, weight_decay=0.1, foreach=False)),
                  AdamW(models[1].parameters(), lr=0.05, weight_decay=0.1, foreach=False)]
    flat_group = optimizers[0]._flat_groups[0]
    for step in range(6):
        for model, optimizer in zip(models, optimizers):
            model.hidden.requires_grad_(step not in (2, 3))
            optimizer.zero_grad(set_to_none=set_to_none)
            torch.nn.functional.cross_entropy(model(tokens).reshape(-1, 11), tokens.reshape(-1)).backward()
            optimizer.step()
        in_buffer = [p.grad is view for p, view in zip(models[0].parameters(), flat_group.buckets[0].grad_views)]
        frozen = set_to_none and step in (2, 3)  # the hidden layer's weight and bias have no gradient then
        assert in_buffer == ([True, False, False, True, True] if frozen else [True] * 5)
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        assert torch.equal(a, b)
    assert models[0].embedding.weight.data_ptr() == flat_group.buckets[0].param.data_ptr()
    if not set_to_none:
        before = models[0].embedding.weight.grad
        models[0](tokens).sum().backward()  # accumulates into the buffer: no new tensor
        assert models[0].embedding.weight.grad is before


def test_refuses_what_it_cannot_flatten() -> None:
    def params() -> list[torch.nn.Parameter]:
        return [torch.nn.Parameter(torch.randn(3, 2)), torch.nn.Parameter(torch.randn(4))]

    with pytest.raises(ValueError, match="LAMB is not supported"):
        flatten_parameters(LAMB(params(), lr=0.1))
    with pytest.raises(ValueError, match="param group 0 has cautious=True"):
        flatten_parameters(AdamW(params(), lr=0.1, cautious=True))
    with pytest.raises(ValueError, match="state_dtype='bfloat16'"):
        flatten_parameters(Adam(params(), lr=0.1, state_dtype="bfloat16"))
    base = torch.randn(10)
    with pytest.raises(ValueError, match="parameter 1 of param group 0 .* is a view"):
        flatten_parameters(SGD([torch.nn.Parameter(torch.randn(2)), base[2:5]], lr=0.1))
    shared = torch.nn.Parameter(torch.randn(6))
    alias = torch.nn.Parameter(shared.data)
    with pytest.raises(ValueError, match="shares its storage with another parameter"):
        flatten_parameters(SGD([shared, alias], lr=0.1))


def test_a_parameter_replaced_after_flattening_is_an_error_until_flattened_again() -> None:
    params = [torch.nn.Parameter(torch.randn(3, 2)), torch.nn.Parameter(torch.randn(4))]
    optimizer = flatten_parameters(SGD(params, lr=0.1, momentum=0.9))
    for p in params:
        p.grad = torch.ones_like(p)
    optimizer.step()
    params[1].data = torch.zeros(4)
    with pytest.raises(RuntimeError, match=r"parameter 1 \(shape \(4,\)\) of param group 0 no longer lives"):
        optimizer.step()
    momentum = optimizer.state[params[0]]["momentum_buffer"].clone()
    flatten_parameters(optimizer)  # adopts the new tensor and keeps the state
    params[1].grad = torch.ones(4)
    optimizer.step()
    assert torch.equal(params[1], torch.full((4,), -0.1 * 1.9))
    assert torch.equal(optimizer.state[params[0]]["momentum_buffer"], momentum * 0.9 + 1)


def test_sparse_gradient_is_refused() -> None:
    param = torch.nn.Parameter(torch.randn(5, 2))
    optimizer = flatten_parameters(SGD([param], lr=0.1))
    param.grad = torch.eye(5, 2).to_sparse()
    with pytest.raises(RuntimeError, match="sparse gradient"):
        optimizer.step()


def test_group_added_after_flattening_steps_as_usual_and_is_flattened_on_request() -> None:
    first, second = torch.nn.Parameter(torch.randn(3)), torch.nn.Parameter(torch.randn(2, 2))
    optimizer = flatten_parameters(NAdam([first], lr=0.1))
    optimizer.add_param_group({"params": [second]})
    for p in (first, second):
        p.grad = torch.ones_like(p)
    optimizer.step()
    assert optimizer.state[second]["exp_avg"]._base is None  # not flat yet
    flatten_parameters(optimizer)
    optimizer.step()
    assert optimizer.state[second]["exp_avg"]._base is not None
    assert optimizer.state[second]["step"].item() == 2.0
