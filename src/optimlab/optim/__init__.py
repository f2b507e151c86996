"""Optimizers: drop-in ``torch.optim.Optimizer`` subclasses with their update rules written here.

Each optimizer module registers its classes (:func:`optimlab.optim.registry.register`); importing it
below is what makes its names known to the registry and the class public. Adding an optimizer: see
``docs/optimizers.md``, "Adding an optimizer".
"""

from optimlab.optim.registry import create_optimizer, get_spec, list_optimizers, register_optimizer, registrations
from optimlab.optim.state import state_bytes, state_bytes_per_param
from optimlab.optim.adadelta import Adadelta
from optimlab.optim.adagrad import Adagrad
from optimlab.optim.adam import Adam, AdamW
from optimlab.optim.adamax import Adamax
from optimlab.optim.nadam import NAdam
from optimlab.optim.radam import RAdam
from optimlab.optim.rmsprop import RMSprop
from optimlab.optim.sgd import SGD
from optimlab.optim.lion import Lion
from optimlab.optim.lamb import LAMB
from optimlab.optim.lars import LARS
from optimlab.optim.adafactor import Adafactor
from optimlab.optim.muon import Muon, MuonWithAdamW, muon_param_split
from optimlab.optim.schedule_free import ScheduleFreeAdamW
from optimlab.optim.lookahead import Lookahead
from optimlab.optim.multi_steps import MultiSteps
from optimlab.optim.asgd import ASGD
from optimlab.optim.lbfgs import LBFGS
from optimlab.optim.rprop import Rprop
from optimlab.optim.sparse_adam import SparseAdam
from optimlab.optim.flat import flatten_parameters, is_flat
from optimlab.optim.adopt import ADOPT
from optimlab.optim.prodigy import Prodigy
from optimlab.optim.dadapt_adam import DAdaptAdam
from optimlab.optim.soap import SOAP
from optimlab.optim.shampoo import Shampoo
from optimlab.optim.sam import SAM

__all__ = [
    *(registration.cls.__name__ for registration in registrations()),  # every registered optimizer class
    "muon_param_split",
    "Lookahead",
    "MultiSteps",
    "create_optimizer",
    "flatten_parameters",
    "is_flat",
    "get_spec",
    "list_optimizers",
    "register_optimizer",
    "state_bytes",
    "state_bytes_per_param",
]
