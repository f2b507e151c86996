"""The ``optimlab`` command line: each module below registers its commands on :data:`app`."""

from optimlab.cli import optimizers  # noqa: F401  (registers `optimlab optimizers`)
from optimlab.cli import train  # noqa: F401  (registers `optimlab train`, `optimlab demo ddp`)
from optimlab.cli import bench  # noqa: F401  (registers `optimlab bench`, `runs`, `report`, `recommend`)
from optimlab.cli import analysis  # noqa: F401  (registers `optimlab lr-find`, `landscape`, `hessian`)
from optimlab.cli import stability  # noqa: F401  (registers `optimlab demo clipping`)
from optimlab.cli import schedules  # noqa: F401  (registers `optimlab schedule`, `optimlab demo schedules`)
from optimlab.cli import demo_functions  # noqa: F401  (registers `optimlab demo functions`)
from optimlab.cli import checkpoint  # noqa: F401  (registers `optimlab checkpoint convert|verify`)
from optimlab.cli.app import app, fail
from optimlab.io import os_error_text

__all__ = ["app", "main"]


def main() -> None:
    """Entry point of the ``optimlab`` console script. A file that cannot be written or read in the middle of a
    command (a full disk, a folder made read-only meanwhile) ends it with one ``error:`` line and exit code 2
    instead of a traceback (the commands check their output folders before the work; this is the backstop)."""
    try:
        app()
    except OSError as error:
        where = f" {error.filename}" if error.filename else ""
        raise SystemExit(fail(f"cannot write or read{where}: {os_error_text(error)}").exit_code) from None
