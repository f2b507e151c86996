"""Classification of scikit-learn's bundled 8x8 digits (no download): logistic regression and an MLP.

The 1797 images are split once (fixed permutation, 80 % train / 20 % validation, independent of the
run seed); features are standardised with the training mean and standard deviation. The run seed sets
the initial weights and the minibatch order. Metric: validation accuracy.
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import lru_cache

import torch
import torch.nn.functional as F

from optimlab.bench.tasks.base import TaskInstance, TaskSpec

__all__ = ["DIGITS_TASKS", "digits_data"]

_SPLIT_SEED = 0
_VAL_FRACTION = 0.2
_BATCH_SIZE = 64


@lru_cache(maxsize=1)
def digits_data() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(x_train, y_train, x_val, y_val)``: standardised float32 features and int64 labels."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    features = torch.tensor(bunch.data, dtype=torch.float32)
    labels = torch.tensor(bunch.target, dtype=torch.int64)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(_SPLIT_SEED))
    n_val = int(round(_VAL_FRACTION * len(labels)))
    val_idx, train_idx = order[:n_val], order[n_val:]
    mean = features[train_idx].mean(0)
    std = features[train_idx].std(0).clamp_min(1e-3)  # some border pixels are always 0
    features = (features - mean) / std
    return features[train_idx], labels[train_idx], features[val_idx], labels[val_idx]


def _minibatches(x: torch.Tensor, y: torch.Tensor, seed: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(len(y), generator=generator)
        for start in range(0, len(y) - _BATCH_SIZE + 1, _BATCH_SIZE):
            idx = order[start : start + _BATCH_SIZE]
            yield x[idx], y[idx]


def _build(seed: int, hidden: int | None) -> TaskInstance:
    x_train, y_train, x_val, y_val = digits_data()
    torch.manual_seed(seed)
    if hidden is None:
        model: torch.nn.Module = torch.nn.Linear(64, 10)
    else:
        model = torch.nn.Sequential(torch.nn.Linear(64, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, 10))

    def loss(batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        inputs, targets = batch
        return F.cross_entropy(model(inputs), targets)

    def evaluate() -> dict[str, float]:
        with torch.no_grad():
            logits = model(x_val)
            return {
                "loss": float(F.cross_entropy(logits, y_val)),
                "val_accuracy": float((logits.argmax(1) == y_val).float().mean()),
            }

    return TaskInstance(model=model, loss=loss, batches=_minibatches(x_train, y_train, seed), evaluate=evaluate)


DIGITS_TASKS: list[TaskSpec] = [
    TaskSpec(
        name="digits-logreg",
        description="logistic regression on sklearn digits (64 -> 10), batch 64",
        metric="val_accuracy",
        mode="max",
        target=0.95,
        steps=600,
        quick_steps=300,
        eval_every=25,
        family="model",
        build=lambda seed: _build(seed, hidden=None),
    ),
    TaskSpec(
        name="digits-mlp",
        description="MLP 64-128-10 (ReLU) on sklearn digits, batch 64",
        metric="val_accuracy",
        mode="max",
        target=0.97,
        steps=600,
        quick_steps=300,
        eval_every=25,
        family="model",
        build=lambda seed: _build(seed, hidden=128),
    ),
]
