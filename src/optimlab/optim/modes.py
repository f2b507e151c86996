r"""Train / eval modes of optimizers that evaluate at a different point than they train.

Schedule-free methods (Defazio et al., "The Road Less Scheduled", 2024) take gradients at
:math:`y_t = (1-\beta_1) z_t + \beta_1 x_t` but their result is the average :math:`x_t`; such
optimizers (``ScheduleFreeAdamW`` here, the ``schedulefree`` package's) expose ``eval()`` to put
:math:`x_t` in the parameters and ``train()`` to put :math:`y_t` back. Code that evaluates a model
while an arbitrary optimizer trains it uses these helpers, which are no-ops for every other optimizer
(duck-typed: an optimizer has modes when it has callable ``train`` and ``eval`` attributes). A
wrapper that holds its inner optimizer as ``.optimizer`` (:class:`optimlab.optim.Lookahead`) has modes
when the optimizer it wraps has them; its ``train()``/``eval()`` pass the switch on.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

__all__ = ["eval_weights", "has_modes", "set_mode"]


def has_modes(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer`` has ``train()`` and ``eval()`` methods (e.g. schedule-free optimizers); for a
    wrapper (an ``.optimizer`` attribute holding a ``torch.optim.Optimizer``, such as Lookahead), whether
    it has them and the wrapped optimizer has modes."""
    if not (callable(getattr(optimizer, "train", None)) and callable(getattr(optimizer, "eval", None))):
        return False
    inner = getattr(optimizer, "optimizer", None)
    return has_modes(inner) if isinstance(inner, torch.optim.Optimizer) else True


def set_mode(optimizer: torch.optim.Optimizer, mode: str) -> None:
    """Call ``optimizer.train()`` or ``optimizer.eval()`` (``mode`` = ``"train"`` / ``"eval"``) when it has
    modes; do nothing otherwise."""
    if mode not in ("train", "eval"):
        raise ValueError(f"Invalid mode: {mode!r} (accepted: 'train', 'eval')")
    if has_modes(optimizer):
        getattr(optimizer, mode)()


@contextmanager
def eval_weights(optimizer: torch.optim.Optimizer) -> Iterator[None]:
    """Within the block the parameters hold the optimizer's evaluation weights (``optimizer.eval()``);
    on exit, also after an error, the optimizer is back in train mode (``optimizer.train()``), ready to
    step. A no-op for optimizers without modes."""
    set_mode(optimizer, "eval")
    try:
        yield
    finally:
        set_mode(optimizer, "train")
