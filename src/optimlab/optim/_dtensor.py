r"""Optimizers on sharded parameters: the ``DTensor``\ s of FSDP2 (``torch.distributed.fsdp.fully_shard``).

Under FSDP2 every parameter, gradient and optimizer state buffer is a ``DTensor``: each rank holds one shard
(``to_local()``) of a matrix whose global shape is ``param.shape``. Two kinds of rule meet them:

* **Elementwise rules** (SGD, the Adam family, Lion, schedule-free, ...) treat every element on its own, so
  updating each rank's local shard *is* the update of the whole matrix: no communication at all. Their
  per-tensor and multi-tensor paths take DTensors as they are (torch dispatches each operation to the local
  shards); the fused (compiled) path is handed the local shards (:func:`local_lists`), since the compiler
  sees plain tensors only.
* **Whole-matrix rules** (Muon's Newton–Schulz) are not elementwise: an orthogonalisation of a shard is not
  the shard of the orthogonalised matrix. :func:`owner_compute` runs them on the full matrix, once:
  matrix :math:`i` is gathered to its owner rank :math:`i \bmod W` alone (round-robin over the matrices of
  the step, so the work is spread over the :math:`W` ranks), which computes the result and scatters it back
  (``distribute_tensor(..., src_data_rank=owner)``), each rank receiving its shard in the parameter's
  layout; of a sharded matrix, no rank but the owner holds the whole. The result equals the unsharded rule's bit for bit, since the owner
  computes on exactly the matrix an unsharded run would. Trust-ratio norms (LAMB, LARS) are reductions that
  DTensor all-reduces itself; :func:`host_values` brings such a replicated result to the host.

An optimizer whose rule is neither (it would silently compute per shard) declares ``supports_dtensor =
False`` and :func:`check_dtensor_support` refuses DTensor parameters when its param group is added.

Only public APIs are used (``torch.distributed.tensor``). Reference for the owner-rank scheme: the
distributed Muon of Liu et al. 2025, "Muon is Scalable for LLM Training" (gather, compute on one rank,
scatter), with the matrices distributed round-robin as in sharded Shampoo implementations.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence

import torch
from torch import Tensor

__all__ = ["any_rank", "check_dtensor_support", "counted_once", "has_dtensor", "host_values", "is_dtensor", "local",
           "local_lists", "owner_compute", "reduce_over_shards", "sharded_refusal", "whole_norms"]

try:  # torch.distributed is optional (some builds lack it): then no parameter can be a DTensor
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor, Shard, distribute_tensor
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


def owner_compute(shards: Sequence[Tensor], like: Sequence[Tensor], compute: Callable[[Tensor], Tensor],
                  dtype: torch.dtype) -> list[Tensor]:
    """``compute`` of each whole matrix, done once, by its owner rank; returns this rank's shard of each result.

    ``shards[i]`` is this rank's local shard of matrix :math:`i`, laid out as the DTensor ``like[i]`` (same
    1-D mesh, placement, global shape and stride). Matrix :math:`i` is gathered to its owner (:math:`i \bmod W`
    in the mesh) only, which calls ``compute`` on it; ``compute`` must return a tensor of the global shape and
    of ``dtype``. The owner scatters the result: each rank gets its local shard, laid out as ``like[i]``. The
    ranks compute their matrices concurrently (all gathers first, then the computations, then all scatters), so
    each rank holds the whole of the matrices it owns, about :math:`1/W` of them, at once. Every rank must call
    this with the same matrices in the same order (collectives).
    """
    owners = []
    for index, layout in enumerate(like):
        if layout.device_mesh.ndim != 1:
            raise NotImplementedError(f"owner_compute: a {layout.device_mesh.ndim}-D device mesh (e.g. HSDP); only "
                                      "1-D meshes (fully_shard over one process group) are supported yet")
        owners.append(index % layout.device_mesh.size())
    # three passes, so that the owners compute at the same time: every gather, then each rank's own matrices,
    # then every scatter (one pass per matrix would leave all ranks but the owner waiting on its computation)
    wholes = [_gather_to_owner(shard, layout, owner) for shard, layout, owner in zip(shards, like, owners)]
    results = []
    for whole, shard, layout in zip(wholes, shards, like):
        if whole is None:
            results.append(torch.empty(layout.shape, dtype=dtype, device=shard.device))
            continue
        result = compute(whole)
        if result.shape != layout.shape or result.dtype != dtype:
            raise RuntimeError(f"owner_compute: compute returned a {result.dtype} tensor of shape "
                               f"{tuple(result.shape)}; expected {dtype} of shape {tuple(layout.shape)}")
        results.append(result)
    return [distribute_tensor(result, layout.device_mesh, layout.placements, src_data_rank=owner).to_local()
            for result, layout, owner in zip(results, like, owners)]


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
                f"muon, adafactor or lamb, or train {name} without FSDP")
    return None


def check_dtensor_support(optimizer: torch.optim.Optimizer, group: dict) -> None:
    """Raise ``NotImplementedError`` naming the optimizer when ``group``'s parameters hold a DTensor (a sharded
    parameter, e.g. under FSDP2) that it cannot update (:func:`sharded_refusal`)."""
    if not has_dtensor(group["params"]):
        return
    reason = sharded_refusal(type(optimizer))
    if reason is not None:
        raise NotImplementedError(reason)
