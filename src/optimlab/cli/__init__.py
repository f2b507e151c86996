"""The ``optimlab`` command line: each module below registers its commands on :data:`app`."""

from optimlab.cli import optimizers  # noqa: F401  (registers `optimlab optimizers`)
from optimlab.cli import train  # noqa: F401  (registers `optimlab train`, `optimlab demo ddp`)
from optimlab.cli import bench  # noqa: F401  (registers `optimlab bench`, `runs`, `report`, `recommend`)
from optimlab.cli import analysis  # noqa: F401  (registers `optimlab lr-find`, `landscape`, `hessian`)
from optimlab.cli import stability  # noqa: F401  (registers `optimlab demo clipping`)
from optimlab.cli import schedules  # noqa: F401  (registers `optimlab schedule`, `optimlab demo schedules`)
from optimlab.cli import demo_functions  # noqa: F401  (registers `optimlab demo functions`)
from optimlab.cli.app import app

__all__ = ["app", "main"]


def main() -> None:
    """Entry point of the ``optimlab`` console script."""
    app()
