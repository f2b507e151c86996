"""One rank of the data-parallel test job (started by torchrun from test_distributed.py).

Usage: ``torchrun --nproc-per-node 2 ddp_worker.py ROOT DATA``. Joins the process group once, then trains
every scenario the test checks, each in its own folder under ROOT:

* ``ddp-a{accum}-z{zero}``: per-rank batch 4, 26 planned steps, stopped (and checkpointed) at step 20;
* ``zero-from-single``: resumes ``single-a1`` (a single-process checkpoint at step 20, copied there by the
  test) with ``--zero`` and trains to step 26.
"""

from __future__ import annotations

import sys
from pathlib import Path

from train_helpers import DDP_STEPS, DDP_STOP, tiny_config

from optimlab.train.distributed import init_distributed, shutdown
from optimlab.train.trainer import Trainer


def main(root: Path, data: Path) -> None:
    context = init_distributed("cpu", timeout_s=60)
    try:
        for accum in (1, 2):
            for zero in (False, True):
                config = tiny_config(root / f"ddp-a{accum}-z{int(zero)}", data, batch_size=4, accum=accum, zero=zero,
                                     steps=DDP_STEPS)
                trainer = Trainer(config, context, quiet=True)
                trainer.train(stop_at=DDP_STOP)
                trainer.close()
        config = tiny_config(root / "zero-from-single", data, batch_size=4, zero=True, steps=DDP_STEPS)
        trainer = Trainer(config, context, resume=True, quiet=True)
        trainer.train()
        trainer.close()
    finally:
        shutdown(context)


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
