"""Small task files written the way a user would, for the loader tests."""

from pathlib import Path

# A linear regression task: fast (a few ms per trial) and easy to reach its target.
TINY_TASK = '''
import torch
from optimlab.bench.tasks import make_task

X = torch.randn(64, 4, generator=torch.Generator().manual_seed(0))
Y = X @ torch.tensor([1.0, -2.0, 0.5, 3.0])


def batches(seed):
    g = torch.Generator().manual_seed(seed)
    while True:
        idx = torch.randint(0, 64, (16,), generator=g)
        yield X[idx], Y[idx]


TASK = make_task(
    "{name}",
    model=lambda seed: torch.nn.Linear(4, 1),
    loss=lambda model, batch: ((model(batch[0]).squeeze(-1) - batch[1]) ** 2).mean(),
    batches=batches,
    evaluate=lambda model: {{"mse": ((model(X).squeeze(-1) - Y) ** 2).mean().item()}},
    metric="{metric}", mode="min", target={target}, steps=20, eval_every=5,
)
'''


def write_task(folder: Path, name: str = "tiny-linear", metric: str = "mse", target: float = 5.0,
               filename: str = "my_tasks.py") -> Path:
    """Write a task file into ``folder`` and return its path."""
    path = folder / filename
    path.write_text(TINY_TASK.format(name=name, metric=metric, target=target))
    return path
