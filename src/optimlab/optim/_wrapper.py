"""State-dict helpers shared by the optimizers that wrap another one (:class:`~optimlab.optim.Lookahead`,
:class:`~optimlab.optim.MultiSteps`): the wrapper's own per-parameter tensor (slow weights, gradient
accumulators) is saved by parameter index next to the inner optimizer's state dict."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

__all__ = ["wrapped_params", "per_param_entries", "load_wrapper_state"]


def wrapped_params(wrapper: torch.optim.Optimizer) -> list[Tensor]:
    """The parameters in ``param_groups`` order (the numbering of ``torch.optim`` state dicts)."""
    return [param for group in wrapper.param_groups for param in group["params"]]


def per_param_entries(wrapper: torch.optim.Optimizer, key: str) -> dict[int, Tensor]:
    """``{parameter index: wrapper.state[param][key]}`` for the parameters that have the entry."""
    return {index: wrapper.state[p][key] for index, p in enumerate(wrapped_params(wrapper)) if key in wrapper.state[p]}


def load_wrapper_state(wrapper: Any, state_dict: dict[str, Any], *, kind: str, entries: str, key: str,
                       fields: tuple[str, ...]) -> None:
    """Check that ``state_dict`` has ``"optimizer"``, ``entries`` and ``fields``, load the inner optimizer, and
    put the per-parameter tensors of ``state_dict[entries]`` back as ``wrapper.state[param][key]`` (cast to the
    parameter's device and dtype). The caller restores its ``fields``."""
    missing = {"optimizer", entries, *fields} - set(state_dict)
    if missing:
        raise ValueError(f"Invalid state_dict: not a {kind} state dict (missing {sorted(missing)})")
    wrapper.optimizer.load_state_dict(state_dict["optimizer"])
    wrapper.param_groups = wrapper.optimizer.param_groups
    params = wrapped_params(wrapper)
    if any(not 0 <= index < len(params) for index in state_dict[entries]):
        raise ValueError(f"Invalid state_dict: {entries} refer to more parameters than the optimizer holds")
    wrapper.state.clear()
    for index, value in state_dict[entries].items():
        param = params[index]
        wrapper.state[param][key] = value.to(device=param.device, dtype=param.dtype, copy=True)
