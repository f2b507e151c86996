"""The one door to torch's private APIs: each use sits behind a probe, with a fallback and one warning.

optimlab relies on a few torch internals that have no public equivalent. Each is reached only through a
function here, which probes once (on first use) that the internal exists and behaves as expected on this
torch; where the probe fails, the function falls back to a public-API equivalent (or to doing without) and
warns once (``RuntimeWarning``), instead of an ``ImportError`` or an ``AttributeError`` deep in a step.

* :func:`group_tensors_by_device_and_dtype`: ``torch.optim.Optimizer._group_tensors_by_device_and_dtype``
  (the multi-tensor paths' batching); fallback: the same grouping in Python.
* :func:`privateuse1_backend_name`: ``torch._C._get_privateuse1_backend_name`` (the foreach-capable custom
  device); fallback: torch's default name ``"privateuseone"``.
* :func:`scheduler_calls_initial_step` and :func:`optimizer_step_called`: ``LRScheduler``'s private protocol
  (its constructor calls ``self._initial_step()``, counts ``_step_count`` and wraps ``optimizer.step`` to set
  ``optimizer._opt_called``, the wrapper marked ``_wrapped_by_lr_sched``); fallbacks: optimlab's schedules
  run their initial step themselves, and the "scheduler stepped before the optimizer" warning is skipped.
* The compiler internals of the fused step (:mod:`optimlab.optim._fused`, :mod:`optimlab.optim.lowp_state`):
  :func:`dynamo_supported` (``torch._dynamo.is_dynamo_supported``; fallback: not supported, so fused steps
  run unfused), :func:`inductor_compile` (``torch._inductor.compile_fx.compile_fx``, the backend; fallback:
  the traced graph runs uncompiled), :func:`inductor_default_cache_dir` (fallback: ``None``, only an unset
  ``TORCHINDUCTOR_CACHE_DIR`` is replaced), :func:`dynamo_options` (Dynamo's recompile limit under its
  name since torch 2.6 or before, ``specialize_float``, FX's ``use_duck_shape``; fallback: Dynamo's
  defaults), :func:`inductor_options` (``torch._inductor.config``; fallback: Inductor's defaults) and
  :func:`graph_input_expression` (the source Dynamo records on a graph input; fallback: ``None``, so the
  fused step keeps calling through Dynamo's guards).
"""

from __future__ import annotations

import contextlib
import functools
import warnings
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import torch
from torch import Tensor

__all__ = [
    "dynamo_options",
    "dynamo_supported",
    "graph_input_expression",
    "group_tensors_by_device_and_dtype",
    "inductor_compile",
    "inductor_default_cache_dir",
    "inductor_options",
    "optimizer_step_called",
    "privateuse1_backend_name",
    "reset_probes",
    "scheduler_calls_initial_step",
]

_T = TypeVar("_T")
_PROBES: list[Any] = []


def reset_probes() -> None:
    """Forget every probe's cached result, so the next use probes again (tests that remove an internal)."""
    for probe in _PROBES:
        probe.cache_clear()


def _probed(api: str, instead: str, fallback_value: Callable[[], _T]) -> Callable[[Callable[[], _T]], Callable[[], _T]]:
    """Decorator for a probe: it runs once (its result is cached); if it raises, one ``RuntimeWarning`` says
    that this torch lacks ``api`` and what optimlab does ``instead``, and ``fallback_value()`` is cached."""

    def decorate(probe: Callable[[], _T]) -> Callable[[], _T]:
        @functools.cache
        def run() -> _T:
            try:
                return probe()
            except Exception as error:  # any failure of a private API means: use the fallback
                warnings.warn(f"optimlab: torch {torch.__version__} does not provide {api} as expected "
                              f"({type(error).__name__}: {error}); {instead}", RuntimeWarning, stacklevel=3)
                return fallback_value()

        _PROBES.append(run)
        return run

    return decorate


def _python_grouping(tensor_lists: list[list[Tensor | None]]) -> dict:
    """``{(device, dtype): (lists, indices)}`` over the first list's tensors, in order (the fallback)."""
    groups: dict[tuple[torch.device, torch.dtype], tuple[list[list[Any]], list[int]]] = {}
    for index, tensor in enumerate(tensor_lists[0]):
        lists, indices = groups.setdefault((tensor.device, tensor.dtype), ([[] for _ in tensor_lists], []))
        for grouped, source in zip(lists, tensor_lists):
            if source:
                grouped.append(source[index])
        indices.append(index)
    return groups


