r"""The fused optimizer step: one optimizer's per-tensor rule compiled by ``torch.compile``.

An optimizer step is elementwise and memory-bound: Adam reads ``param``, ``grad``, ``exp_avg`` and
``exp_avg_sq`` and writes three of them, 28 bytes per fp32 parameter. The multi-tensor
(``torch._foreach_*``) path streams the whole model through memory once *per operation*; a fused
step streams it once per step. optimlab does not write a second copy of each rule for that: the
optimizer's own per-tensor update function (the same one its reference path applies) is traced by
TorchDynamo and compiled by Inductor, which emits one vectorised loop (C++/OpenMP on CPU, Triton on
GPU) per tensor with every operation of the rule fused into it.

How a step is applied (:meth:`FusedStep.__call__`):

1. the tensors are grouped by (device, dtype);
2. every step-dependent scalar (learning rate, bias corrections, ...) is passed as a 0-dim
   float64 tensor, so a new learning rate from a schedule is new *data*, never a recompile;
3. for an *elementwise* rule (``fused_step(..., elementwise=True)``: no reduction over a tensor),
   the tensors of at most :data:`PACK_NUMEL` values are packed into one flat buffer per argument and
   updated by one call (:class:`_PackCache`; the optimizer state is moved into those buffers once, so
   only parameters and gradients are copied per step);
4. the other tensors are flattened to 1-D views and go to the compiled function in chunks of
   :attr:`FusedStep.chunk_size`, compiled with symbolic sizes, so any model costs at most two graphs
   per (rule, device, dtype, arguments present): full chunks and the last, shorter chunk;
5. after its first call through Dynamo, a graph is called directly, its inputs read off the
   arguments (:meth:`FusedStep._call`), which skips Dynamo's per-call guard checks;
6. tensors that cannot be flattened (non-contiguous, or with fewer than two elements, whose sizes
   the compiler would specialise on) and are not packed are updated by the same rule uncompiled.

Compilation time is measured (:attr:`FusedStep.compile_seconds`) and Inductor's on-disk caches
keep compiled kernels between runs: ``TORCHINDUCTOR_CACHE_DIR`` defaults to
``~/.cache/optimlab/inductor/threads-N`` when the user has not set it (``N`` = ``torch.get_num_threads()``,
which Inductor bakes into CPU kernels without keying its cache on it). A process that changes its
thread count after its first fused step keeps the kernels it compiled.

Fallback: when ``OPTIMLAB_DISABLE_FUSED=1`` is set, or ``torch.compile`` cannot work here (no
C++ compiler for CPU tensors, unsupported platform or Python), :func:`fused_unavailable_reason`
says why and :func:`resolve_fused` warns once and returns ``False``; the optimizer then takes its
multi-tensor path. References: Ansel et al., "PyTorch 2: Faster Machine Learning Through Dynamic
Python Bytecode Transformation and Graph Compilation", ASPLOS 2024.
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
import time
import types
import warnings
import weakref
from collections.abc import Callable, Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from optimlab import _compat
from optimlab.optim._base import group_by_device_and_dtype
from optimlab.optim._dtensor import has_dtensor, local_lists

__all__ = [
    "DISABLE_ENV",
    "FusedStep",
    "fused_step",
    "fused_unavailable_reason",
    "resolve_fused",
    "split_by_value",
    "compile_stats",
]

_log = logging.getLogger(__name__)

DISABLE_ENV = "OPTIMLAB_DISABLE_FUSED"
"""Environment switch: ``OPTIMLAB_DISABLE_FUSED=1`` turns every fused path into the unfused (foreach) path."""

DEFAULT_CHUNK_SIZE = 8
RECOMPILE_LIMIT = 64
"""Graphs Dynamo may keep per rule: one per dtype, columns present and chunk length (Dynamo's default is 8)."""
PACK_NUMEL = 1 << 14
"""Tensors of at most this many values are packed into one call by elementwise rules (see :class:`_PackCache`)."""

_warned: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def _has_cpp_compiler() -> bool:
    compiler = os.environ.get("CXX")
    candidates = [compiler] if compiler else ["g++", "c++", "clang++"]
    return any(shutil.which(name) for name in candidates)


def fused_unavailable_reason(device: torch.device | str = "cpu") -> str | None:
    """Why the fused path cannot run on ``device`` here, or ``None`` when it can.

    Checked: the ``OPTIMLAB_DISABLE_FUSED`` switch, TorchDynamo support for this Python/platform, and
    a C++ compiler for CPU tensors (Inductor generates C++ there; Triton handles CUDA). The checks
    behind the switch are cached per device type and compiler lookup.
    """
    if os.environ.get(DISABLE_ENV, "").strip().lower() not in ("", "0", "false", "no"):
        return f"disabled by the environment ({DISABLE_ENV}={os.environ[DISABLE_ENV]})"
    return _platform_reason(torch.device(device).type, _has_cpp_compiler)


@functools.lru_cache(maxsize=None)
def _platform_reason(device_type: str, has_cpp_compiler: Callable[[], bool]) -> str | None:
    if not _compat.dynamo_supported():
        return "torch.compile is not supported on this platform / Python version"
    if device_type == "cpu" and not has_cpp_compiler():
        return "no C++ compiler found (Inductor needs one for CPU tensors; set CXX or install g++)"
    if device_type not in ("cpu", "cuda"):
        return f"no fused path for device type {device_type!r}"
    return None


def resolve_fused(fused: bool | None, params: Sequence[Tensor], optimizer_name: str) -> bool:
    """Decide whether a param group takes the fused path.

    ``fused=None`` (the default) resolves to ``False``: compiling costs seconds to a minute on first
    use, which a default must not impose (torch.optim makes the same choice on CPU). ``fused=True``
    resolves to ``True`` when :func:`fused_unavailable_reason` finds nothing against it on every
    parameter's device; otherwise it warns once (per reason) and falls back to ``False``, i.e. the
    optimizer's multi-tensor path. A group with sparse gradients keeps the per-tensor path.
    """
    if not fused or any(p.grad is not None and p.grad.is_sparse for p in params):
        return False  # sparse gradients keep the per-tensor path, which supports them
    for device in {p.device for p in params}:
        reason = fused_unavailable_reason(device)
        if reason is not None:
            _warn_once(f"{optimizer_name}(fused=True): the fused step is unavailable ({reason}); "
                       "falling back to the unfused path (foreach, or per-tensor where there is no foreach)")
            return False
    return True


def split_by_value(tensor_lists: Sequence[Sequence[Tensor]], values: Sequence[float]
                   ) -> list[tuple[float, list[list[Tensor]]]]:
    """Split parallel tensor lists by a per-tensor value (e.g. the step count, which differs for a
    parameter that had no gradient on some steps), so each part shares its step-dependent scalars."""
    parts: dict[float, list[int]] = {}
    for index, value in enumerate(values):
        parts.setdefault(value, []).append(index)
    return [(value, [[tensors[i] for i in indices] for tensors in tensor_lists]) for value, indices in parts.items()]


def _ensure_cache_dir() -> None:
    """Point Inductor's on-disk cache at ``~/.cache/optimlab/inductor/threads-N`` unless the user chose a folder.

    Importing Inductor sets ``TORCHINDUCTOR_CACHE_DIR`` to its default (a per-user folder in /tmp, lost
    on reboot); only that default, or a folder of ours, is replaced. The thread count is part of the
    folder because Inductor decides at compile time whether a CPU loop runs on
    ``torch.get_num_threads()`` threads, and its cache key leaves that number out: a kernel cached by
    a one-thread process (such as the test suite) would otherwise run on one thread everywhere after.
    """
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "optimlab" / "inductor"
    current = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if current in (None, "", _compat.inductor_default_cache_dir()) or Path(current).parent == base:
        path = base / f"threads-{torch.get_num_threads()}"
        path.mkdir(parents=True, exist_ok=True)
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(path)


def _apply_chunk(update: Callable[..., None], tensor_lists: tuple[list[Tensor] | None, ...],
                 scalars: dict[str, Tensor], static: dict[str, Any]) -> None:
    for index in range(len(tensor_lists[0])):  # type: ignore[arg-type]
        update(*[None if column is None else column[index] for column in tensor_lists], **scalars, **static)


class FusedStep:
    r"""One per-tensor update rule, compiled once and applied to lists of tensors.

    Args:
        update: ``update(param, grad, *state, **scalars, **static)``: the optimizer's rule for one
            tensor, written with in-place tensor operations. Every value in ``scalars`` arrives as a
            0-dim float64 tensor (torch accepts those as ``alpha=`` / ``value=`` too), so the rule
            must not branch on them; ``static`` values (booleans such as ``maximize``, or a weight
            decay the rule tests against zero) are compile-time constants.
        static: the constant keyword arguments; one :class:`FusedStep` per distinct value.
        chunk_size: tensors per compiled call (see the module docstring).
        elementwise: the rule treats every element on its own (no reduction over a tensor), so tensors
            may be concatenated and updated by one call; every argument must then have the
            parameter's dtype (the packed buffers are allocated in it).

    Attributes:
        compiles: how many graphs have been compiled (a recompile would increase it).
        compile_seconds: wall time of the calls that compiled, in seconds.
    """

    def __init__(self, update: Callable[..., None], static: Mapping[str, Hashable] | None = None,
                 chunk_size: int = DEFAULT_CHUNK_SIZE, *, elementwise: bool = False) -> None:
        if chunk_size < 1:
            raise ValueError(f"Invalid chunk_size: {chunk_size} (accepted range: >= 1)")
        self.update = update
        self.static = dict(static or {})
        self.chunk_size = int(chunk_size)
        self.elementwise = bool(elementwise)
        self._packs = _PackCache()
        # compiled graphs (and their input extractors) per call structure, and the graph to call directly per
        # (structure, shapes) that has been through Dynamo's guards (see _call)
        self._graphs: dict[Hashable, list[tuple[Callable[..., Any], Callable[[dict[str, Any]], list[Any]] | None]]] = {}
        self._direct: dict[Hashable, tuple[Callable[..., Any], Callable[[dict[str, Any]], list[Any]]]] = {}
        self._compiling: Hashable | None = None
        self.compiles = 0
        self.compile_seconds = 0.0
        # Dynamo keeps its compiled-code cache (and its recompile limit) per code object: give each rule its own.
        label = "".join(c if c.isalnum() else "_" for c in getattr(update, "__qualname__", "rule"))
        code = _apply_chunk.__code__.replace(co_name=f"fused_{label}")
        function = types.FunctionType(code, _apply_chunk.__globals__, f"fused_{label}")
        self._compiled = torch.compile(function, backend=self._backend, dynamic=True)

    def _backend(self, graph_module: torch.fx.GraphModule, example_inputs: list[Any]) -> Callable[..., Any]:
        self.compiles += 1
        _reject_known_miscompiles(graph_module, getattr(self.update, "__qualname__", "rule"))
        compiled = _compat.inductor_compile(graph_module, example_inputs)
        extract = _argument_extractor(graph_module)
        if extract is None:  # a developer's concern (the result is right, only slower): logged, not warned
            _log.info("fused rule %r: a graph input is not an argument of the call (a float default or a global "
                      "read by the rule?), so every call goes through Dynamo's guards; pass such values as "
                      "scalars or constants", getattr(self.update, "__qualname__", "rule"))
        if self._compiling is not None:
            self._graphs.setdefault(self._compiling, []).append((compiled, extract))
        return compiled

    def _call(self, columns: tuple[list[Tensor] | None, ...], scalar_tensors: dict[str, Tensor]) -> None:
        """One compiled call on lists of 1-D tensors (through Dynamo for a new layout, then directly).

        Dynamo checks its guards on every call, tens of microseconds for a few tensors. Its guards
        test the call's structure (device, which arguments are present, their dtypes, list lengths)
        and properties of the sizes; data and 0-dim scalars are graph inputs. So once a call has
        passed them, a call with the same structure and the same shapes would select the same graph,
        and when only one graph was ever compiled for that structure, it is known which: it is then
        called directly, its inputs read straight off the arguments. A model pays Dynamo's entry once
        per chunk layout; a training loop never again (grad mode must be off, as in ``step``).
        """
        first = next(column[0] for column in columns if column is not None)
        structure = shapes = None
        if not torch.is_grad_enabled():
            structure = (first.device, *(None if column is None else (column[0].dtype, len(column))
                                         for column in columns))
            shapes = (structure, *(t.shape for column in columns if column is not None for t in column))
            direct = self._direct.get(shapes)
            if direct is not None:
                compiled, extract = direct
                compiled(*extract({"update": self.update, "tensor_lists": columns, "scalars": scalar_tensors,
                                   "static": self.static}))
                return
        _ensure_cache_dir()
        self._compiling = structure
        try:
            # floats among the constant options (eps, Newton-Schulz coefficients) are constants, not inputs, and
            # sizes that happen to be equal stay separate symbols (no recompile when they differ later)
            with _compat.dynamo_options(RECOMPILE_LIMIT):
                self._compiled(self.update, columns, scalar_tensors, self.static)
        finally:
            self._compiling = None
        graphs = self._graphs.get(structure, [])
        if structure is not None and len(graphs) == 1 and graphs[0][1] is not None:
            self._direct[shapes] = graphs[0]  # type: ignore[assignment]

    def __call__(self, tensor_lists: Sequence[Sequence[Tensor] | None],
                 scalars: Mapping[str, float | Tensor]) -> None:
        """Apply the rule to ``zip(*tensor_lists)`` in place; ``scalars`` are floats or 0-dim tensors.

        A ``None`` entry of ``tensor_lists`` passes ``None`` for that argument of every call (an
        optional state buffer that this configuration does not keep). The second list holds the
        gradients, which the rule reads and never writes.
        """
        present = [i for i, column in enumerate(tensor_lists) if column is not None]
        if not present or not tensor_lists[present[0]]:
            return
        if has_dtensor(tensor_lists[present[0]]):  # sharded (FSDP2) parameters: see optimlab.optim._dtensor
            if not self.elementwise:  # a reduction over a shard is not one over the tensor: DTensor's ops do it
                _warn_once(f"fused {getattr(self.update, '__name__', 'rule')}: sharded (DTensor) parameters take "
                           "the uncompiled rule (it reduces over whole tensors; the compiler sees only shards)")
                _apply_chunk(self.update, tuple(tensor_lists), dict(scalars), self.static)  # type: ignore[arg-type]
                return
            tensor_lists = local_lists(tensor_lists)  # elementwise: the local shards are the whole update
        columns = [list(tensor_lists[i]) for i in present]  # type: ignore[arg-type]
        first = columns[0][0]
        if len({(t.device, t.dtype) for t in columns[0]}) == 1:  # the usual case: no regrouping needed
            grouped = {(first.device, first.dtype): (columns, None)}
        else:
            grouped = group_by_device_and_dtype(columns)
        compiles_before = self.compiles
        start = time.perf_counter()
        for (device, _dtype), (lists, _indices) in grouped.items():
            scalar_tensors = {name: torch.as_tensor(value, dtype=torch.float64, device=device).reshape(())
                              for name, value in scalars.items()}
            self._apply_group(present, len(tensor_lists), lists, scalars, scalar_tensors)
        if self.compiles != compiles_before:
            self.compile_seconds += time.perf_counter() - start

    def _apply_group(self, present: list[int], arity: int, lists: Sequence[Sequence[Tensor]],
                     scalars: Mapping[str, float | Tensor], scalar_tensors: dict[str, Tensor]) -> None:
        """One device and dtype: small tensors packed (elementwise rules), the rest in compiled chunks;
        a tensor left uncompiled gets the scalars as given (a 0-dim float64 tensor would make torch
        compute a 0-dim float32 tensor's update in float64)."""
        columns: list[list[Tensor] | None] = [None] * arity
        if self.elementwise:
            small = [index for index, tensor in enumerate(lists[0]) if tensor.numel() <= PACK_NUMEL]
            if len(small) > 1:
                def call(flats: list[Tensor]) -> None:
                    for position, flat in zip(present, flats):
                        columns[position] = [flat]
                    self._call(tuple(columns), scalar_tensors)

                if len(small) == len(lists[0]):
                    self._packs.run(lists, call)
                    return
                self._packs.run([[column[i] for i in small] for column in lists], call)
                large = [index for index, tensor in enumerate(lists[0]) if tensor.numel() > PACK_NUMEL]
                lists = [[column[i] for i in large] for column in lists]
        flat_chunk: list[tuple[Tensor, ...]] = []
        for tensors in zip(*lists):
            if tensors[0].numel() > 1 and all(t.is_contiguous() for t in tensors):
                flat_chunk.append(tuple(t.view(-1) for t in tensors))
            else:
                for position, tensor in zip(present, tensors):
                    columns[position] = [tensor]
                _apply_chunk(self.update, tuple(columns), dict(scalars), self.static)
        for begin in range(0, len(flat_chunk), self.chunk_size):
            for position, column in zip(present, zip(*flat_chunk[begin:begin + self.chunk_size])):
                columns[position] = list(column)
            self._call(tuple(columns), scalar_tensors)


_SUBTRACTIONS = {"sub", "sub_", "rsub", torch.sub, torch.rsub, torch.Tensor.sub, torch.Tensor.sub_,
                 torch._foreach_sub, torch._foreach_sub_}


def _reject_known_miscompiles(graph_module: torch.fx.GraphModule, rule: str) -> None:
    """Refuse rules that Inductor (torch 2.13) compiles wrongly.

    ``a.sub_(b, alpha=s)`` with ``s`` a graph input (a scalar passed as a 0-dim tensor) keeps the value
    of ``s`` from the first call, with no guard and no recompile; ``add_(b, alpha=-s)`` is correct and
    equal in eager mode, so rules are written that way.
    """
    for node in graph_module.graph.nodes:
        if node.target in _SUBTRACTIONS and isinstance(node.kwargs.get("alpha"), torch.fx.Node):
            raise ValueError(f"fused rule {rule!r} subtracts with a tensor alpha ({node.format_node()}), which "
                             "Inductor compiles to a constant; write x.add_(y, alpha=-s) instead")


def _argument_extractor(graph_module: torch.fx.GraphModule) -> Callable[[dict[str, Any]], list[Any]] | None:
    """A function from the compiled function's arguments (its frame locals) to the graph's inputs, read off
    the sources Dynamo records on the placeholders (``L['tensor_lists'][0][3]``, ``...size()[0]``);
    ``None`` when a source is not such a plain expression (then every call goes through Dynamo)."""
    expressions = []
    for node in graph_module.graph.find_nodes(op="placeholder"):
        recorded = _compat.graph_input_expression(node)
        if recorded is None or not recorded[0].startswith("L["):
            return None
        name, as_tensor = recorded
        if as_tensor:  # a float Dynamo turned into a 0-dim tensor
            name = f"_as_float64({name})"
        expressions.append(name)
    try:
        return eval(f"lambda L: [{', '.join(expressions)}]", {"_as_float64": _as_float64})  # noqa: S307
    except SyntaxError:
        return None


def _as_float64(value: float) -> Tensor:
    return torch.as_tensor(value, dtype=torch.float64)


class _Layout:
    """Flat 1-D buffers for one list of tensor shapes (one buffer per argument of the rule), and the views
    that map each buffer onto the shapes (row-major, so a copy between view and tensor is by index)."""

    def __init__(self, shapes: Sequence[torch.Size], arguments: int, dtype: torch.dtype, device: torch.device
                 ) -> None:
        sizes = [shape.numel() for shape in shapes]
        self.shapes = list(shapes)
        self.flats = [torch.empty(sum(sizes), dtype=dtype, device=device) for _ in range(arguments)]
        self.views = [[part.view(shape) for part, shape in zip(flat.split(sizes), shapes)] for flat in self.flats]
        self.pointers = [[view.data_ptr() for view in views] for views in self.views]
        self.inputs: _Layout | None = None  # for adopted state: the parameters' and gradients' buffers
        self.owner: weakref.ref[Tensor] | None = None  # for adopted state: its first tensor

    def holds_its_state(self) -> bool:
        """Whether the first adopted tensor still exists and still points into these buffers."""
        owner = self.owner() if self.owner is not None else None
        return owner is not None and owner.data_ptr() == self.pointers[0][0]


class _PackCache:
    """Flat buffers into which many small tensors are packed, so that one compiled call updates them all.

    Per-call costs (Dynamo's guards, argument checks, the Python around each call) are tens of
    microseconds, more than the arithmetic on a tensor of a few thousand values. For an elementwise
    rule, updating the concatenation of tensors equals updating each tensor, so the small tensors of a
    step are packed into one 1-D buffer per argument and updated by a single call:

    * the parameters and gradients are copied in (one ``torch._foreach_copy_`` each) and the
      parameters copied back after the call;
    * optimizer state is *adopted* on first use: each state tensor is copied into the buffer once and
      re-pointed at its slice of it (``Tensor.set_``: the same tensor object, so ``optimizer.state``
      and ``state_dict()`` see it, with the same shape, and row-major strides), after which it needs
      no copy at all. A state tensor that was replaced (``load_state_dict``) or that is a view (the
      real view of a complex tensor) is recognised by its address and copied in and out instead.

    Adopted buffers are found by the address of their first tensor, so two optimizers over the same
    shapes never share state; they carry their own buffers for the parameters and gradients. Scratch
    buffers (no state, or state that cannot be adopted) are shared by shape. Up to ``capacity`` layouts
    of each kind are kept (one per param group is the usual need); beyond that, adopted buffers whose
    state has moved on are forgotten first, then the oldest.
    """

    def __init__(self, capacity: int = 64) -> None:
        self.capacity = capacity  # layouts kept: one per param group and dtype, plus a few stale ones
        self._scratch: dict[tuple[Any, ...], _Layout] = {}
        self._adopted: dict[int, _Layout] = {}

    def _scratch_layout(self, columns: Sequence[Sequence[Tensor]], shapes: list[torch.Size]) -> _Layout:
        first = columns[0][0]
        key = (len(columns), first.dtype, first.device, tuple(shapes))
        layout = self._scratch.get(key)
        if layout is None:
            if len(self._scratch) >= self.capacity:
                self._scratch.pop(next(iter(self._scratch)))
            layout = self._scratch[key] = _Layout(shapes, len(columns), first.dtype, first.device)
        return layout

    def _adopted_layout(self, state: Sequence[Sequence[Tensor]]) -> _Layout | None:
        """The buffers that already hold ``state`` (every tensor at its expected address), or None."""
        layout = self._adopted.get(state[0][0].data_ptr())
        if layout is None or len(layout.pointers) != len(state) or len(layout.shapes) != len(state[0]):
            return None
        for column, pointers in zip(state, layout.pointers):
            if [t.data_ptr() for t in column] != pointers:
                return None
        return layout

    def _adopt(self, state: Sequence[Sequence[Tensor]], shapes: list[torch.Size]) -> _Layout | None:
        """Copy ``state`` into new buffers and re-point each tensor at its slice (None when some tensor is
        a view, whose storage is someone else's)."""
        if any(t._base is not None or t.requires_grad for column in state for t in column):
            return None
        first = state[0][0]
        layout = _Layout(shapes, len(state), first.dtype, first.device)
        layout.inputs = _Layout(shapes, 2, first.dtype, first.device)
        for column, views in zip(state, layout.views):
            torch._foreach_copy_(views, list(column))
            for tensor, view in zip(column, views):
                tensor.set_(view.untyped_storage(), view.storage_offset(), view.shape, view.stride())
        if len(self._adopted) >= self.capacity:
            # forget buffers whose state has moved on (replaced by a load, or adopted by another layout)
            # first, then the oldest; tensors still pointing into a forgotten buffer keep its storage alive
            stale = [ptr for ptr, old in self._adopted.items() if not old.holds_its_state()]
            for ptr in stale or [next(iter(self._adopted))]:
                del self._adopted[ptr]
        layout.owner = weakref.ref(first)
        self._adopted[layout.flats[0].data_ptr()] = layout
        return layout

    def run(self, columns: Sequence[Sequence[Tensor]], call: Callable[[list[Tensor]], None]) -> None:
        """``call`` the rule once on flat buffers holding ``columns`` (parameter, gradient, state...)."""
        state = columns[2:]
        adopted = self._adopted_layout(state) if state else None
        if adopted is None:
            shapes = [t.shape for t in columns[0]]
            adopted = self._adopt(state, shapes) if state else None
        if adopted is not None:
            copied, inputs = 2, adopted.inputs
        else:
            copied, inputs = len(columns), self._scratch_layout(columns, shapes)
        assert inputs is not None
        for views, column in zip(inputs.views, columns[:copied]):
            torch._foreach_copy_(views, list(column))
        call(inputs.flats + (adopted.flats if adopted is not None else []))
        for k in range(copied):
            if k != 1:  # the gradient is read, never written
                torch._foreach_copy_(list(columns[k]), inputs.views[k])


_STEPS: dict[tuple[Any, ...], FusedStep] = {}


def fused_step(update: Callable[..., None], static: Mapping[str, Hashable] | None = None,
               chunk_size: int = DEFAULT_CHUNK_SIZE, *, elementwise: bool = False) -> FusedStep:
    """The process-wide :class:`FusedStep` for ``update`` with these constant arguments (compiled once).

    ``elementwise=True`` declares that the rule treats every element on its own (no reduction over a
    tensor, such as a norm or a row mean), so that tensors may be concatenated before the call.
    """
    key = (update, tuple(sorted((static or {}).items())), chunk_size, elementwise)
    if key not in _STEPS:
        _STEPS[key] = FusedStep(update, static, chunk_size, elementwise=elementwise)
    return _STEPS[key]


def compile_stats() -> dict[str, dict[str, float]]:
    """``{rule name: {"compiles": n, "compile_seconds": s}}`` summed over every :func:`fused_step` made so far."""
    stats: dict[str, dict[str, float]] = {}
    for step in _STEPS.values():
        name = getattr(step.update, "__qualname__", repr(step.update))
        entry = stats.setdefault(name, {"compiles": 0, "compile_seconds": 0.0})
        entry["compiles"] += step.compiles
        entry["compile_seconds"] += step.compile_seconds
    return stats
