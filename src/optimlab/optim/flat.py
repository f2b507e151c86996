r"""Flat-buffer mode: a param group's parameters, gradients and state as views into one buffer each.

:func:`flatten_parameters` re-points every parameter of an optimizer's param groups into one
contiguous buffer per (param group, device, dtype), its gradient into a second one and each state
tensor (``exp_avg``, ``momentum_buffer``, ...) into one buffer per state entry; the per-parameter
``step`` counters (and other 0-dim state such as NAdam's ``mu_product``) become views of one 1-D
buffer per entry. A step then hands the optimizer's own ``_update_group`` *one* tensor per buffer:
the rule runs once over the whole buffer (with ``fused=True`` one compiled kernel, otherwise one
operation per line of the rule over the whole buffer), with one step counter, and the only per-tensor
Python left is two identity checks per parameter (is its gradient the buffer's view, does it still
live in the buffer). The rule, its arguments and the choice of path are the optimizer's own.

Elementwise rules only: for an update that treats every element on its own, updating the
concatenation equals updating each tensor (bit for bit on the unfused path, tested). Rules that reduce
over a tensor (LAMB and LARS trust ratios, Adafactor's factored moments, Muon's orthogonalisation) are
refused.

Kept (tested in ``tests/optim/test_flat.py``):

* ``state_dict()`` in torch's per-parameter format: each entry is a view of the flat state, so a
  checkpoint loads into a non-flat optimizer or ``torch.optim`` and back;
* ``load_state_dict``: the loaded per-parameter tensors are copied into the buffers at the next step;
* tied weights (one ``Parameter`` used by several modules is one parameter of the optimizer);
* parameters without a gradient (frozen by ``requires_grad_(False)``, unused) are skipped, as on
  every path, and their step counters fall behind; such a step runs the rule once per contiguous run
  of parameters that have a gradient and share their state's scalar values (a few calls, not one);
* ``zero_grad(set_to_none=True)``: a gradient that autograd allocated anew is copied into the buffer
  at the next step and ``p.grad`` re-pointed at its view (like DDP's ``gradient_as_bucket_view``);
  with ``zero_grad(set_to_none=False)`` autograd accumulates into the buffer and nothing is copied.

Refused, with an error naming the parameter or option:

* optimizers whose rule is not elementwise (only the classes in :data:`ELEMENTWISE`), groups with
  ``cautious=True`` (its mask is rescaled by a mean over each tensor, not over the buffer), and
  low-precision state (``state_dtype``: int8 block scales and the rounding noise are per tensor);
* parameters that are views of another tensor or share storage with another parameter (flattening
  would silently untie them);
* a parameter re-pointed after flattening (``p.data = ...``, ``p.set_(...)``): the step raises instead
  of updating a buffer the model no longer reads (calling :func:`flatten_parameters` again adopts it);
* sparse gradients.

A param group added after :func:`flatten_parameters` steps as usual until the function is called
again. A ``deepcopy`` (or pickle) of a flat optimizer is an ordinary optimizer: torch's
``Optimizer.__getstate__`` keeps only its state and groups.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = ["ELEMENTWISE", "flatten_parameters", "is_flat"]

ELEMENTWISE = ("SGD", "Adam", "AdamW", "Adagrad", "RMSprop", "Adamax", "NAdam", "RAdam", "Adadelta", "Lion",
               "ScheduleFreeAdamW")
"""The optimlab optimizers whose update rule is elementwise, so that flat mode applies (exact classes)."""

_ATTRIBUTE = "_flat_groups"  # the optimizer's list of _FlatGroup (or None) per param group, read by its step()


class _Bucket:
    """The parameters of one param group on one device with one dtype, and their flat buffers."""

    def __init__(self, params: list[Tensor]) -> None:
        self.params = params
        self.bounds = [0]
        for p in params:
            self.bounds.append(self.bounds[-1] + p.numel())
        first = params[0]
        self.param = torch.empty(self.bounds[-1], dtype=first.dtype, device=first.device)
        self.grad = torch.zeros_like(self.param)
        self.grad_views = self.views(self.grad)
        with torch.no_grad():
            for p, view, grad_view in zip(params, self.views(self.param), self.grad_views):
                view.copy_(p)
                grad = p.grad
                p.set_(view.untyped_storage(), view.storage_offset(), view.shape, view.stride())
                if grad is not None:
                    grad_view.copy_(grad)
                    p.grad = grad_view
        self.pointers = [p.data_ptr() for p in params]
        self.tensors: dict[str, Tensor] = {}  # state entry -> flat buffer (views held by each state dict)
        self.scalars: dict[str, Tensor] = {}  # 0-dim state entry -> 1-D buffer, one value per parameter
        self.whole: dict[str, Any] | None = None  # the state of the whole buffer, when every parameter's agrees

    def views(self, flat: Tensor, begin: int = 0, end: int | None = None) -> list[Tensor]:
        """Views of ``flat`` shaped like parameters ``begin..end``."""
        params = self.params[begin:end]
        bounds = self.bounds[begin:]
        return [flat[low:high].view(p.shape) for p, low, high in zip(params, bounds, bounds[1:])]

    def adopt(self, state: dict[Tensor, dict[str, Any]], scalar_keys: Sequence[str]) -> None:
        """Move the parameters' state entries into flat buffers and re-point each entry at its view."""
        self.tensors, self.scalars = {}, {}
        states = [state[p] for p in self.params]
        for key in dict.fromkeys(key for s in states for key in s):
            present = [i for i, s in enumerate(states) if torch.is_tensor(s.get(key))]
            if not present:
                continue
            sample = states[present[0]][key]
            if key in scalar_keys:
                buffer = self.scalars[key] = torch.zeros(len(self.params), dtype=sample.dtype, device=sample.device)
                buffer[present] = torch.stack([states[i][key].to(sample.dtype) for i in present])
                for i in present:
                    states[i][key] = buffer[i]
                continue
            for i in present:
                value = states[i][key]
                if value.shape != self.params[i].shape:
                    raise ValueError(f"flat mode: state entry {key!r} of a parameter of shape "
                                     f"{tuple(self.params[i].shape)} has shape {tuple(value.shape)}; only state "
                                     "shaped like its parameter can be flattened (low-precision state cannot)")
            buffer = self.tensors[key] = torch.zeros(self.bounds[-1], dtype=sample.dtype, device=sample.device)
            for i in present:
                view = buffer[self.bounds[i]:self.bounds[i + 1]].view(self.params[i].shape)
                view.copy_(states[i][key])
                states[i][key] = view
        self.refresh_whole(states)

    def refresh_whole(self, states: list[dict[str, Any]]) -> None:
        # the whole buffer is one tensor for the rule when every parameter holds the same entries and 0-dim values
        keys = {frozenset(s) for s in states}
        uniform = len(keys) == 1 and all(bool((buffer == buffer[0]).all()) for buffer in self.scalars.values())
        self.whole = None
        if uniform:
            self.whole = {key: states[0][key] for key in states[0]}
            self.whole.update({key: buffer[0].clone() for key, buffer in self.scalars.items()})
            self.whole.update(self.tensors)

    def active(self, group_index: int) -> list[bool] | None:
        """Check the parameters and their gradients; ``None`` when every one has its gradient in the buffer,
        else per parameter whether it has a gradient (copied into the buffer, ``p.grad`` re-pointed)."""
        if [p.data_ptr() for p in self.params] != self.pointers:
            index = next(i for i, p in enumerate(self.params) if p.data_ptr() != self.pointers[i])
            raise RuntimeError(
                f"flat mode: parameter {index} (shape {tuple(self.params[index].shape)}) of param group "
                f"{group_index} no longer lives in its flat buffer: it was replaced after flatten_parameters "
                "(p.data = ..., p.set_(...)). Assign values in place (with torch.no_grad(): p.copy_(new)), or "
                "call optimlab.optim.flatten_parameters(optimizer) again to adopt the new tensors")
        grads = [p.grad for p in self.params]
        if all(g is view for g, view in zip(grads, self.grad_views)):
            return None
        copies: list[tuple[Tensor, Tensor]] = []
        for p, grad, view in zip(self.params, grads, self.grad_views):
            if grad is None or grad is view:
                continue
            if grad.is_sparse:
                raise RuntimeError(f"flat mode: param group {group_index} got a sparse gradient; flat buffers "
                                   "hold dense gradients only (use the optimizer without flatten_parameters)")
            copies.append((view, grad))
            p.grad = view
        if copies:
            torch._foreach_copy_([view for view, _ in copies], [grad for _, grad in copies])
        return [p.grad is not None for p in self.params]

    def runs(self, active: list[bool], states: list[dict[str, Any]]) -> list[tuple[int, int]]:
        """Maximal runs ``[begin, end)`` of parameters with a gradient that share their state entries and values."""
        scalars = {key: buffer.tolist() for key, buffer in self.scalars.items()}

        def signature(i: int) -> tuple[Any, ...]:
            return (frozenset(states[i]), tuple(scalars[key][i] for key in scalars if key in states[i]))

        runs: list[tuple[int, int]] = []
        for i, has_grad in enumerate(active):
            if not has_grad:
                continue
            if runs and runs[-1][1] == i and signature(runs[-1][0]) == signature(i):
                runs[-1] = (runs[-1][0], i + 1)
            else:
                runs.append((i, i + 1))
        return runs

    def run_state(self, begin: int, end: int, states: list[dict[str, Any]]) -> dict[str, Any]:
        """The state of parameters ``begin..end`` (which agree on entries and 0-dim values) as one tensor's state."""
        if begin == 0 and end == len(self.params) and self.whole is not None:
            return self.whole
        low, high = self.bounds[begin], self.bounds[end]
        state: dict[str, Any] = {}
        for key, value in states[begin].items():
            if key in self.scalars:
                state[key] = self.scalars[key][begin].clone()
            elif key in self.tensors:
                state[key] = self.tensors[key][low:high]
            else:
                state[key] = value
        return state

    def settled(self) -> bool:
        """Whether the whole buffer's state after a step is all in the buffers (no entry new or replaced)."""
        assert self.whole is not None
        return all(key in self.scalars if value.dim() == 0 else value is self.tensors.get(key)
                   for key, value in self.whole.items() if torch.is_tensor(value))

    def write_back(self, begin: int, end: int, run: dict[str, Any], states: list[dict[str, Any]]) -> None:
        """Store the state of parameters ``begin..end`` after their step: 0-dim values into their buffers, new
        tensors (a first step's moments, SGD's first momentum) into new or existing flat buffers, with the
        parameters' entries re-pointed at their views."""
        low, high = self.bounds[begin], self.bounds[end]
        for key, value in run.items():
            if not torch.is_tensor(value):
                for s in states[begin:end]:
                    s[key] = value
            elif value.dim() == 0:
                buffer = self.scalars.get(key)
                if buffer is None:
                    buffer = self.scalars[key] = torch.zeros(len(self.params), dtype=value.dtype, device=value.device)
                buffer[begin:end] = value
                for i in range(begin, end):
                    if states[i].get(key) is None:
                        states[i][key] = buffer[i]
            else:
                buffer = self.tensors.get(key)
                if buffer is not None and value.data_ptr() == buffer[low:high].data_ptr():
                    continue
                if buffer is None and (low, high) == (0, self.bounds[-1]) and value.dtype == self.param.dtype:
                    buffer = self.tensors[key] = value.reshape(-1)  # a whole-buffer state tensor: adopted as is
                else:
                    if buffer is None:
                        buffer = self.tensors[key] = torch.zeros(self.bounds[-1], dtype=value.dtype,
                                                                 device=value.device)
                    buffer[low:high] = value.reshape(-1)
                for s, view in zip(states[begin:end], self.views(buffer, begin, end)):
                    s[key] = view


