"""The GPT against a NumPy reference of its equations (attention, blocks, loss), causality, tying, bad input."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from optimlab.train.model import GPT, GPTConfig


def _layer_norm(x: np.ndarray, weight: np.ndarray, bias: np.ndarray | None) -> np.ndarray:
    mean = x.mean(-1, keepdims=True)
    var = x.var(-1, keepdims=True)
    out = (x - mean) / np.sqrt(var + 1e-5) * weight
    return out + bias if bias is not None else out


def _gelu(x: np.ndarray) -> np.ndarray:
    erf = np.vectorize(math.erf)
    return 0.5 * x * (1.0 + erf(x / math.sqrt(2.0)))


def _linear(x: np.ndarray, params: dict[str, np.ndarray], name: str) -> np.ndarray:
    out = x @ params[f"{name}.weight"].T
    return out + params[f"{name}.bias"] if f"{name}.bias" in params else out


def _reference_forward(params: dict[str, np.ndarray], config: GPTConfig, idx: np.ndarray) -> np.ndarray:
    """GPT-2 in NumPy, float64: embeddings, pre-norm blocks with causal softmax attention, tied head."""
    time = idx.shape[1]
    x = params["wte.weight"][idx] + params["wpe.weight"][:time]
    head_dim = config.n_embd // config.n_head
    mask = np.triu(np.ones((time, time), dtype=bool), k=1)
    for i in range(config.n_layer):
        p = f"blocks.{i}."
        h = _layer_norm(x, params[p + "ln_1.weight"], params.get(p + "ln_1.bias"))
        qkv = _linear(h, params, p + "attn.c_attn")
        q, k, v = np.split(qkv, 3, axis=-1)
        heads = []
        for head in range(config.n_head):
            cols = slice(head * head_dim, (head + 1) * head_dim)
            scores = q[..., cols] @ k[..., cols].transpose(0, 2, 1) / math.sqrt(head_dim)
            scores = np.where(mask, -np.inf, scores)
            weights = np.exp(scores - scores.max(-1, keepdims=True))
            weights /= weights.sum(-1, keepdims=True)
            heads.append(weights @ v[..., cols])
        x = x + _linear(np.concatenate(heads, -1), params, p + "attn.c_proj")
        h = _layer_norm(x, params[p + "ln_2.weight"], params.get(p + "ln_2.bias"))
        x = x + _linear(_gelu(_linear(h, params, p + "mlp.c_fc")), params, p + "mlp.c_proj")
    x = _layer_norm(x, params["ln_f.weight"], params.get("ln_f.bias"))
    return x @ params["wte.weight"].T


CONFIGS = [
    GPTConfig(vocab_size=13, block_size=9, n_layer=2, n_head=3, n_embd=12, bias=True),
    GPTConfig(vocab_size=7, block_size=5, n_layer=1, n_head=1, n_embd=8, bias=False),
    GPTConfig(vocab_size=20, block_size=16, n_layer=3, n_head=4, n_embd=16, bias=True),
]


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("seed", [0, 1])
def test_forward_matches_numpy_reference(config: GPTConfig, seed: int) -> None:
    torch.manual_seed(seed)
    model = GPT(config).double()
    with torch.no_grad():  # random LayerNorm/bias values so that every term of the equations matters
        for name, p in model.named_parameters():
            if name.endswith("bias") or "ln_" in name:
                p.normal_(0.0 if name.endswith("bias") else 1.0, 0.3)
    idx = torch.randint(config.vocab_size, (3, config.block_size))
    targets = torch.randint(config.vocab_size, (3, config.block_size))
    logits, loss = model(idx, targets)
    params = {n: p.detach().numpy() for n, p in model.named_parameters()}
    expected = _reference_forward(params, config, idx.numpy())
    np.testing.assert_allclose(logits.detach().numpy(), expected, rtol=1e-10, atol=1e-10)
    log_probs = expected - expected.max(-1, keepdims=True)
    log_probs -= np.log(np.exp(log_probs).sum(-1, keepdims=True))
    reference_loss = -np.take_along_axis(log_probs, targets.numpy()[..., None], -1).mean()
    assert float(loss.detach()) == pytest.approx(reference_loss, rel=1e-12)


def test_causal_and_tied() -> None:
    model = GPT(CONFIGS[0]).eval()
    idx = torch.randint(13, (2, 9))
    changed = idx.clone()
    changed[:, 5:] = (changed[:, 5:] + 1) % 13
    torch.testing.assert_close(model(idx)[0][:, :5], model(changed)[0][:, :5], rtol=0, atol=0)
    assert model(idx)[1] is None
    assert model.lm_head.weight is model.wte.weight
    assert model.num_parameters() == sum(p.numel() for p in model.parameters())


def test_residual_projection_init_scale() -> None:
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=50, block_size=8, n_layer=8, n_head=4, n_embd=128))
    std = torch.cat([p.detach().flatten() for n, p in model.named_parameters() if n.endswith("c_proj.weight")]).std()
    assert float(std) == pytest.approx(0.02 / math.sqrt(16), rel=0.02)
    assert float(model.blocks[0].mlp.c_fc.weight.detach().std()) == pytest.approx(0.02, rel=0.02)


def test_generate_is_seeded_and_respects_block_size() -> None:
    model = GPT(CONFIGS[1])
    start = torch.zeros(1, 1, dtype=torch.long)
    a = model.generate(start, 12, generator=torch.Generator().manual_seed(5), top_k=3)
    b = model.generate(start, 12, generator=torch.Generator().manual_seed(5), top_k=3)
    assert a.shape == (1, 13) and torch.equal(a, b)
    greedy = model.generate(start, 3, top_k=1)
    logits, _ = model(start)
    assert int(greedy[0, 1]) == int(logits[0, -1].argmax())


@pytest.mark.parametrize("kwargs,match", [
    ({"vocab_size": 0}, "vocab_size"),
    ({"vocab_size": 5, "n_head": 3, "n_embd": 8}, "n_head"),
    ({"vocab_size": 5, "dropout": 1.0}, "dropout"),
    ({"vocab_size": 5, "block_size": 0}, "block_size"),
])
def test_bad_config(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        GPTConfig(**kwargs)


def test_bad_forward_and_generate_arguments() -> None:
    model = GPT(CONFIGS[1])
    with pytest.raises(ValueError, match="block_size=5"):
        model(torch.zeros(1, 6, dtype=torch.long))
    with pytest.raises(ValueError, match="temperature"):
        model.generate(torch.zeros(1, 1, dtype=torch.long), 1, temperature=0.0)
    with pytest.raises(ValueError, match="top_k"):
        model.generate(torch.zeros(1, 1, dtype=torch.long), 1, top_k=0)
