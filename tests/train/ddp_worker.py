"""One rank of the data-parallel test job (started by torchrun from test_distributed.py).

Usage: ``torchrun --nproc-per-node 2 ddp_worker.py ROOT DATA``. Joins the process group once, then trains
every scenario the test checks, each in its own folder under ROOT:

* ``ddp-a{accum}-z{zero}``: per-rank batch 4, 26 planned steps, stopped (and checkpointed) at step 20;
  ``comm.json`` there counts DDP's gradient all-reduces of its first bucket (a communication hook);
* ``zero-from-single``: resumes ``single-a1`` (a single-process checkpoint at step 20, copied there by the
  test) with ``--zero`` and trains to step 26.
"""

# No `from __future__ import annotations`: DDP checks the hook's annotations at registration.
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

from train_helpers import DDP_STEPS, DDP_STOP, tiny_config

from optimlab.train.distributed import end_worker, init_distributed, shutdown
from optimlab.train.trainer import Trainer


def _counting_allreduce(reduced: list, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """DDP's default gradient averaging, noting which bucket each call reduced."""
    reduced.append(bucket.index())
    return allreduce_hook(None, bucket)


def main(root: Path, data: Path) -> None:
    context = init_distributed("cpu", timeout_s=60)
    try:
        for accum in (1, 2):
            for zero in (False, True):
                config = tiny_config(root / f"ddp-a{accum}-z{int(zero)}", data, batch_size=4, accum=accum, zero=zero,
                                     steps=DDP_STEPS)
                trainer = Trainer(config, context, quiet=True)
                reduced: list[int] = []
                trainer.ddp_model.register_comm_hook(reduced, _counting_allreduce)
                trainer.train(stop_at=DDP_STOP)
                trainer.close()
                if context.is_main:
                    counts = {"first_bucket": reduced.count(0)}
                    (Path(config.out_dir) / "comm.json").write_text(json.dumps(counts))
        config = tiny_config(root / "zero-from-single", data, batch_size=4, zero=True, steps=DDP_STEPS)
        trainer = Trainer(config, context, resume=True, quiet=True)
        trainer.train()
        trainer.close()
    finally:
        shutdown(context, process_ends=True)


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
    end_worker(0)
