"""Optimizers: drop-in ``torch.optim.Optimizer`` subclasses with their update rules written here."""

from optimlab.optim.registry import create_optimizer, get_spec, list_optimizers, register_optimizer
from optimlab.optim.state import state_bytes, state_bytes_per_param

__all__ = [
    "create_optimizer",
    "get_spec",
    "list_optimizers",
    "register_optimizer",
    "state_bytes",
    "state_bytes_per_param",
]
