r"""Optimizers on sharded parameters: the ``DTensor``\ s of FSDP2 (``torch.distributed.fsdp.fully_shard``).

Under FSDP2 every parameter, gradient and optimizer state buffer is a ``DTensor``: each rank holds one shard
(``to_local()``) of a matrix whose global shape is ``param.shape``. Two kinds of rule meet them:

* **Elementwise rules** (SGD, the Adam family, Lion, schedule-free, ...) treat every element on its own, so
  updating each rank's local shard *is* the update of the whole matrix: no communication at all. Their
  per-tensor and multi-tensor paths take DTensors as they are (torch dispatches each operation to the local
  shards); the fused (compiled) path is handed the local shards (:func:`local_lists`), since the compiler
  sees plain tensors only.
* **Whole-matrix rules** (Muon's Newton–Schulz; SOAP's and Shampoo's factors, eigenbases and roots) are not
  elementwise: an orthogonalisation of a shard is not the shard of the orthogonalised matrix. They run on the
  full matrix, once: matrix :math:`i` is gathered to its owner rank alone, which computes and scatters the
  result back (``distribute_tensor(..., src_data_rank=owner)``), each rank receiving its shard in the
  parameter's layout; of a sharded matrix, no rank but the owner holds the whole. The owners are balanced by
  size (:func:`_owners`: largest matrix first, to the least loaded rank). :func:`owner_apply` is the one
  mechanism: :func:`owner_compute` computes a function of each matrix (Muon's orthogonalisation of its
  momentum, on the local shards beforehand), :func:`owner_update` runs a whole per-parameter rule (SOAP,
  Shampoo) on the gathered parameter, gradient and state, unchanged, and scatters the new parameter and state
  back. Their state stays sharded (:func:`state_zeros`): tensors shaped like the parameter sharded like it,
  others (the :math:`d \times d` factors, bases and roots) on dim 0 of the same mesh, so the memory is spread
  and ``get_state_dict``/DCP checkpoints hold DTensors as for any optimizer. The result equals the unsharded
  rule's bit for bit, since the owner computes on exactly the tensors an unsharded run would (row-major: SOAP
  stores its bases contiguous, as gathered ones are, so that the same kernels run). Trust-ratio norms (LAMB,
  LARS) are reductions that DTensor all-reduces itself; :func:`host_values` brings such a replicated result to
  the host.

An optimizer whose rule is neither (it would silently compute per shard) declares ``supports_dtensor =
False`` and :func:`check_dtensor_support` refuses DTensor parameters when its param group is added.

Only public APIs are used (``torch.distributed.tensor``). Reference for the owner-rank scheme: the
distributed Muon of Liu et al. 2025, "Muon is Scalable for LLM Training" (gather, compute on one rank,
scatter), with the matrices distributed over the ranks as in Distributed Shampoo (Shi et al. 2023).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Iterable, Sequence

import torch
from torch import Tensor

__all__ = ["any_rank", "check_dtensor_support", "counted_once", "has_dtensor", "host_values", "is_dtensor", "local",
           "local_lists", "owner_apply", "owner_compute", "owner_update", "reduce_over_shards", "sharded_refusal",
           "state_zeros", "whole_norms"]

try:  # torch.distributed is optional (some builds lack it): then no parameter can be a DTensor
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
    from torch.distributed.tensor import zeros as dtensor_zeros
except ImportError:  # pragma: no cover - builds without torch.distributed
    DTensor = None  # type: ignore[assignment,misc]


def is_dtensor(tensor: object) -> bool:
    """Whether ``tensor`` is a ``torch.distributed.tensor.DTensor`` (e.g. an FSDP2 parameter)."""
    return DTensor is not None and isinstance(tensor, DTensor)


def has_dtensor(tensors: Iterable[object]) -> bool:
    """Whether any of ``tensors`` is a DTensor."""
    return any(is_dtensor(tensor) for tensor in tensors)


def local(tensor: Tensor) -> Tensor:
    """This rank's shard of a DTensor (the same storage, so in-place updates reach the DTensor); any other
    tensor unchanged."""
    return tensor.to_local() if is_dtensor(tensor) else tensor


def local_lists(tensor_lists: Sequence[Sequence[Tensor] | None]) -> list[list[Tensor] | None]:
    """:func:`local` on every tensor of parallel lists (``None`` entries kept): what an elementwise rule's
    fused path computes on."""
    return [None if tensors is None else [local(t) for t in tensors] for tensors in tensor_lists]


def host_values(tensor: Tensor) -> list[float]:
    """``tensor.tolist()`` for a plain tensor or a DTensor (e.g. stacked trust-ratio norms, which DTensor has
    all-reduced over the shards: every rank gets the same values)."""
    return (tensor.full_tensor() if is_dtensor(tensor) else tensor).tolist()


def _shared_mesh(tensors: Iterable[object]) -> object | None:
    """The device mesh of the DTensors among ``tensors`` (``None`` when there are none); raises
    ``NotImplementedError`` for several meshes or a layout other than one :class:`Shard` or :class:`Replicate`
    placement on a 1-D mesh (what ``fully_shard`` over one process group makes)."""
    mesh = None
    for tensor in tensors:
        if not is_dtensor(tensor):
            continue
        placement = tensor.placements[0]
        if tensor.device_mesh.ndim != 1 or not (type(placement) is Shard or placement.is_replicate()):
            raise NotImplementedError(
                f"a DTensor on a {tensor.device_mesh.ndim}-D mesh with placements {tensor.placements}: reductions over "
                "shards support one Shard or Replicate placement on a 1-D mesh (fully_shard over one process group)")
        if mesh is None:
            mesh = tensor.device_mesh
        elif tensor.device_mesh != mesh:
            raise NotImplementedError("DTensors on several device meshes: reductions over shards take one mesh")
    return mesh


def counted_once(tensor: Tensor) -> bool:
    """Whether this rank's part of ``tensor`` enters a sum over the ranks: always for a plain tensor or a shard,
    on the mesh's first rank only for a replicated DTensor (every rank holds the whole)."""
    return not (is_dtensor(tensor) and tensor.placements[0].is_replicate()
                and tensor.device_mesh.get_local_rank() != 0)