def _torch_grouping(tensor_lists: list[list[Tensor | None]]) -> dict:
    return torch.optim.Optimizer._group_tensors_by_device_and_dtype(  # type: ignore[arg-type]
        tensor_lists, with_indices=True)


@_probed("Optimizer._group_tensors_by_device_and_dtype", "grouping tensors in Python (slower multi-tensor steps)",
         lambda: _python_grouping)
def _grouping() -> Callable[[list[list[Tensor | None]]], dict]:
    sample = [[torch.zeros(1), torch.zeros(1, dtype=torch.float64), torch.ones(1)], []]
    if not _same_groups(_torch_grouping(sample), sample):
        raise TypeError("its result is not {(device, dtype): (lists, indices)}")
    return _torch_grouping


def _same_groups(groups: dict, sample: list[list[Tensor | None]]) -> bool:
    expected = _python_grouping(sample)
    if set(groups) != set(expected):
        return False
    for key, (lists, indices) in groups.items():
        want_lists, want_indices = expected[key]
        if list(indices) != want_indices or len(lists) != len(want_lists):
            return False
        for got, want in zip(lists, want_lists):
            if len(got) != len(want) or any(a is not b for a, b in zip(got, want)):
                return False
    return True


def group_tensors_by_device_and_dtype(tensor_lists: list[list[Tensor | None]]) -> dict:
    """Group parallel tensor lists by the (device, dtype) of the first list's tensors.

    Returns ``{(device, dtype): (lists, indices)}``: ``lists`` parallel to ``tensor_lists`` (an empty input
    list stays empty in every group), ``indices`` the positions of the group's tensors in the inputs.
    """
    return _grouping()(tensor_lists)


@_probed("torch._C._get_privateuse1_backend_name", "assuming the default name 'privateuseone'",
         lambda: "privateuseone")
def privateuse1_backend_name() -> str:
    """The device type name of torch's private-use backend (``"privateuseone"`` unless renamed)."""
    name = torch._C._get_privateuse1_backend_name()
    if not isinstance(name, str):
        raise TypeError(f"expected a str, got {type(name).__name__}")
    return name


class _ProbeOptimizer(torch.optim.Optimizer):
    def __init__(self) -> None:
        super().__init__([torch.zeros(1, requires_grad=True)], {"lr": 0.0})

    def step(self, closure: Any = None) -> None:
        return None


@_probed("LRScheduler's private protocol (_initial_step, _step_count, optimizer._opt_called)",
         "optimlab schedules run their initial step themselves and skip the 'lr_scheduler.step() before "
         "optimizer.step()' warning", lambda: False)
def scheduler_calls_initial_step() -> bool:
    """Whether ``LRScheduler.__init__`` calls ``self._initial_step()`` (which then sets ``_step_count``) and
    wraps ``optimizer.step`` to record its calls (``optimizer._opt_called``, ``step._wrapped_by_lr_sched``),
    as torch 2.x does; optimlab's schedules override ``_initial_step`` and read the record."""
    calls: list[str] = []

    class Probe(torch.optim.lr_scheduler.LRScheduler):
        def _initial_step(self) -> None:
            calls.append("initial")
            super()._initial_step()

        def get_lr(self) -> list[float]:
            return [group["lr"] for group in self.optimizer.param_groups]

    optimizer = _ProbeOptimizer()
    scheduler = Probe(optimizer)
    stepped_before = getattr(optimizer, "_opt_called", False)
    optimizer.step()
    if not (calls == ["initial"] and scheduler._step_count == 1 and optimizer.step._wrapped_by_lr_sched
            and not stepped_before and optimizer._opt_called is True):
        raise AttributeError(f"initial step calls {calls}, _step_count {scheduler._step_count}")
    return True


def optimizer_step_called(optimizer: torch.optim.Optimizer) -> bool | None:
    """Whether ``optimizer.step()`` ran since an ``LRScheduler`` was built on it: ``True``/``False``, or
    ``None`` when ``step`` was replaced after the scheduler was built (torch's two warnings); ``True`` where
    this torch does not record it (nothing to warn about)."""
    if not scheduler_calls_initial_step():
        return True
    if not getattr(optimizer.step, "_wrapped_by_lr_sched", False):
        return None
    return bool(getattr(optimizer, "_opt_called", False))


# --- the compiler internals of the fused step -------------------------------------------------------------


@_probed("torch._dynamo.is_dynamo_supported", "treating torch.compile as unavailable (fused steps run unfused)",
         lambda: False)
