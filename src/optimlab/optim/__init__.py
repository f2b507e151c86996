"""Optimizers: drop-in ``torch.optim.Optimizer`` subclasses with their update rules written here."""

from optimlab.optim.registry import create_optimizer, get_spec, list_optimizers, register_optimizer
from optimlab.optim.state import state_bytes, state_bytes_per_param
from optimlab.optim.adadelta import Adadelta
from optimlab.optim.adagrad import Adagrad
from optimlab.optim.adam import Adam, AdamW
from optimlab.optim.adamax import Adamax
from optimlab.optim.nadam import NAdam
from optimlab.optim.radam import RAdam
from optimlab.optim.rmsprop import RMSprop
from optimlab.optim.sgd import SGD

__all__ = [
    "SGD", "Adam", "AdamW", "Adagrad", "RMSprop", "Adamax", "NAdam", "RAdam", "Adadelta",
    "create_optimizer",
    "get_spec",
    "list_optimizers",
    "register_optimizer",
    "state_bytes",
    "state_bytes_per_param",
]
