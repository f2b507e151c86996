"""One rank of the flat-mode DDP test (started by torchrun from test_flat_ddp.py).

Usage: ``torchrun --nproc-per-node 2 flat_ddp_worker.py OUT``. Each rank trains two copies of a small model
under DistributedDataParallel (gloo), one with a flat AdamW and one with an ordinary AdamW, on its own
batches, and writes ``OUT/rank{r}.json``: whether the copies stayed bit for bit equal, whether the flat
copy's gradients were views of its buffer after each step, and a checksum of the parameters (equal on
every rank when the gradients were averaged).
"""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from optimlab.optim import AdamW, flatten_parameters
from optimlab.train.distributed import end_worker


def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4)).double()


def main(out: Path) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    flat_model, plain_model = model(), model()
    flat = flatten_parameters(AdamW(flat_model.parameters(), lr=0.05, weight_decay=0.1, foreach=False))
    plain = AdamW(plain_model.parameters(), lr=0.05, weight_decay=0.1, foreach=False)
    buffer = flat._flat_groups[0].buckets[0]
    flat_ddp, plain_ddp = DistributedDataParallel(flat_model), DistributedDataParallel(plain_model)
    generator = torch.Generator().manual_seed(100 + rank)
    in_buffer = []
    for step in range(6):
        inputs = torch.randn(5, 8, generator=generator, dtype=torch.float64)
        targets = torch.randn(5, 4, generator=generator, dtype=torch.float64)
        for ddp, optimizer in ((flat_ddp, flat), (plain_ddp, plain)):
            optimizer.zero_grad(set_to_none=step < 3)  # new gradient tensors first, then accumulation in place
            torch.nn.functional.mse_loss(ddp(inputs), targets).backward()
            optimizer.step()
        in_buffer.append(all(p.grad is view for p, view in zip(flat_model.parameters(), buffer.grad_views)))
    equal = all(torch.equal(a, b) for a, b in zip(flat_model.parameters(), plain_model.parameters()))
    checksum = float(sum(p.sum() for p in flat_model.parameters()))
    still_flat = flat_model[0].weight.data_ptr() == buffer.param.data_ptr()
    (out / f"rank{rank}.json").write_text(json.dumps({"equal": equal, "in_buffer": in_buffer, "checksum": checksum,
                                                      "still_flat": still_flat}))
    dist.barrier()
    end_worker(0)  # no teardown of gloo's threads (optimlab.train.distributed.shutdown says why)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