def reduce_over_shards(values: Tensor, op: object, like: Iterable[object]) -> Tensor:
    """All-reduce ``values`` in place with ``op`` (a ``torch.distributed.ReduceOp``) over the ranks of the mesh of
    the DTensors in ``like``; unchanged when ``like`` holds none. Every rank of the mesh must call it."""
    mesh = _shared_mesh(like)
    if mesh is not None:
        dist.all_reduce(values, op=op, group=mesh.get_group())
    return values


def any_rank(flag: bool, like: Iterable[object]) -> bool:
    """``flag`` or-ed over the ranks that shard the DTensors in ``like`` (``flag`` itself when there are none):
    a decision every rank takes the same way, e.g. to skip a step whose gradient is non-finite on one shard."""
    tensors = list(like)
    mesh = _shared_mesh(tensors)
    if mesh is None:
        return flag
    device = next(local(t) for t in tensors if is_dtensor(t)).device
    value = torch.tensor([float(flag)], device=device)
    return bool(reduce_over_shards(value, dist.ReduceOp.MAX, tensors).item())


def whole_norms(norms: Sequence[Tensor], like: Sequence[Tensor], ord: float) -> list[Tensor]:
    r"""The ``ord``-norm of each whole tensor from the norms of this rank's parts: ``norms[i]`` is the norm of
    ``local(like[i])``. Plain and replicated tensors keep their norm; the norms of shards are combined, with one
    all-reduce for all of them: :math:`(\sum_r n_r^p)^{1/p}` (a sum of the :math:`p`-th powers, in float64),
    the max for :math:`p = \infty`, the min for :math:`-\infty`, the sum for :math:`p = 0` (a count). An empty
    shard (fewer rows than ranks) contributes nothing. Every rank of the mesh must call it."""
    ord = float(ord)
    sharded = [i for i, tensor in enumerate(like) if is_dtensor(tensor) and not tensor.placements[0].is_replicate()]
    if not sharded:
        return list(norms)
    if ord == math.inf or ord == -math.inf:
        op, empty = (dist.ReduceOp.MAX, 0.0) if ord > 0 else (dist.ReduceOp.MIN, math.inf)
        powers = [norms[i].double() if local(like[i]).numel() else torch.tensor(empty, dtype=torch.float64)
                  for i in sharded]
    else:
        op = dist.ReduceOp.SUM
        powers = [(norms[i].double() if ord == 0 else norms[i].double() ** ord) if local(like[i]).numel()
                  else torch.tensor(0.0, dtype=torch.float64) for i in sharded]
    device = norms[sharded[0]].device
    combined = reduce_over_shards(torch.stack([value.to(device) for value in powers]), op, [like[i] for i in sharded])
    if ord not in (0.0, math.inf, -math.inf):
        combined = combined ** (1.0 / ord)
    result = list(norms)
    for i, value in zip(sharded, combined):
        result[i] = value.to(norms[i].dtype)
    return result


