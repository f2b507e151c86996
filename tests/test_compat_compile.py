"""``optimlab._compat``'s doors to the compiler internals of the fused step: silent on this torch, and a fused
step that still gives the eager results, with one warning, where Inductor's compiler is missing."""

from __future__ import annotations

import warnings
from collections.abc import Iterator

import pytest
import torch

from optimlab import _compat
from optimlab.optim._fused import FusedStep, fused_unavailable_reason

@pytest.fixture(autouse=True)
def fresh_probes() -> Iterator[None]:
    _compat.reset_probes()
    yield
    _compat.reset_probes()


def test_compiler_probes_pass_without_warning_on_this_torch() -> None:
    import torch._dynamo.config as dynamo_config
    from torch._inductor.compile_fx import compile_fx

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _compat.dynamo_supported() is True
        assert _compat._compile_fx() is compile_fx
        assert isinstance(_compat.inductor_default_cache_dir(), str)
        assert _compat._dynamo_configs()[2] == "recompile_limit"
        with _compat.dynamo_options(77):
            assert dynamo_config.recompile_limit == 77
        with _compat.inductor_options(realize_reads_threshold=1, no_such_option=3):  # unknown names left out
            assert _compat._inductor_config().realize_reads_threshold == 1


def _rule(param: torch.Tensor, grad: torch.Tensor, *, lr: torch.Tensor) -> None:
    param.add_(grad * grad, alpha=-lr)


@pytest.mark.skipif(fused_unavailable_reason("cpu") is not None, reason="no fused path here")
def test_fused_step_runs_uncompiled_with_one_warning_without_inductors_compiler(
        monkeypatch: pytest.MonkeyPatch) -> None:
    import torch._inductor.compile_fx as compile_fx_module

    monkeypatch.delattr(compile_fx_module, "compile_fx")
    params, grads = [torch.randn(6), torch.randn(9)], [torch.randn(6), torch.randn(9)]
    expected = [p - 0.1 * g * g for p, g in zip(params, grads)]
    step = FusedStep(_rule)
    with pytest.warns(RuntimeWarning, match=r"compile_fx.*uncompiled") as record:
        step([params, grads], {"lr": 0.1})
    assert len(record) == 1 and step.compiles == 1
    assert all(torch.allclose(p, e, rtol=0, atol=1e-6) for p, e in zip(params, expected))


def test_graph_input_without_a_recorded_source_is_none_with_one_warning(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_compat, "_missing_sources", [])
    graph = torch.fx.symbolic_trace(lambda x: x + 1).graph
    (node,) = graph.find_nodes(op="placeholder")
    with pytest.warns(RuntimeWarning, match="records no source") as record:
        assert _compat.graph_input_expression(node) is None
        assert _compat.graph_input_expression(node) is None
    assert len(record) == 1
