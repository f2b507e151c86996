"""The exploding RNN of the clipping study as a task: a 3-layer tanh RNN with U(-2, 2) weights regressing
a linear read-out of a sequence's sum (:mod:`optimlab.models.rnn`).

Training data: 512 sequences (data seed 0); validation: 256 fresh sequences from the same generator law
(data seed 1) with the same read-out weights' distribution. The run seed sets the initial weights and the
minibatch order. Metric: validation mean squared error; the target 1.0 is the "predict zero" baseline
(targets have unit variance), far below the initial error of the saturated network. A useful place to compare clipping specs (``--clips none,norm:1.0,agc:0.01``).
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import lru_cache

import torch
import torch.nn.functional as F

from optimlab.bench.tasks.base import TaskInstance, TaskSpec
from optimlab.models.rnn import ExplodingRNN, SequenceData, make_sequence_data, sequence_batches

__all__ = ["RNN_TASKS"]

_BATCH_SIZE = 32


@lru_cache(maxsize=1)
def _data() -> tuple[SequenceData, SequenceData]:
    full = make_sequence_data(num_samples=768, seed=0)
    return SequenceData(full.inputs[:512], full.targets[:512]), SequenceData(full.inputs[512:], full.targets[512:])


def _batches(data: SequenceData, seed: int) -> Iterator[SequenceData]:
    generator = torch.Generator().manual_seed(seed)
    while True:
        yield from (batch for batch in sequence_batches(data, _BATCH_SIZE, generator) if len(batch.inputs))


def _build(seed: int) -> TaskInstance:
    train, val = _data()
    torch.manual_seed(seed)
    model = ExplodingRNN()

    def loss(batch: SequenceData) -> torch.Tensor:
        return F.mse_loss(model(batch.inputs), batch.targets)

    def evaluate() -> dict[str, float]:
        with torch.no_grad():
            value = float(F.mse_loss(model(val.inputs), val.targets))
        return {"loss": value, "val_mse": value}

    return TaskInstance(model=model, loss=loss, batches=_batches(train, seed), evaluate=evaluate)


RNN_TASKS: list[TaskSpec] = [
    TaskSpec(
        name="exploding-rnn",
        description="3-layer tanh RNN, U(-2, 2) init, sequence-sum regression (the clipping study's model)",
        metric="val_mse",
        mode="min",
        target=1.0,
        steps=300,
        quick_steps=100,
        eval_every=20,
        family="model",
        build=_build,
    ),
]
