r"""The trainer's FSDP2 plumbing (``optimlab train --fsdp``): sharding the GPT, and its state as whole tensors.

:func:`shard_model` applies PyTorch's FSDP2 (``torch.distributed.fsdp.fully_shard``, public API) to each
transformer block and then to the root module, which takes the remaining parameters (embeddings — the token
embedding is tied to the output head —, the final LayerNorm). Every parameter becomes a ``DTensor`` sharded
by rows (``Shard(0)``) over the ranks: each rank holds :math:`1/W` of every parameter, of its gradient and of
the optimizer state created from it. A block's parameters are all-gathered just before its forward (and again
before its backward), and its gradients reduce-scattered (averaged) right after its backward.

``reshard_after_forward``: each block but the last frees its gathered parameters after its forward (memory:
one gathered block at a time, the point of FSDP; cost: a second all-gather in the backward). The last block
keeps them: its backward starts right after the forward ends, so freeing and re-gathering would only add an
all-gather. FSDP2 itself keeps the root's parameters gathered (the output head is the first thing the
backward needs). This is torchtitan's default policy.

Mixed precision (``--precision bf16``): ``MixedPrecisionPolicy(param_dtype=bfloat16, reduce_dtype=float32)`` —
the all-gathers move bf16 parameters (half the bytes) and the forward/backward compute in bf16, while the
gradients are reduce-scattered in float32 and the optimizer updates float32 shards. The trainer's autocast
stays on for the operations it keeps in float32 (the loss).

Checkpoints under FSDP2 are sharded (:mod:`optimlab.train.dcp_checkpoint`). A single-file checkpoint (of a run
without ``--fsdp``) resumes under it too: the trainer loads its whole weights before :func:`shard_model`, and
:func:`shard_optimizer_state` lays the loaded whole optimizer state out on the shards.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import Replicate, distribute_tensor

from optimlab.optim._dtensor import is_dtensor, local

__all__ = ["local_state", "one_rank_group", "shard_model", "shard_optimizer_state"]


def one_rank_group(device: torch.device) -> bool:
    """Join a process group of this process alone (gloo on CPU, NCCL on CUDA) unless one exists: FSDP2 needs a
    group even for one rank (``--fsdp`` without ``--nproc-per-node``). Returns whether it created one (the
    caller then destroys it)."""
    if dist.is_initialized():
        return False
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    return True


def shard_model(model: torch.nn.Module, blocks: list[torch.nn.Module], precision: str) -> None:
    """``fully_shard`` each of ``blocks`` (in order), then ``model`` (the root), in place; with ``precision``
    ``"bf16"`` under a bf16-compute, float32-reduce :class:`MixedPrecisionPolicy` (see the module docstring for
    the ``reshard_after_forward`` choice)."""
    policy = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if precision == "bf16"
              else MixedPrecisionPolicy())
    for index, block in enumerate(blocks):
        fully_shard(block, mp_policy=policy, reshard_after_forward=index < len(blocks) - 1)
    fully_shard(model, mp_policy=policy)


def shard_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """After ``optimizer.load_state_dict`` of a whole-tensor state dict on sharded parameters: lay each state
    tensor out as FSDP2's optimizer state is, in place — shaped like its parameter: sharded like it; any other
    non-scalar state (Adafactor's row and column statistics): replicated, each rank keeping the whole; scalars
    (step counters) as they are. No communication: every rank holds the whole tensors."""
    for group in optimizer.param_groups:
        for param in group["params"]:
            if not is_dtensor(param) or param not in optimizer.state:
                continue
            state = optimizer.state[param]
            for key, value in state.items():
                if not torch.is_tensor(value) or is_dtensor(value) or value.dim() == 0:
                    continue
                placements = param.placements if value.shape == param.shape else [Replicate()] * param.device_mesh.ndim
                state[key] = distribute_tensor(value.to(local(param).device), param.device_mesh, placements,
                                               src_data_rank=None)


def local_state(values: dict[str, Any]) -> dict[str, Any]:
    """A (model or optimizer) state dict with every DTensor replaced by this rank's shard, nested dicts
    included: what a per-rank check (e.g. for NaN/inf) looks at without communication."""
    return {key: local_state(value) if isinstance(value, dict) else local(value) if is_dtensor(value) else value
            for key, value in values.items()}
