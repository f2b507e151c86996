"""optimlab.clip: parity with torch.nn.utils' clipping, the percentile clippers, AGC, and make_clipper."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from optimlab.clip import (
    AdaptiveClipper,
    AGCClipper,
    AutoClip,
    ClipResult,
    NoClip,
    NormClipper,
    ValueClipper,
    adaptive_grad_clip_,
    clip_grad_norm_,
    clip_grad_value_,
    make_clipper,
    total_grad_norm,
)

NORM_TYPES = [1.0, 2.0, math.inf, 0.5, 3.5]
FOREACH = [None, True, False]


def random_parameters(seed: int, dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
    """A random set of parameters: mixed shapes (0-dim, vectors, matrices, a non-contiguous one), some
    without a gradient, gradient scales spread over several orders of magnitude."""
    generator = torch.Generator().manual_seed(seed)
    count = int(torch.randint(1, 7, (1,), generator=generator))
    shapes = [(), (5,), (3, 4), (2, 3, 4), (7, 1), (1,)]
    params = []
    for index in range(count):
        shape = shapes[int(torch.randint(0, len(shapes), (1,), generator=generator))]
        param = torch.randn(shape, generator=generator, dtype=dtype).requires_grad_()
        has_grad = index == 0 or bool(torch.rand(1, generator=generator) < 0.8)
        if has_grad:
            scale = 10.0 ** float(torch.empty(1).uniform_(-2, 2, generator=generator))
            grad = torch.randn(shape, generator=generator, dtype=dtype) * scale
            if grad.dim() == 2 and bool(torch.rand(1, generator=generator) < 0.5):
                grad = torch.randn(shape[::-1], generator=generator, dtype=dtype).t() * scale  # non-contiguous
            param.grad = grad
        params.append(param)
    return params


def clone_with_grads(params: list[torch.Tensor]) -> list[torch.Tensor]:
    clones = []
    for param in params:
        clone = param.detach().clone().requires_grad_()
        clone.grad = None if param.grad is None else param.grad.clone()
        clones.append(clone)
    return clones


def assert_grads_equal(ours: list[torch.Tensor], reference: list[torch.Tensor]) -> None:
    """Bitwise equality of the gradients (same kernels in the same order as torch, so no tolerance is needed)."""
    for mine, theirs in zip(ours, reference):
        assert (mine.grad is None) == (theirs.grad is None)
        if mine.grad is not None:
            torch.testing.assert_close(mine.grad, theirs.grad, rtol=0.0, atol=0.0)


@pytest.mark.parametrize("foreach", FOREACH)
@pytest.mark.parametrize("norm_type", NORM_TYPES)
def test_clip_grad_norm_matches_torch(norm_type: float, foreach: bool | None) -> None:
    for seed in range(25):
        for dtype in (torch.float32, torch.float64):
            ours = random_parameters(seed, dtype)
            reference = clone_with_grads(ours)
            grad_norm = torch.linalg.vector_norm(
                torch.cat([p.grad.flatten() for p in ours if p.grad is not None]), norm_type)
            max_norm = float(grad_norm) * (0.5 if seed % 2 else 2.0)  # half the sets are clipped, half untouched
            total_ours = clip_grad_norm_(ours, max_norm, norm_type, foreach=foreach)
            total_torch = torch.nn.utils.clip_grad_norm_(reference, max_norm, norm_type, foreach=foreach)
            torch.testing.assert_close(total_ours, total_torch, rtol=0.0, atol=0.0)
            assert_grads_equal(ours, reference)


@pytest.mark.parametrize("foreach", FOREACH)
def test_clip_grad_value_matches_torch(foreach: bool | None) -> None:
    for seed in range(25):
        ours = random_parameters(seed)
        reference = clone_with_grads(ours)
        clip_value = 0.1 * (seed + 1)
        assert clip_grad_value_(ours, clip_value, foreach=foreach) is None
        torch.nn.utils.clip_grad_value_(reference, clip_value, foreach=foreach)
        assert_grads_equal(ours, reference)
        largest = max(float(p.grad.abs().max()) for p in ours if p.grad is not None)
        assert largest <= float(torch.tensor(clip_value, dtype=torch.float32))


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("foreach", [True, False])
def test_error_if_nonfinite(bad: float, foreach: bool) -> None:
    params = random_parameters(3)
    params[0].grad[(0,) * params[0].grad.dim()] = bad
    with pytest.raises(RuntimeError, match="non-finite"):
        clip_grad_norm_(params, 1.0, error_if_nonfinite=True, foreach=foreach)
    with pytest.raises(RuntimeError, match="non-finite"):
        torch.nn.utils.clip_grad_norm_(clone_with_grads(params), 1.0, error_if_nonfinite=True, foreach=foreach)
    # without the flag both scale by the non-finite norm, identically
    ours, reference = clone_with_grads(params), clone_with_grads(params)
    total = clip_grad_norm_(ours, 1.0, foreach=foreach)
    torch.testing.assert_close(total, torch.nn.utils.clip_grad_norm_(reference, 1.0, foreach=foreach), equal_nan=True)
    for mine, theirs in zip(ours, reference):
        if mine.grad is not None:
            torch.testing.assert_close(mine.grad, theirs.grad, equal_nan=True)


def test_single_tensor_empty_input_and_missing_grads() -> None:
    single = torch.randn(4, requires_grad=True)
    single.grad = torch.tensor([3.0, 4.0, 0.0, 0.0])
    assert float(clip_grad_norm_(single, 1.0)) == pytest.approx(5.0)
    torch.testing.assert_close(single.grad, torch.tensor([3.0, 4.0, 0.0, 0.0]) / (5.0 + 1e-6))
    assert float(clip_grad_norm_([], 1.0)) == 0.0
    with pytest.warns(UserWarning, match="empty generator"):
        assert float(clip_grad_norm_((p for p in []), 1.0)) == 0.0
    no_grad = torch.randn(3, requires_grad=True)
    assert float(clip_grad_norm_([no_grad], 1.0)) == 0.0
    assert no_grad.grad is None
    clip_grad_value_(single, 0.1)
    assert float(single.grad.abs().max()) == pytest.approx(0.1)


def test_total_grad_norm_foreach_true_rejects_unsupported_device() -> None:
    meta = torch.empty(3, device="meta")
    with pytest.raises(RuntimeError, match="foreach=True"):
        total_grad_norm([meta], foreach=True)


def fill_grads(params: list[torch.Tensor], norm: float) -> None:
    """Give ``params`` a fixed-direction gradient whose total L2 norm is ``norm``."""
    direction = [torch.ones_like(p) for p in params]
    length = math.sqrt(sum(d.numel() for d in direction))
    for param, d in zip(params, direction):
        param.grad = d * (norm / length)


def test_adaptive_clipper_waits_for_history_then_clips_to_numpy_percentile() -> None:
    params = [torch.zeros(3, requires_grad=True), torch.zeros(2, 2, requires_grad=True)]
    clipper = AdaptiveClipper(params, percentile=20, history_size=8, min_history=5)
    rng = np.random.default_rng(0)
    norms = rng.lognormal(0.0, 1.0, size=30)
    seen: list[float] = []
    for step, norm in enumerate(norms):
        fill_grads(params, float(norm))
        result = clipper.step()
        seen.append(float(norm))
        window = seen[-8:]
        assert result.norm == pytest.approx(norm, rel=1e-6)
        if step + 1 < 5:
            assert result == ClipResult(False, result.norm, None)
            continue
        expected = float(np.percentile(np.asarray(window, dtype=np.float32).astype(np.float64), 80))
        assert result.threshold == pytest.approx(expected, rel=1e-6)
        assert result.clipped == (result.norm > result.threshold)
        after = float(total_grad_norm([p.grad for p in params]))
        assert after == pytest.approx(min(result.norm, result.threshold), rel=1e-5)
    assert len(clipper.history) == 8


def test_adaptive_clipper_state_dict_round_trip_and_skips_nonfinite() -> None:
    params = [torch.zeros(4, requires_grad=True)]
    clipper = AdaptiveClipper(params, percentile=10, history_size=6, min_history=3)
    for norm in (1.0, 2.0, 3.0, 4.0):
        fill_grads(params, norm)
        clipper.step()
    fill_grads(params, 1.0)
    params[0].grad[0] = math.nan
    assert not clipper.step().clipped
    state = clipper.state_dict()
    assert len(state["history"]) == 4
    restored = AdaptiveClipper(params, percentile=50, history_size=2, min_history=1)
    restored.load_state_dict(state)
    assert restored.state_dict() == state
    for norm in (10.0, 0.5, 7.0):
        fill_grads(params, norm)
        first = clipper.step()
        fill_grads(params, norm)
        assert restored.step() == first


def test_autoclip_is_the_pth_percentile_of_all_norms() -> None:
    params = [torch.zeros(5, requires_grad=True)]
    clipper = AutoClip(params, clip_percentile=25)
    norms = [5.0, 1.0, 3.0, 8.0, 2.0, 9.0, 4.0]
    for index, norm in enumerate(norms):
        fill_grads(params, norm)
        result = clipper.step()
        assert result.threshold == pytest.approx(float(np.percentile(norms[: index + 1], 25)), rel=1e-6)
        assert result.clipped == (result.norm > result.threshold)


def test_agc_hand_computed_example() -> None:
    weight = torch.tensor([[3.0, 4.0], [0.0, 0.0], [1.0, 0.0]], requires_grad=True)  # row norms 5, 0, 1
    bias = torch.tensor([0.6, 0.8], requires_grad=True)  # norm 1 (a vector: one unit)
    weight.grad = torch.tensor([[0.3, 0.4], [0.0, 1.0], [0.0, 0.05]])  # row norms 0.5, 1, 0.05
    bias.grad = torch.tensor([3.0, 4.0])  # norm 5
    clipped_units = adaptive_grad_clip_([weight, bias], clipping=0.2, eps=0.1)
    # row 0: 0.5/5 = 0.1 <= 0.2 kept; row 1: 1/max(0, 0.1) = 10 > 0.2 -> scaled to norm 0.2*0.1 = 0.02;
    # row 2: 0.05/1 = 0.05 kept; bias: 5/1 = 5 > 0.2 -> scaled to norm 0.2 * 1 = 0.2.
    torch.testing.assert_close(weight.grad, torch.tensor([[0.3, 0.4], [0.0, 0.02], [0.0, 0.05]]))
    torch.testing.assert_close(bias.grad, torch.tensor([0.12, 0.16]))
    assert clipped_units == 2


def test_agc_conv_kernel_units_are_output_channels() -> None:
    kernel = torch.randn(4, 3, 2, 2, requires_grad=True)
    kernel.grad = torch.randn(4, 3, 2, 2) * 10
    expected = kernel.grad.clone()
    for channel in range(4):
        weight_norm = max(float(kernel.detach()[channel].norm()), 1e-3)
        ratio = float(expected[channel].norm()) / weight_norm
        if ratio > 0.05:
            expected[channel] *= 0.05 / ratio
    adaptive_grad_clip_([kernel], clipping=0.05)
    torch.testing.assert_close(kernel.grad, expected, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize(
    ("spec", "kind"),
    [("none", NoClip), ("norm:1.0", NormClipper), ("value:0.5", ValueClipper), ("adaptive:10", AdaptiveClipper),
     ("autoclip:10", AutoClip), ("agc:0.01", AGCClipper), (" Norm:2 ", NormClipper)],
)
def test_make_clipper_builds_each_kind(spec: str, kind: type) -> None:
    params = [torch.randn(3, 3, requires_grad=True)]
    params[0].grad = torch.full((3, 3), 2.0)
    clipper = make_clipper(spec, params)
    assert type(clipper) is kind
    result = clipper.step()
    assert result.norm == pytest.approx(6.0)
    clipper.load_state_dict(clipper.state_dict())


def test_make_clipper_results() -> None:
    params = [torch.zeros(4, requires_grad=True)]
    params[0].grad = torch.tensor([2.0, -1.0, 0.25, 0.0])
    result = make_clipper("value:0.5", params).step()
    assert result == ClipResult(True, pytest.approx(math.sqrt(5.0625)), 0.5)
    torch.testing.assert_close(params[0].grad, torch.tensor([0.5, -0.5, 0.25, 0.0]))
    result = make_clipper("norm:10", params).step()
    assert not result.clipped and result.threshold == 10.0
    assert not make_clipper("none", params).step().clipped


@pytest.mark.parametrize("spec", ["", "norm", "norm:abc", "norm:-1", "value:0", "adaptive:100", "clip:1",
                                  "none:3", "agc:nan", "autoclip:0"])
def test_make_clipper_rejects_bad_specs_listing_valid_forms(spec: str) -> None:
    with pytest.raises(ValueError, match="Valid forms:.*norm:MAX_NORM.*agc:CLIPPING"):
        make_clipper(spec, [torch.zeros(1, requires_grad=True)])


def test_bad_arguments_name_the_argument() -> None:
    params = [torch.zeros(1, requires_grad=True)]
    with pytest.raises(ValueError, match="percentile"):
        AdaptiveClipper(params, percentile=-1)
    with pytest.raises(ValueError, match="history_size"):
        AdaptiveClipper(params, history_size=0)
    with pytest.raises(ValueError, match="min_history"):
        AdaptiveClipper(params, history_size=5, min_history=6)
    with pytest.raises(ValueError, match="clipping"):
        adaptive_grad_clip_(params, clipping=0.0)
    with pytest.raises(ValueError, match="max_norm"):
        NormClipper(params, max_norm=math.inf)
