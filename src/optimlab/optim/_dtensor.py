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

from collections.abc import Callable, Iterable, Sequence

import torch
from torch import Tensor

__all__ = ["check_dtensor_support", "has_dtensor", "host_values", "is_dtensor", "local", "local_lists",
           "owner_compute"]

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


def check_dtensor_support(optimizer: torch.optim.Optimizer, group: dict) -> None:
    """Raise ``NotImplementedError`` naming the optimizer when ``group``'s parameters hold a DTensor (a sharded
    parameter, e.g. under FSDP2) that it cannot update: its class declares ``supports_dtensor = False`` (its rule
    would compute on each shard alone, which is not the rule applied to the matrix), or the group stores its
    state in low precision (``state_dtype`` bf16/int8: the block-wise codecs take plain tensors)."""
    if not has_dtensor(group["params"]):
        return
    name = type(optimizer).__name__
    state_dtype = group.get("state_dtype")
    if state_dtype not in (None, "float32", torch.float32):
        raise NotImplementedError(
            f"{name}(state_dtype={state_dtype!r}) cannot update sharded (DTensor) parameters, e.g. under FSDP2's "
            "fully_shard: low-precision states have no sharded path yet; pass state_dtype=None")
    if not getattr(type(optimizer), "supports_dtensor", True):
        raise NotImplementedError(
            f"{name} cannot update sharded (DTensor) parameters, e.g. under FSDP2's fully_shard: its rule needs whole "
            "tensors and has no sharded path yet; use an elementwise optimizer (adamw, sgd, lion, ...), muon, "
            f"adafactor or lamb, or train {name} without FSDP")