class _FlatGroup:
    """The buckets of one param group and the flat step over them."""

    def __init__(self, params: list[Tensor], optimizer: torch.optim.Optimizer) -> None:
        order: dict[tuple[torch.device, torch.dtype], list[Tensor]] = {}
        for p in params:
            order.setdefault((p.device, p.dtype), []).append(p)
        self.params = list(params)
        self.buckets = [_Bucket(bucket_params) for bucket_params in order.values()]
        self.scalar_keys = ("step", *getattr(optimizer, "scalar_state_init", {}))
        self.state: object = None
        self.adopt(optimizer)

    def adopt(self, optimizer: torch.optim.Optimizer) -> None:
        for bucket in self.buckets:
            bucket.adopt(optimizer.state, self.scalar_keys)
        self.state = optimizer.state

    def step(self, optimizer: Any, group: dict[str, Any], group_index: int) -> None:
        """One step of ``group``: the optimizer's ``_update_group`` on one tensor per run of each bucket."""
        if optimizer.state is not self.state:  # load_state_dict replaced the state: copy it into the buffers
            if [id(p) for p in group["params"]] != [id(p) for p in self.params]:
                raise RuntimeError(f"flat mode: param group {group_index} now holds other parameters than when it "
                                   "was flattened; call optimlab.optim.flatten_parameters(optimizer) again")
            self.adopt(optimizer)
        work: list[tuple[_Bucket, int, int, list[dict[str, Any]] | None, dict[str, Any]]] = []
        params: list[Tensor] = []
        grads: list[Tensor] = []
        for bucket in self.buckets:
            active = bucket.active(group_index)
            if active is None and bucket.whole is not None:  # the usual step: one tensor per buffer
                work.append((bucket, 0, len(bucket.params), None, bucket.whole))
                params.append(bucket.param)
                grads.append(bucket.grad)
                continue
            states = [optimizer.state[p] for p in bucket.params]
            for begin, end in bucket.runs(active or [True] * len(bucket.params), states):
                low, high = bucket.bounds[begin], bucket.bounds[end]
                work.append((bucket, begin, end, states, bucket.run_state(begin, end, states)))
                params.append(bucket.param[low:high])
                grads.append(bucket.grad[low:high])
        if not params:
            return
        run_states = [state for *_, state in work]
        for param, state in zip(params, run_states):  # the optimizer's own lazy state creation, on the buffers
            optimizer.state[param] = state
        try:
            optimizer._init_group(group, params)
        finally:
            for param in params:
                optimizer.state.pop(param, None)
        optimizer._update_group(group, params, grads, run_states)
        stepped: dict[int, tuple[_Bucket, list[dict[str, Any]]]] = {}
        for bucket, begin, end, states, state in work:
            if states is None:
                for key, buffer in bucket.scalars.items():
                    buffer.copy_(state[key])
                if bucket.settled():
                    continue
                states = [optimizer.state[p] for p in bucket.params]
            bucket.write_back(begin, end, state, states)
            stepped[id(bucket)] = (bucket, states)
        for bucket, states in stepped.values():
            bucket.refresh_whole(states)