def _gather_to_owner(shard: Tensor, layout: Tensor, owner: int) -> Tensor | None:
    """The whole matrix of which ``shard`` is this rank's part (laid out as the DTensor ``layout``) on the
    ``owner`` rank of its 1-D mesh, ``None`` on the others. A ``Shard(dim)`` layout is gathered to the owner
    alone: each shard padded to the largest (``torch.chunk``'s sizes, which ``Shard`` follows), one
    ``gather``; a replicated one is already whole; any other layout is all-gathered (``full_tensor``)."""
    mesh, (placement,) = layout.device_mesh, layout.placements
    is_owner = mesh.get_local_rank() == owner
    if placement.is_replicate():
        return shard if is_owner else None
    if type(placement) is not Shard:  # e.g. a strided shard (FSDP2 with tensor parallelism): DTensor gathers it
        whole = DTensor.from_local(shard, mesh, layout.placements, shape=layout.shape, stride=layout.stride())
        whole = whole.full_tensor()  # a collective: every rank takes part
        return whole if is_owner else None
    dim, ranks = placement.dim, mesh.size()
    sizes = [len(chunk) for chunk in torch.empty(layout.shape[dim], device="meta").chunk(ranks)]
    sizes += [0] * (ranks - len(sizes))
    padding = [0, 0] * (shard.dim() - 1 - dim) + [0, sizes[0] - shard.size(dim)]
    padded = torch.nn.functional.pad(shard, padding).contiguous()
    pieces = [torch.empty_like(padded) for _ in range(ranks)] if is_owner else None
    dist.gather(padded, pieces, group=mesh.get_group(), group_dst=owner)
    return torch.cat([piece.narrow(dim, 0, size) for piece, size in zip(pieces, sizes)], dim) if is_owner else None


def _state_placements(shape: Sequence[int], like: Tensor) -> list:
    """The layout of a state tensor of ``shape`` of the DTensor parameter ``like``: shaped like it, sharded like it;
    any other tensor of order >= 1 (e.g. a d x d factor) sharded on dim 0 of the same 1-D mesh; a 0-dim one
    replicated."""
    if tuple(shape) == tuple(like.shape):
        return list(like.placements)
    return [Shard(0)] if len(shape) else [Replicate()]


def state_zeros(like: Tensor, *shape: int) -> Tensor:
    """A zero state tensor of ``shape`` for the parameter ``like``: ``like.new_zeros(shape)`` for a plain tensor;
    for a DTensor a DTensor on its mesh laid out by :func:`_state_placements` (each rank allocating its shard only),
    so the state is spread over the ranks as the parameter is."""
    if not is_dtensor(like):
        return like.new_zeros(shape)
    return dtensor_zeros(shape, dtype=like.dtype, device_mesh=like.device_mesh,
                         placements=_state_placements(shape, like))


