r"""The exploding recurrent network of the seed's clipping study, and its synthetic sequence data.

A stack of ``num_layers`` Elman RNN layers (:math:`h_t = \tanh(W_{ih} x_t + W_{hh} h_{t-1} + b)`) with a
linear read-out of the last hidden state, every weight drawn from :math:`U(-a, a)` with a large ``a``
(2 in the study). With such weights the recurrent Jacobians have spectral radius far above one, so
the loss surface has cliffs and the gradient norm spikes by orders of magnitude: the setting in which
Pascanu, Mikolov & Bengio ("On the difficulty of training recurrent neural networks", 2013) motivate
gradient clipping. The bench lab reuses it as its "exploding-rnn" task.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch import Tensor, nn

__all__ = ["ExplodingRNN", "SequenceData", "make_sequence_data", "sequence_batches"]


class ExplodingRNN(nn.Module):
    r"""``num_layers`` stacked tanh RNN layers and a linear head on the last time step.

    .. math:: \hat y = W_o h^{(L)}_T + b_o, \qquad h^{(l)}_t = \tanh\big(W^{(l)}_{ih} h^{(l-1)}_t
        + W^{(l)}_{hh} h^{(l)}_{t-1} + b^{(l)}\big), \qquad h^{(0)}_t = x_t

    All weights and biases are initialised :math:`U(-\text{init\_range}, \text{init\_range})`.
    Input ``(batch, seq_len, input_size)``, output ``(batch, output_size)``.
    """

    def __init__(self, input_size: int = 8, hidden_size: int = 50, num_layers: int = 3, output_size: int = 1,
                 init_range: float = 2.0) -> None:
        super().__init__()
        for name, value in (("input_size", input_size), ("hidden_size", hidden_size), ("num_layers", num_layers),
                            ("output_size", output_size)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"Invalid {name}: {value} (accepted range: an int >= 1)")
        if not (init_range > 0.0) or math.isinf(init_range):
            raise ValueError(f"Invalid init_range: {init_range} (accepted range: a finite value > 0)")
        self.init_range = float(init_range)
        self.rnn = nn.RNN(input_size, hidden_size, num_layers=num_layers, nonlinearity="tanh", batch_first=True)
        self.head = nn.Linear(hidden_size, output_size)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Draw every parameter from :math:`U(-\\text{init\\_range}, \\text{init\\_range})` (uses torch's global RNG)."""
        with torch.no_grad():
            for param in self.parameters():
                param.uniform_(-self.init_range, self.init_range)

    def forward(self, inputs: Tensor) -> Tensor:
        """Map ``(batch, seq_len, input_size)`` sequences to ``(batch, output_size)`` predictions."""
        hidden_states, _ = self.rnn(inputs)
        return self.head(hidden_states[:, -1])


class SequenceData(tuple):
    """``(inputs, targets)``: inputs ``(n, seq_len, input_size)``, targets ``(n, output_size)``."""

    __slots__ = ()

    def __new__(cls, inputs: Tensor, targets: Tensor) -> SequenceData:
        return super().__new__(cls, (inputs, targets))

    @property
    def inputs(self) -> Tensor:
        """The input sequences."""
        return self[0]

    @property
    def targets(self) -> Tensor:
        """The regression targets."""
        return self[1]


def make_sequence_data(num_samples: int = 256, seq_len: int = 20, input_size: int = 8, output_size: int = 1,
                       noise: float = 0.01, seed: int = 0) -> SequenceData:
    r"""A deterministic sequence-regression set: the target is a fixed linear read-out of the sequence's sum.

    .. math:: x_{t} \sim \mathcal N(0, I), \qquad y = \frac{1}{\sqrt{T}} W^\top \sum_{t=1}^{T} x_t + \sigma
        \varepsilon, \qquad W_{:,j} \text{ a random unit vector}

    so the network must integrate its input over all ``seq_len`` steps (long-range credit assignment,
    where the exploding gradients live). Each target has variance :math:`1 + \sigma^2` (predicting zero scores
    an MSE of about 1); ``seed`` fixes everything.
    """
    for name, value in (("num_samples", num_samples), ("seq_len", seq_len), ("input_size", input_size),
                        ("output_size", output_size)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"Invalid {name}: {value} (accepted range: an int >= 1)")
    if not (noise >= 0.0):
        raise ValueError(f"Invalid noise: {noise} (accepted range: >= 0)")
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(num_samples, seq_len, input_size, generator=generator)
    readout = torch.randn(input_size, output_size, generator=generator)
    readout = readout / torch.linalg.vector_norm(readout, dim=0, keepdim=True)
    targets = inputs.sum(dim=1) @ readout / math.sqrt(seq_len)
    targets = targets + noise * torch.randn(num_samples, output_size, generator=generator)
    return SequenceData(inputs, targets)


def sequence_batches(data: SequenceData, batch_size: int, generator: torch.Generator) -> Iterator[SequenceData]:
    """One epoch of shuffled minibatches (the last one may be smaller), in the order ``generator`` draws."""
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"Invalid batch_size: {batch_size} (accepted range: an int >= 1)")
    order = torch.randperm(len(data.inputs), generator=generator)
    for start in range(0, len(order), batch_size):
        index = order[start:start + batch_size]
        yield SequenceData(data.inputs[index], data.targets[index])
