r"""The cautious mask (Liang et al., "Cautious Optimizers: Improving Training with One Line of Code", 2024).

A momentum optimizer proposes an update :math:`u_t` (the step is :math:`\theta \leftarrow \theta - \eta u_t`);
the cautious variant keeps only the components whose sign agrees with the current gradient
:math:`g_t` and rescales the survivors so the step keeps its size on average:

.. math::
    \phi_t = \mathbb{1}[u_t \odot g_t > 0], \qquad
    u_t \leftarrow u_t \odot \phi_t \cdot \frac{d}{\operatorname{nnz}(\phi_t) + 1}

with :math:`d` the number of elements of the tensor (the authors' code: strict ``> 0``, and ``+ 1``
in the denominator so an all-zero mask gives a zero step, not a division by zero). The mask is
applied per tensor, before the decoupled weight decay (which is not a gradient direction) and
before any trust ratio (LAMB), so it is part of each optimizer's state-free rule: the per-tensor,
multi-tensor and fused paths all call :func:`cautious_`.
"""

from __future__ import annotations

from torch import Tensor

__all__ = ["cautious_"]


def cautious_(update: Tensor, grad: Tensor) -> Tensor:
    """Apply the cautious mask (module docstring) to ``update`` in place and return it.

    ``update`` is the direction that is subtracted from the parameter (before the learning rate),
    ``grad`` the gradient the rule consumed (after ``maximize`` and any coupled weight decay).
    The rescaling reduces over the whole tensor, so a fused rule that uses it is not elementwise.
    """
    mask = (update * grad > 0).to(update.dtype)
    return update.mul_(mask).mul_(mask.numel() / (mask.sum() + 1))
