"""``python -m optimlab.train``: one training process; torchrun starts each rank this way
(``torchrun --nproc-per-node 2 -m optimlab.train --quick``)."""

from optimlab.cli.train import worker_main

worker_main()
