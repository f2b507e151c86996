"""Learning-rate schedules: torch-compatible, exact against closed forms, resumable mid-run.

Every class subclasses :class:`torch.optim.lr_scheduler.LRScheduler` (through :class:`Schedule`), gives the
same learning-rate sequence as torch's class of the same name, updates a tensor ``lr`` in place, resumes
exactly from ``state_dict()``, and (where one exists) has a closed form ``lr_at(step)``.
``create_scheduler(name, optimizer, total_steps, **kwargs)`` builds one by name (see :func:`list_schedules`).
"""

from optimlab.schedules._base import Schedule, has_closed_form
from optimlab.schedules.basic import (
    ConstantLR,
    ExponentialLR,
    LambdaLR,
    LinearLR,
    MultiplicativeLR,
    MultiStepLR,
    PolynomialLR,
    StepLR,
)
from optimlab.schedules.compose import ChainedScheduler, SequentialLR, with_warmup
from optimlab.schedules.cosine import CosineAnnealingLR, CosineAnnealingWarmRestarts
from optimlab.schedules.cyclic import CyclicLR
from optimlab.schedules.onecycle import OneCycleLR
from optimlab.schedules.plateau import ReduceLROnPlateau
from optimlab.schedules.swa import SWALR
from optimlab.schedules.registry import create_scheduler, list_schedules, needs_metric, step_scheduler
from optimlab.schedules.warmup import WarmupCosineLR, WarmupStableDecayLR

__all__ = [
    "Schedule",
    "LambdaLR",
    "MultiplicativeLR",
    "StepLR",
    "MultiStepLR",
    "ConstantLR",
    "LinearLR",
    "ExponentialLR",
    "PolynomialLR",
    "CosineAnnealingLR",
    "CosineAnnealingWarmRestarts",
    "CyclicLR",
    "OneCycleLR",
    "ReduceLROnPlateau",
    "SequentialLR",
    "ChainedScheduler",
    "SWALR",
    "with_warmup",
    "WarmupCosineLR",
    "WarmupStableDecayLR",
    "create_scheduler",
    "list_schedules",
    "step_scheduler",
    "needs_metric",
    "has_closed_form",
]