def _owners(like: Sequence[Tensor]) -> list[int]:
    """The owner rank of each item: the largest items first (by element count, then by position), each to the
    rank with the fewest elements so far (the lowest on a tie); the same on every rank, from the shapes alone.
    Plain round-robin would give every weight matrix of a model that alternates weights and biases to one rank."""
    ranks = like[0].device_mesh.size()
    load, owners = [0] * ranks, [0] * len(like)
    for index in sorted(range(len(like)), key=lambda i: (-like[i].numel(), i)):
        owners[index] = min(range(ranks), key=lambda rank: (load[rank], rank))
        load[owners[index]] += like[index].numel()
    return owners


def owner_apply(items: Sequence[dict[str, Tensor]], like: Sequence[Tensor],
                compute: Callable[[dict[str, Tensor]], None], read_only: Collection[str] = ()) -> None:
    r"""``compute`` on the whole tensors of each item, done once, by the item's owner rank; the results
    written back into every rank's shards.

    ``items[i]`` maps names to the tensors of item :math:`i`: DTensors on the 1-D mesh of the DTensor
    ``like[i]`` (e.g. a parameter, its gradient and its optimizer state), and 0-dim plain tensors (e.g. a step
    count, equal on every rank). Item :math:`i` is gathered to its owner (:func:`_owners`) only,
    which calls ``compute`` on a dict of the whole tensors (the plain ones as they are); ``compute`` updates it in
    place and may add entries. Every entry is then scattered back from the owner: into the shards of an
    existing DTensor in place (so the parameter and state objects stay the same), as a new DTensor laid out by
    :func:`_state_placements` for a new entry, and a plain 0-dim entry is copied from the owner's; entries named
    in ``read_only`` (e.g. the gradient) are gathered but not scattered back. The ranks
    compute their items concurrently (all gathers, then each rank's own items, then one exchange of the
    results' names, shapes and scalars, then all scatters), so each rank holds the whole of the items it owns,
    about :math:`1/W` of them, at once. Every rank must call this with the same items in the same order
    (collectives).
    """
    for layout in like:
        if layout.device_mesh.ndim != 1:
            raise NotImplementedError(f"owner computation: a {layout.device_mesh.ndim}-D device mesh (e.g. HSDP); "
                                      "only 1-D meshes (fully_shard over one process group) are supported yet")
    if not items:
        return
    owners = _owners(like)
    # three passes, so that the owners compute at the same time: every gather, then each rank's own items, then
    # every scatter (one pass per item would leave all ranks but the owner waiting on its computation)
    wholes = [{name: _gather_to_owner(value.to_local(), value, owner) if is_dtensor(value) else value
               for name, value in item.items()} for item, owner in zip(items, owners)]
    mine: dict[int, dict[str, tuple]] = {}
    for index, whole in enumerate(wholes):
        if any(value is None for value in whole.values()):
            continue  # not this rank's item
        compute(whole)
        mine[index] = {name: (tuple(value.shape), value.dtype, None) if value.dim() else ((), value.dtype, value.cpu())
                       for name, value in whole.items()}
    group = like[0].device_mesh.get_group()
    described: list[dict[int, dict[str, tuple]]] = [{} for _ in range(dist.get_world_size(group))]
    dist.all_gather_object(described, mine, group=group)
    results = {index: entries for rank_items in described for index, entries in rank_items.items()}
    for index, (item, whole, layout, owner) in enumerate(zip(items, wholes, like, owners)):
        for name, (shape, dtype, scalar) in results[index].items():
            old = item.get(name)
            if name in read_only:
                continue
            if scalar is not None:  # a 0-dim plain entry: the owner's value
                item[name] = scalar.to(layout.to_local().device) if old is None else old.copy_(scalar)
                continue
            full = whole.get(name)  # None except on the owner: a placeholder, which the scatter does not read
            full = torch.empty(shape, dtype=dtype, device=layout.to_local().device) if full is None else full
            placements = old.placements if is_dtensor(old) else _state_placements(shape, layout)
            new = distribute_tensor(full, layout.device_mesh, placements, src_data_rank=owner)
            if is_dtensor(old) and old.shape == new.shape and old.dtype == new.dtype:
                old.to_local().copy_(new.to_local())
            else:
                item[name] = new


