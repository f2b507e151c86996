"""A small decoder-only, character-level GPT.

The architecture is GPT-2's (Radford et al. 2019, "Language Models are Unsupervised Multitask
Learners"): token + learned position embeddings, ``n_layer`` pre-norm transformer blocks

    x ← x + Attn(LN(x)),   x ← x + MLP(LN(x)),   MLP(h) = W₂ GELU(W₁ h),  W₁: d → 4d,

a final LayerNorm and a language-model head tied to the token embedding (Press & Wolf 2017).
Attention is causal multi-head scaled dot-product attention (Vaswani et al. 2017),
softmax(QKᵀ/√d_head + causal mask) V. Weights start at N(0, 0.02²); the residual output projections
at N(0, 0.02²/(2·n_layer)) so the residual stream's variance does not grow with depth (GPT-2).

The blocks are an ordered :class:`torch.nn.ModuleList` at ``model.blocks``, which is what
:func:`optimlab.param_groups` uses for layer-wise learning-rate decay.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["GPTConfig", "GPT"]


@dataclass(frozen=True)
class GPTConfig:
    """Shape of a :class:`GPT`.

    Attributes:
        vocab_size: number of distinct tokens (characters), >= 1.
        block_size: context length in tokens, >= 1.
        n_layer: number of transformer blocks, >= 1.
        n_head: attention heads per block, >= 1; must divide ``n_embd``.
        n_embd: embedding (model) width, >= 1.
        dropout: dropout probability in [0, 1) after embeddings, attention and MLP.
        bias: whether Linear and LayerNorm layers have biases.
    """

    vocab_size: int
    block_size: int = 128
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.0
    bias: bool = True

    def __post_init__(self) -> None:
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"Invalid {name}: {value!r} (accepted range: an integer >= 1)")
        if self.n_embd % self.n_head != 0:
            raise ValueError(f"Invalid n_head: {self.n_head} must divide n_embd={self.n_embd}")
        if not (0.0 <= self.dropout < 1.0):
            raise ValueError(f"Invalid dropout: {self.dropout} (accepted range: [0, 1))")

    def to_dict(self) -> dict[str, int | float | bool]:
        """The fields as a plain dict (stored in checkpoints)."""
        return asdict(self)


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention: softmax(QKᵀ/√d_head + mask) V, heads concatenated and projected."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.n_head = config.n_head
        self.dropout = config.dropout
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: Tensor) -> Tensor:
        """``x``: (batch, time, n_embd) → same shape."""
        batch, time, width = x.shape
        query, key, value = self.c_attn(x).split(width, dim=2)
        shape = (batch, time, self.n_head, width // self.n_head)
        query, key, value = (t.view(shape).transpose(1, 2) for t in (query, key, value))
        attended = F.scaled_dot_product_attention(
            query, key, value, is_causal=True, dropout_p=self.dropout if self.training else 0.0
        )
        return self.resid_dropout(self.c_proj(attended.transpose(1, 2).reshape(batch, time, width)))


class MLP(nn.Module):
    """Position-wise feed-forward layer W₂ GELU(W₁ h) with a 4× hidden width."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: Tensor) -> Tensor:
        """``x``: (..., n_embd) → same shape."""
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x))))


class Block(nn.Module):
    """One pre-norm transformer block: x + Attn(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: Tensor) -> Tensor:
        """``x``: (batch, time, n_embd) → same shape."""
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """Decoder-only character-level GPT (GPT-2 layout, tied input/output embeddings).

    ``forward(idx, targets=None)`` returns ``(logits, loss)``: logits of shape
    (batch, time, vocab_size) and, when ``targets`` is given, the mean next-token cross-entropy
    −(1/N) Σ log softmax(logits)[target], else ``None``.
    """

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.block_size, config.n_embd)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # weight tying (Press & Wolf 2017)
        self.apply(self._init_weights)
        residual_std = 0.02 / math.sqrt(2 * config.n_layer)
        for name, parameter in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(parameter, mean=0.0, std=residual_std)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def num_parameters(self) -> int:
        """Number of distinct parameters (the tied embedding counted once)."""
        return sum(p.numel() for p in self.parameters())

    def forward(self, idx: Tensor, targets: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """``idx``: (batch, time) token ids with time <= block_size; ``targets`` the same shape."""
        time = idx.shape[1]
        if time > self.config.block_size:
            raise ValueError(f"Invalid idx: sequence length {time} exceeds block_size={self.config.block_size}")
        positions = torch.arange(time, device=idx.device)
        x = self.drop(self.wte(idx) + self.wpe(positions))
        for block in self.blocks:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
        return logits, loss

    @torch.no_grad()
    def generate(self, idx: Tensor, max_new_tokens: int, *, temperature: float = 1.0, top_k: int | None = None,
                 generator: torch.Generator | None = None) -> Tensor:
        """Extend ``idx`` (batch, time) by ``max_new_tokens`` tokens sampled from softmax(logits / temperature),
        restricted to the ``top_k`` most likely tokens when given; the context is cropped to block_size."""
        if temperature <= 0:
            raise ValueError(f"Invalid temperature: {temperature} (accepted range: > 0)")
        if top_k is not None and top_k < 1:
            raise ValueError(f"Invalid top_k: {top_k} (accepted range: an integer >= 1, or None)")
        for _ in range(max_new_tokens):
            logits, _ = self(idx[:, -self.config.block_size:])
            logits = logits[:, -1, :] / temperature
            if top_k is not None:
                kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            next_token = torch.multinomial(F.softmax(logits, dim=-1), 1, generator=generator)
            idx = torch.cat([idx, next_token], dim=1)
        return idx