def _check_flattenable(optimizer: torch.optim.Optimizer, flat_groups: Sequence[_FlatGroup | None]) -> None:
    import optimlab.optim as optim

    if type(optimizer) not in tuple(getattr(optim, name) for name in ELEMENTWISE):
        raise ValueError(f"flatten_parameters: {type(optimizer).__name__} is not supported (its update is not "
                         f"elementwise, or not an optimlab optimizer); supported: {', '.join(ELEMENTWISE)}")
    ours = {bucket.param.untyped_storage().data_ptr() for flat in flat_groups if flat is not None
            for bucket in flat.buckets}
    storages: dict[int, int] = {}
    for group_index, group in enumerate(optimizer.param_groups):
        if group.get("cautious"):
            raise ValueError(f"flatten_parameters: param group {group_index} has cautious=True; its mask is "
                             "rescaled by a mean over each tensor, so the rule is not elementwise (cautious=False)")
        if group.get("state_dtype") is not None:
            raise ValueError(f"flatten_parameters: param group {group_index} has state_dtype="
                             f"{group['state_dtype']!r}; flat mode keeps state in the parameter's dtype "
                             "(state_dtype=None)")
        for index, p in enumerate(group["params"]):
            where = f"parameter {index} of param group {group_index} (shape {tuple(p.shape)})"
            if p._base is not None:
                raise ValueError(f"flatten_parameters: {where} is a view of another tensor; flattening would "
                                 "untie it from that tensor (pass a tensor that owns its storage, e.g. .clone())")
            if p.is_sparse or p.layout != torch.strided:
                raise ValueError(f"flatten_parameters: {where} is not a dense tensor")
            storage = p.untyped_storage().data_ptr()
            if storage in ours:
                continue
            if storage in storages:
                raise ValueError(f"flatten_parameters: {where} shares its storage with another parameter (weights "
                                 "tied by storage rather than by one Parameter); flattening would untie them")
            storages[storage] = index


def flatten_parameters(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """Put every param group of ``optimizer`` in flat-buffer mode (module docstring) and return it.

    The parameters are re-pointed into the buffers in place (same ``Parameter`` objects, same values),
    so the model needs no change; call it after the model is on its device and before the first step
    (or later: existing state is moved into the buffers). Calling it again re-flattens every group,
    adopting parameters replaced meanwhile and groups added since.

    Raises:
        ValueError: for an optimizer whose rule is not elementwise (``cautious=True`` included),
            low-precision state, or parameters
            that are views or share storage (see the module docstring).
    """
    previous = optimizer.__dict__.get(_ATTRIBUTE, [])
    _check_flattenable(optimizer, previous)
    with torch.no_grad():
        flat_groups = [_FlatGroup(group["params"], optimizer) if group["params"] else None
                       for group in optimizer.param_groups]
    setattr(optimizer, _ATTRIBUTE, flat_groups)
    return optimizer


def is_flat(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer`` is in flat-buffer mode (:func:`flatten_parameters`)."""
    return bool(optimizer.__dict__.get(_ATTRIBUTE))
