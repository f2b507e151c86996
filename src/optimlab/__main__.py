"""``python -m optimlab`` is the ``optimlab`` command."""

from optimlab.cli import main

main()