def dynamo_supported() -> bool:
    """Whether TorchDynamo supports this Python and platform."""
    import torch._dynamo

    return bool(torch._dynamo.is_dynamo_supported())


def _run_graph_uncompiled(graph_module: torch.fx.GraphModule, example_inputs: list[Any]) -> Callable[..., Any]:
    return graph_module.forward


@_probed("torch._inductor.compile_fx.compile_fx", "running the traced graphs of fused steps uncompiled "
         "(the same results, slower)", lambda: _run_graph_uncompiled)
def _compile_fx() -> Callable[..., Any]:
    from torch._inductor.compile_fx import compile_fx

    if not callable(compile_fx):
        raise TypeError("compile_fx is not callable")
    return compile_fx


def inductor_compile(graph_module: torch.fx.GraphModule, example_inputs: list[Any]) -> Callable[..., Any]:
    """Inductor's compiler for a graph Dynamo traced (what ``backend="inductor"`` calls)."""
    return _compile_fx()(graph_module, example_inputs)


@_probed("torch._inductor.runtime.cache_dir_utils.default_cache_dir",
         "replacing TORCHINDUCTOR_CACHE_DIR only when it is unset", lambda: None)
def inductor_default_cache_dir() -> str | None:
    """The folder Inductor caches kernels in when ``TORCHINDUCTOR_CACHE_DIR`` is not set."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    return str(default_cache_dir())


@_probed("Dynamo's recompile limit option and FX's use_duck_shape", "compiling fused steps with Dynamo's "
         "default options (equal sizes share a symbol; more recompiles)", lambda: None)
def _dynamo_configs() -> tuple[Any, Any, str, bool]:
    import torch._dynamo.config as dynamo_config
    import torch.fx.experimental._config as fx_config

    limit = next((name for name in ("recompile_limit", "cache_size_limit") if hasattr(dynamo_config, name)), None)
    if limit is None or not hasattr(fx_config, "use_duck_shape"):
        raise AttributeError("neither recompile_limit nor cache_size_limit, or no use_duck_shape")
    return dynamo_config, fx_config, limit, hasattr(dynamo_config, "specialize_float")


@contextlib.contextmanager
def dynamo_options(recompile_limit: int) -> Iterator[None]:
    """While Dynamo compiles: up to ``recompile_limit`` graphs per code object (``recompile_limit``, called
    ``cache_size_limit`` before torch 2.6), float constants specialised (``specialize_float``, where this
    torch has it), and sizes that happen to be equal kept as separate symbols (``use_duck_shape=False``)."""
    configs = _dynamo_configs()
    if configs is None:
        yield
        return
    dynamo_config, fx_config, limit, has_specialize_float = configs
    options: dict[str, Any] = {limit: recompile_limit}
    if has_specialize_float:
        options["specialize_float"] = True
    with dynamo_config.patch(**options), fx_config.patch(use_duck_shape=False):
        yield


@_probed("torch._inductor.config", "compiling with Inductor's default options", lambda: None)
def _inductor_config() -> Any:
    import torch._inductor.config as inductor_config

    if not callable(getattr(inductor_config, "patch", None)):
        raise AttributeError("torch._inductor.config has no patch()")
    return inductor_config


def inductor_options(**options: Any) -> contextlib.AbstractContextManager[Any]:
    """Inductor's options set while it compiles; those this torch does not have are left out."""
    config = _inductor_config()
    if config is None:
        return contextlib.nullcontext()
    return config.patch(**{name: value for name, value in options.items() if hasattr(config, name)})


_missing_sources: list[str] = []


def graph_input_expression(node: torch.fx.Node) -> tuple[str, bool] | None:
    """The expression Dynamo recorded for a graph input (``"L['tensor_lists'][0][3]"``) and whether Dynamo
    passes that value as a 0-dim tensor though it is a float; ``None`` when it is not recorded as such (then
    the fused step calls through Dynamo's guards; one warning when this torch records no sources at all)."""
    argument = node.meta.get("grapharg")
    source = getattr(argument, "source", None)
    if argument is None or source is None:
        if not _missing_sources:
            _missing_sources.append(node.name)
            warnings.warn(f"optimlab: torch {torch.__version__} records no source on the graph input "
                          f"{node.name!r} (node.meta['grapharg'].source); fused steps call through Dynamo's "
                          "guards (slower)", RuntimeWarning, stacklevel=2)
        return None
    name = getattr(source, "name", None)
    name = name() if callable(name) else name
    if not isinstance(name, str):
        return None
    return name, bool(getattr(argument, "pass_arg_as_tensor", False))
