"""Helpers shared by the analysis tools: snapshots of a model's and an optimizer's state that are
restored bitwise, flat views of a parameter list, evaluating a loss over one batch or several, and one
training step (with a closure for the optimizers that need one).

Throughout :mod:`optimlab.analysis`, a *loss function* is a callable ``loss_fn(model, batch) -> Tensor``
returning a scalar; :func:`supervised_loss` builds one from a criterion such as
``torch.nn.functional.cross_entropy`` for batches of ``(inputs, targets)``.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from optimlab.optim.registry import needs_closure

__all__ = [
    "LossFn",
    "supervised_loss",
    "trainable_parameters",
    "flatten",
    "unflatten",
    "preserved_model",
    "preserved_optimizer",
    "evaluation_mode",
    "mean_loss",
    "as_batches",
    "cycle_batches",
    "training_step",
]

LossFn = Callable[[nn.Module, Any], Tensor]


def supervised_loss(criterion: Callable[[Tensor, Tensor], Tensor]) -> LossFn:
    """Return ``loss_fn(model, (inputs, targets)) = criterion(model(inputs), targets)``."""

    def loss_fn(model: nn.Module, batch: Any) -> Tensor:
        inputs, targets = batch
        return criterion(model(inputs), targets)

    return loss_fn


def trainable_parameters(model: nn.Module) -> list[Tensor]:
    """The parameters of ``model`` that require a gradient, in ``model.parameters()`` order."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("Invalid model: it has no parameter with requires_grad=True")
    return params


def flatten(tensors: Sequence[Tensor]) -> Tensor:
    """Concatenate ``tensors`` into one 1-D vector (a copy), in order."""
    return torch.cat([t.reshape(-1) for t in tensors])


def unflatten(vector: Tensor, like: Sequence[Tensor]) -> list[Tensor]:
    """Split a 1-D ``vector`` into views shaped like ``like`` (inverse of :func:`flatten`)."""
    total = sum(t.numel() for t in like)
    if vector.dim() != 1 or vector.numel() != total:
        raise ValueError(f"Invalid vector: expected a 1-D tensor of {total} elements, got shape {tuple(vector.shape)}")
    return [chunk.view_as(t) for chunk, t in zip(vector.split([t.numel() for t in like]), like)]


def _training_flags(model: nn.Module) -> dict[nn.Module, bool]:
    return {module: module.training for module in model.modules()}


def _restore_training_flags(flags: dict[nn.Module, bool]) -> None:
    for module, training in flags.items():
        module.training = training


@contextlib.contextmanager
def preserved_model(model: nn.Module) -> Iterator[nn.Module]:
    """Snapshot ``model``'s parameters, buffers, gradients and train/eval flags; restore them bitwise on exit.

    The values are copied back into the same tensor objects, so references held elsewhere (by an
    optimizer, for instance) stay valid. Exceptions inside the block still restore the model.
    """
    saved = {name: tensor.detach().clone() for name, tensor in model.state_dict(keep_vars=True).items()}
    modes = _training_flags(model)
    grads = {param: None if param.grad is None else param.grad.detach().clone() for param in model.parameters()}
    try:
        yield model
    finally:
        with torch.no_grad():
            current = model.state_dict(keep_vars=True)
            for name, value in saved.items():
                current[name].detach().copy_(value)
        _restore_training_flags(modes)
        for param, grad in grads.items():
            param.grad = grad


@contextlib.contextmanager
def evaluation_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put ``model`` in ``eval`` mode (dropout off, running statistics used) and restore every module's flag on exit."""
    modes = _training_flags(model)
    model.eval()
    try:
        yield model
    finally:
        _restore_training_flags(modes)


@contextlib.contextmanager
def preserved_optimizer(optimizer: torch.optim.Optimizer) -> Iterator[torch.optim.Optimizer]:
    """Snapshot ``optimizer``'s state and hyperparameters; restore them bitwise on exit.

    Two snapshots: ``state_dict()`` (restored through ``load_state_dict``, so wrappers such as Lookahead
    get their inner optimizer and counters back), then the exact ``state`` entries and ``param_groups``
    dicts, put back as they were (``load_state_dict`` alone may cast state dtypes or add default keys).
    """
    saved_dict = copy.deepcopy(optimizer.state_dict())
    saved_state = {param: copy.deepcopy(entry) for param, entry in optimizer.state.items()}
    saved_groups = [{key: value if key == "params" else copy.deepcopy(value) for key, value in group.items()}
                    for group in optimizer.param_groups]
    try:
        yield optimizer
    finally:
        optimizer.load_state_dict(saved_dict)
        optimizer.state.clear()
        optimizer.state.update(saved_state)
        for group, saved in zip(optimizer.param_groups, saved_groups):
            group.clear()
            group.update(saved)


def as_batches(data: Any) -> list[Any]:
    """A list of batches from one batch (a tensor or a tuple/list of tensors) or an iterable of batches."""
    if isinstance(data, Tensor):
        return [data]
    if isinstance(data, (tuple, list)) and data and all(isinstance(item, Tensor) for item in data):
        return [data]
    batches = list(data)
    if not batches:
        raise ValueError("Invalid data: no batch to evaluate on")
    return batches


def mean_loss(model: nn.Module, loss_fn: LossFn, batches: Iterable[Any]) -> float:
    r"""Mean of ``loss_fn`` over ``batches`` (each batch weighted equally), without gradients.

    .. math:: \bar L = \frac{1}{B} \sum_{b=1}^{B} L(\theta; \text{batch}_b)
    """
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in batches:
            total += float(loss_fn(model, batch))
            count += 1
    return total / count


def cycle_batches(data: Iterable[Any]) -> Iterator[Any]:
    """Yield batches from ``data`` forever, restarting it when it runs out (a loader, a list, an infinite iterator)."""
    while True:
        produced = False
        for batch in data:
            produced = True
            yield batch
        if not produced:
            raise ValueError("Invalid data: the iterable yielded no batch (an exhausted generator?)")


def training_step(model: nn.Module, optimizer: torch.optim.Optimizer, loss_fn: LossFn, batch: Any) -> float:
    """One step on ``batch``: clear the gradients, ``loss_fn(model, batch)``, backward, ``optimizer.step()``;
    returns the loss before the step.

    An optimizer the registry marks ``needs_closure`` (SAM, LBFGS) gets ``step(closure)`` instead, the closure
    clearing the gradients and evaluating the same ``batch`` again (SAM calls it twice, LBFGS up to ``max_eval``
    times); the loss returned is the closure's first, at the parameters before the step.
    """
    def closure() -> Tensor:
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(model, batch)
        loss.backward()
        losses.append(float(loss.detach()))
        return loss

    losses: list[float] = []
    if needs_closure(optimizer):
        optimizer.step(closure)
    else:
        closure()
        optimizer.step()
    return losses[0]
