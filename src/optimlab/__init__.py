"""optimlab: optimizers, learning-rate schedules, clipping, monitoring and a benchmark lab for PyTorch."""

from optimlab.optim.registry import create_optimizer, list_optimizers
from optimlab.optim.groups import param_groups  # noqa: F401  (public name: optimlab.param_groups)
from optimlab.schedules import create_scheduler, list_schedules  # noqa: F401  (public names)

__version__ = "0.1.0"

__all__ = ["__version__", "create_optimizer", "list_optimizers"]
