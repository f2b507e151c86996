"""Parameter groups: no weight decay on biases, normalisation weights and embeddings; layer-wise LR decay.

Decoupled weight decay θ ← θ − η λ θ (Loshchilov & Hutter 2019) shrinks every decayed tensor towards 0.
That is meant for the weight matrices of linear and convolutional layers; on biases, on the gains of
normalisation layers (whose scale the following layer can undo) and on embedding tables (whose rows are
updated only when their token occurs) it mostly hurts, so common practice (GPT-2, BERT, timm) exempts
them. :func:`param_groups` puts those tensors in a group with ``weight_decay = 0``.

Layer-wise learning-rate decay (Clark et al. 2020, ELECTRA; Bao et al. 2022, BEiT) scales the learning
rate of depth ℓ ∈ {0, …, L+1} by ``layer_decay ** (L + 1 − ℓ)``: parameters before the ordered list of
L blocks (embeddings) have depth 0, block i has depth i + 1, parameters after it (final norm, head)
depth L + 1 and keep the full rate. Each group carries the factor as ``"lr_scale"``; pass ``lr=`` to
also set each group's ``"lr"`` = lr · lr_scale, which is what optimizers and LR schedulers read (a
scheduler then scales each group's own initial rate, so the ratios persist through warmup and decay).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

__all__ = ["NO_DECAY_MODULES", "param_groups"]

NO_DECAY_MODULES: tuple[type[nn.Module], ...] = (
    nn.Embedding,
    nn.EmbeddingBag,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.RMSNorm,
    nn.LocalResponseNorm,
    nn.modules.batchnorm._NormBase,  # BatchNorm1d/2d/3d, SyncBatchNorm, InstanceNorm*
)
"""Module types whose parameters get no weight decay by default (embeddings and normalisation layers)."""


def _resolve_blocks(model: nn.Module, blocks: str) -> nn.Module:
    module: Any = model
    for part in blocks.split("."):
        module = getattr(module, part, None)
        if module is None:
            break
    if not isinstance(module, (nn.ModuleList, nn.Sequential)) or len(module) == 0:
        raise ValueError(
            f"Invalid blocks: {blocks!r} is not a non-empty nn.ModuleList/nn.Sequential attribute of "
            f"{type(model).__name__}; layer_decay needs the model's ordered list of blocks"
        )
    return module


def _layer_depths(model: nn.Module, blocks: str) -> tuple[dict[int, int], int]:
    """Depth of each parameter (by id): 0 before the blocks, i + 1 in block i, L + 1 after them."""
    block_list = _resolve_blocks(model, blocks)
    in_block = {id(p): i + 1 for i, block in enumerate(block_list) for p in block.parameters()}
    n_blocks = len(block_list)
    depths: dict[int, int] = {}
    seen_blocks = False
    for _, parameter in model.named_parameters():
        if id(parameter) in in_block:
            depths[id(parameter)] = in_block[id(parameter)]
            seen_blocks = True
        else:
            depths[id(parameter)] = n_blocks + 1 if seen_blocks else 0
    return depths, n_blocks


def param_groups(
    model: nn.Module,
    weight_decay: float,
    no_decay: Iterable[str] = ("*bias",),
    layer_decay: float | None = None,
    *,
    no_decay_modules: tuple[type[nn.Module], ...] = NO_DECAY_MODULES,
    blocks: str = "blocks",
    lr: float | None = None,
) -> list[dict[str, Any]]:
    """Split ``model``'s trainable parameters into optimizer param groups.

    A parameter gets weight decay 0 when its name matches one of the ``no_decay`` glob patterns
    (default: biases) or it belongs to a module of a type in ``no_decay_modules`` (embeddings and norm
    layers; a tied weight is exempt if any of its owners is); every other parameter gets ``weight_decay``.

    With ``layer_decay`` = γ ∈ (0, 1], the parameters of depth ℓ (see the module docstring; the blocks
    are the ``nn.ModuleList`` at attribute path ``blocks``) get ``lr_scale`` = γ^(L+1−ℓ); without it
    every group has ``lr_scale`` = 1.

    Returns:
        Groups ``{"params", "weight_decay", "lr_scale"[, "lr"]}`` in order of depth, decayed group first;
        empty groups are left out. Every trainable parameter is in exactly one group.

    Example:
        >>> opt = torch.optim.AdamW(param_groups(model, weight_decay=0.1), lr=3e-4)
    """
    if not (weight_decay >= 0.0):
        raise ValueError(f"Invalid weight_decay: {weight_decay} (accepted range: >= 0)")
    if layer_decay is not None and not (0.0 < layer_decay <= 1.0):
        raise ValueError(f"Invalid layer_decay: {layer_decay} (accepted range: (0, 1], or None)")
    if lr is not None and not (lr >= 0.0):
        raise ValueError(f"Invalid lr: {lr} (accepted range: >= 0, or None)")
    patterns = [no_decay] if isinstance(no_decay, str) else list(no_decay)

    exempt = {id(p) for module in model.modules() if isinstance(module, no_decay_modules)
              for p in module.parameters(recurse=False)}
    exempt.update(id(p) for name, p in model.named_parameters()
                  if any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns))

    depths, n_blocks = _layer_depths(model, blocks) if layer_decay is not None else ({}, 0)
    grouped: dict[tuple[int, bool], list[torch.nn.Parameter]] = {}
    for _, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        key = (depths.get(id(parameter), 0), id(parameter) in exempt)
        grouped.setdefault(key, []).append(parameter)

    groups: list[dict[str, Any]] = []
    for depth, is_exempt in sorted(grouped):
        scale = 1.0 if layer_decay is None else float(layer_decay ** (n_blocks + 1 - depth))
        group: dict[str, Any] = {"params": grouped[(depth, is_exempt)],
                                 "weight_decay": 0.0 if is_exempt else float(weight_decay),
                                 "lr_scale": scale}
        if lr is not None:
            group["lr"] = lr * scale
        groups.append(group)
    return groups

