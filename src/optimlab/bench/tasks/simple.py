"""A task from plain callables: what a person with a model, a loss and a data loader already has.

Example (a complete file is ``examples/digits_cnn.py``)::

    from optimlab.bench.tasks import make_task

    TASK = make_task(
        "my-net",
        model=lambda seed: MyNet(),                          # seed -> torch.nn.Module (torch is seeded first)
        loss=lambda model, batch: F.cross_entropy(model(batch[0]), batch[1]),
        batches=lambda seed: DataLoader(train_set, batch_size=64, shuffle=True,
                                        generator=torch.Generator().manual_seed(seed)),
        evaluate=lambda model: {"accuracy": accuracy(model, val_set)},
        metric="accuracy", mode="max", target=0.95, steps=500,
    )

and then ``optimlab bench --task my_file.py:TASK --optimizers adamw,lion``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch

from optimlab.bench.tasks.base import TaskInstance, TaskSpec

__all__ = ["make_task", "to_device"]


def to_device(batch: Any, device: torch.device | str) -> Any:
    """``batch`` with every tensor moved to ``device`` (through tuples, lists and dicts)."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # a namedtuple
        return type(batch)(*(to_device(item, device) for item in batch))
    if isinstance(batch, (tuple, list)):
        return type(batch)(to_device(item, device) for item in batch)
    if isinstance(batch, dict):
        return {key: to_device(value, device) for key, value in batch.items()}
    return batch


def _endless(factory: Callable[[int], Iterable[Any]], seed: int, device: str) -> Iterator[Any]:
    """Batches forever: a re-iterable (a ``DataLoader``) is iterated again each epoch (it reshuffles with
    its own generator); a one-shot iterator is rebuilt from ``factory(seed + epoch)``."""
    source = factory(seed)
    epoch = 0
    while True:
        produced = False
        for batch in source:
            produced = True
            yield to_device(batch, device)
        if not produced:
            raise ValueError(f"Invalid batches: the iterator for seed {seed + epoch} is empty")
        epoch += 1
        if iter(source) is source:  # an exhausted one-shot iterator
            source = factory(seed + epoch)


def make_task(
    name: str,
    *,
    model: Callable[[int], torch.nn.Module],
    loss: Callable[[torch.nn.Module, Any], torch.Tensor],
    batches: Callable[[int], Iterable[Any]],
    evaluate: Callable[[torch.nn.Module], dict[str, float]],
    metric: str,
    mode: str = "min",
    target: float,
    steps: int,
    quick_steps: int | None = None,
    eval_every: int | None = None,
    description: str = "",
    deterministic: bool | None = None,
) -> TaskSpec:
    """A :class:`TaskSpec` from plain callables.

    Args:
        name: the task's name in tables and ``--task`` lists.
        model: ``seed -> module``; ``torch.manual_seed(seed)`` is called first, so plain construction is
            seeded. The module is moved to the run's device (``--device``).
        loss: ``(model, batch) -> scalar`` training loss (differentiable); the batch is already on the device.
        batches: ``seed -> iterable of batches`` (e.g. a ``DataLoader`` with a generator seeded by ``seed``);
            iterated again at each epoch's end, so the task never runs out of data.
        evaluate: ``model -> {metric name: value}`` on held-out data; called in eval mode under
            ``torch.no_grad`` with the model on the device (move held-out tensors with
            ``.to(next(model.parameters()).device)``). Must contain ``metric``.
        metric / mode / target: the metric tuned and reported, ``"min"`` or ``"max"``, and the value that
            counts as reached.
        steps: optimizer steps per trial; ``quick_steps`` (default ``steps // 4``) under ``--quick``;
            ``eval_every`` (default ``steps // 20``) how often ``evaluate`` runs.
        description: one line for listings.
        deterministic: whether results ignore the seed (default: no).
    """
    for label, function in (("model", model), ("loss", loss), ("batches", batches), ("evaluate", evaluate)):
        if not callable(function):
            raise TypeError(f"Invalid {label} for task {name!r}: {type(function).__name__} (accepted: a callable)")

    def build(seed: int, device: str = "cpu") -> TaskInstance:
        torch.manual_seed(seed)
        module = model(seed).to(device)

        def training_loss(batch: Any) -> torch.Tensor:
            return loss(module, batch)

        def evaluation() -> dict[str, float]:
            was_training = module.training
            module.eval()
            try:
                with torch.no_grad():
                    return {key: float(value) for key, value in evaluate(module).items()}
            finally:
                module.train(was_training)

        return TaskInstance(model=module, loss=training_loss, batches=_endless(batches, seed, device),
                            evaluate=evaluation)

    build.task_callables = (model, loss, batches, evaluate)  # type: ignore[attr-defined]  # for fingerprints
    return TaskSpec(
        name=name,
        description=description or f"user task {name}",
        metric=metric,
        mode=mode,
        target=float(target),
        steps=steps,
        quick_steps=quick_steps if quick_steps is not None else max(1, steps // 4),
        eval_every=eval_every if eval_every is not None else max(1, steps // 20),
        family="model",
        build=build,
        deterministic=deterministic,
    )
