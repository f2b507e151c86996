"""Optimizer-state accounting: how many bytes of state an optimizer holds per parameter."""

from __future__ import annotations

import torch

__all__ = ["state_bytes", "state_bytes_per_param"]


def _tensor_bytes(value: object) -> int:
    if torch.is_tensor(value):
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        return sum(_tensor_bytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(_tensor_bytes(v) for v in value)
    return 0


def state_bytes(optimizer: torch.optim.Optimizer, *, include_scalars: bool = False) -> int:
    r"""Total bytes of per-parameter optimizer state (every tensor in ``optimizer.state``).

    Scalar bookkeeping such as the 0-dim ``step`` counter is left out unless ``include_scalars``,
    so that the figure reflects what grows with model size: fp32 Adam holds
    :math:`2 \times 4 = 8` bytes per parameter (``exp_avg``, ``exp_avg_sq``).
    Works for torch's optimizers and optimlab's; low-precision state counts its real storage
    (bf16 moments 2 bytes, int8 codes 1 byte plus one float32 scale per 256-value block). A wrapper
    that holds its inner optimizer as ``.optimizer`` (:class:`optimlab.optim.Lookahead`) adds the
    inner optimizer's state to its own.
    """
    total = 0
    for param_state in optimizer.state.values():
        for value in param_state.values():
            if torch.is_tensor(value) and value.dim() == 0 and not include_scalars:
                continue
            total += _tensor_bytes(value)
    inner = getattr(optimizer, "optimizer", None)
    if isinstance(inner, torch.optim.Optimizer):
        total += state_bytes(inner, include_scalars=include_scalars)
    return total


def state_bytes_per_param(optimizer: torch.optim.Optimizer) -> float:
    """:func:`state_bytes` divided by the number of parameters the optimizer holds (0 when it holds none)."""
    count = sum(p.numel() for group in optimizer.param_groups for p in group["params"])
    return state_bytes(optimizer) / count if count else 0.0