def owner_compute(shards: Sequence[Tensor], like: Sequence[Tensor], compute: Callable[[Tensor], Tensor],
                  dtype: torch.dtype) -> list[Tensor]:
    """``compute`` of each whole matrix, done once, by its owner rank; returns this rank's shard of each result.

    ``shards[i]`` is this rank's local shard of matrix :math:`i`, laid out as the DTensor ``like[i]`` (same
    1-D mesh, placement, global shape and stride); ``compute`` must return a tensor of the global shape and of
    ``dtype``, which the owner scatters, each rank getting its local shard, laid out as ``like[i]``
    (:func:`owner_apply`).
    """
    def on_owner(whole: dict[str, Tensor]) -> None:
        result = compute(whole["matrix"])
        if result.shape != whole["matrix"].shape or result.dtype != dtype:
            raise RuntimeError(f"owner_compute: compute returned a {result.dtype} tensor of shape "
                               f"{tuple(result.shape)}; expected {dtype} of shape {tuple(whole['matrix'].shape)}")
        whole["result"] = result

    items = [{"matrix": DTensor.from_local(shard, layout.device_mesh, layout.placements, run_check=False,
                                           shape=layout.shape, stride=layout.stride())}
             for shard, layout in zip(shards, like)]
    owner_apply(items, like, on_owner, read_only=("matrix",))
    return [item["result"].to_local() for item in items]


def owner_update(update: Callable[[list[Tensor], list[Tensor], list[dict[str, Tensor]]], None],
                 params: Sequence[Tensor], grads: Sequence[Tensor], states: Sequence[dict[str, Tensor]]) -> None:
    """A per-parameter rule on sharded parameters: for each parameter its owner rank runs ``update([param],
    [grad], [state])`` (the unsharded rule, unchanged) on the whole parameter, gradient and state, and the new
    parameter and state are scattered back into the shards (:func:`owner_apply`); state entries the rule adds
    become DTensors laid out by :func:`_state_placements`. Every rank must call it with the same parameters."""
    reserved = ("<param>", "<grad>")
    items = [{reserved[0]: param, reserved[1]: grad, **state} for param, grad, state in zip(params, grads, states)]

    def on_owner(whole: dict[str, Tensor]) -> None:
        state = {name: value for name, value in whole.items() if name not in reserved}
        update([whole[reserved[0]]], [whole[reserved[1]]], [state])
        whole.update(state)

    owner_apply(items, params, on_owner, read_only=reserved[1:])
    for item, state in zip(items, states):
        state.update({name: value for name, value in item.items() if name not in reserved})


def sharded_refusal(optimizer_class: type) -> str | None:
    """Why ``optimizer_class`` cannot update sharded (DTensor) parameters, or ``None`` when it can: its class
    declares ``supports_dtensor = False`` (its rule would compute on each shard alone, which is not the rule
    applied to the matrix). Low-precision state (``state_dtype`` bf16/int8) is supported on shards
    (:mod:`optimlab.optim.lowp_state`: noise keyed by global index, int8 block scales all-reduced). What
    :func:`check_dtensor_support` raises, and what ``optimlab train --fsdp`` checks before it starts."""
    name = optimizer_class.__name__
    if not getattr(optimizer_class, "supports_dtensor", True):
        return (f"{name} cannot update sharded (DTensor) parameters, e.g. under FSDP2's fully_shard: its rule needs "
                "whole tensors and has no sharded path yet; use an elementwise optimizer (adamw, sgd, lion, ...), "
                f"muon, soap, shampoo, adafactor, lamb or dadapt-adam, or train {name} without FSDP")
    return None


def check_dtensor_support(optimizer: torch.optim.Optimizer, group: dict) -> None:
    """Raise ``NotImplementedError`` naming the optimizer when ``group``'s parameters hold a DTensor (a sharded
    parameter, e.g. under FSDP2) that it cannot update (:func:`sharded_refusal`)."""
    if not has_dtensor(group["params"]):
        return
    reason = sharded_refusal(type(optimizer))
    if reason is not None:
        raise NotImplementedError(reason)
