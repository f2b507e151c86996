"""A small character-level GPT (:mod:`optimlab.train.model`) on the Python standard library's own source
(:mod:`optimlab.train.data`): deterministic file selection, contiguous 90/10 train/validation split.

Model: 2 layers, 4 heads, width 64, context 64 characters. The run seed sets the initial weights and the
training windows (random offsets). Validation: 8 fixed batches of 32 windows (offsets drawn once with a
fixed generator). Metric: validation cross-entropy in nats per character.
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import lru_cache

import torch

from optimlab.bench.tasks.base import TaskInstance, TaskSpec
from optimlab.train.data import CharCorpus, build_corpus, sample_batch, stdlib_corpus
from optimlab.train.model import GPT, GPTConfig

__all__ = ["GPT_TASKS"]

_BLOCK_SIZE = 64
_BATCH_SIZE = 32
_CORPUS_CHARS = 400_000
_VAL_BATCHES = 8
_VAL_SEED = 1234


@lru_cache(maxsize=1)
def _corpus() -> tuple[CharCorpus, list[tuple[torch.Tensor, torch.Tensor]]]:
    corpus = build_corpus(stdlib_corpus(max_chars=_CORPUS_CHARS), block_size=_BLOCK_SIZE, val_fraction=0.1)
    generator = torch.Generator().manual_seed(_VAL_SEED)
    val_batches = [sample_batch(corpus.val, _BATCH_SIZE, _BLOCK_SIZE, generator) for _ in range(_VAL_BATCHES)]
    return corpus, val_batches


def _batches(tokens: torch.Tensor, seed: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    while True:
        yield sample_batch(tokens, _BATCH_SIZE, _BLOCK_SIZE, generator)


def _build(seed: int) -> TaskInstance:
    corpus, val_batches = _corpus()
    torch.manual_seed(seed)
    model = GPT(GPTConfig(vocab_size=len(corpus.vocab), block_size=_BLOCK_SIZE, n_layer=2, n_head=4, n_embd=64))

    def loss(batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        _, value = model(*batch)
        return value

    def evaluate() -> dict[str, float]:
        model.eval()
        with torch.no_grad():
            value = sum(float(model(x, y)[1]) for x, y in val_batches) / len(val_batches)
        model.train()
        return {"loss": value, "val_loss": value}

    return TaskInstance(model=model, loss=loss, batches=_batches(corpus.train, seed), evaluate=evaluate)


GPT_TASKS: list[TaskSpec] = [
    TaskSpec(
        name="char-gpt",
        description="character-level GPT (2 layers, 4 heads, width 64, context 64) on stdlib source",
        metric="val_loss",
        mode="min",
        target=2.5,
        steps=200,
        quick_steps=60,
        eval_every=20,
        family="model",
        build=_build,
    ),
]
