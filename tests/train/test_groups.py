"""optimlab.param_groups: no decay on biases, norm weights and embeddings; layer-wise LR decay."""

from __future__ import annotations

import itertools
import re

import pytest
import torch
from torch import nn

import optimlab
from optimlab.optim.registry import create_optimizer
from optimlab.train.model import GPT, GPTConfig


class BasicBlock(nn.Module):
    """torchvision's ResNet BasicBlock, written here: conv-bn-relu-conv-bn + (projected) identity."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.downsample = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                                            nn.BatchNorm2d(out_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + identity)


class TinyResNet(nn.Module):
    """A torchvision-style ResNet: stem conv + BN, stages of BasicBlocks, global pooling, linear head."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.layer1 = nn.Sequential(BasicBlock(8, 8, 1), BasicBlock(8, 8, 1))
        self.layer2 = nn.Sequential(BasicBlock(8, 16, 2), BasicBlock(16, 16, 1))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        return self.fc(torch.flatten(self.avgpool(self.layer2(self.layer1(x))), 1))


def _names_by_group(model: nn.Module, groups: list[dict]) -> list[set[str]]:
    name_of = {id(p): n for n, p in model.named_parameters()}
    return [{name_of[id(p)] for p in group["params"]} for group in groups]


def _expected_no_decay_gpt(name: str) -> bool:
    # Written from the model's layout: biases, LayerNorm weights (ln_1, ln_2, ln_f), embedding tables.
    return name.endswith(".bias") or re.search(r"(^|\.)ln_(1|2|f)\.weight$", name) is not None or name in (
        "wte.weight", "wpe.weight")


def _expected_no_decay_resnet(name: str) -> bool:
    # BatchNorm weights are `bn*.weight` or the second module of a downsample Sequential (`downsample.1`).
    return name.endswith(".bias") or re.search(r"(bn\d|downsample\.1)\.weight$", name) is not None


GPT_SHAPES = list(itertools.product([1, 3], [True, False], [0.0, 0.05]))


@pytest.mark.parametrize("n_layer,bias,weight_decay", GPT_SHAPES)
def test_gpt_no_decay_group(n_layer: int, bias: bool, weight_decay: float) -> None:
    model = GPT(GPTConfig(vocab_size=11, block_size=8, n_layer=n_layer, n_head=2, n_embd=8, bias=bias))
    groups = optimlab.param_groups(model, weight_decay)
    names = _names_by_group(model, groups)
    all_names = {n for n, _ in model.named_parameters()}
    assert set().union(*names) == all_names and sum(map(len, names)) == len(all_names)
    no_decay = {n for n in all_names if _expected_no_decay_gpt(n)}
    assert len(groups) == 2
    assert groups[0]["weight_decay"] == weight_decay and groups[1]["weight_decay"] == 0.0
    assert names[1] == no_decay
    assert names[0] == all_names - no_decay
    assert {n for n in names[0] if n.endswith("c_attn.weight")} == {f"blocks.{i}.attn.c_attn.weight"
                                                                     for i in range(n_layer)}
    assert all(g["lr_scale"] == 1.0 and "lr" not in g for g in groups)
    # the head is tied to the token embedding: it is the same tensor, exempt once
    assert model.lm_head.weight is model.wte.weight and "lm_head.weight" not in all_names


def test_torchvision_style_cnn_no_decay_group() -> None:
    model = TinyResNet()
    groups = optimlab.param_groups(model, 5e-4)
    names = _names_by_group(model, groups)
    all_names = {n for n, _ in model.named_parameters()}
    no_decay = {n for n in all_names if _expected_no_decay_resnet(n)}
    assert [g["weight_decay"] for g in groups] == [5e-4, 0.0]
    assert names[1] == no_decay and names[0] == all_names - no_decay
    assert "fc.bias" in no_decay and "layer2.0.downsample.1.weight" in no_decay and "fc.weight" in names[0]
    assert all(p.dim() == 4 for n, p in model.named_parameters() if n in names[0] and n != "fc.weight")


def test_custom_patterns_and_frozen_parameters() -> None:
    model = TinyResNet()
    model.conv1.weight.requires_grad_(False)
    groups = optimlab.param_groups(model, 0.1, no_decay=("fc.*",), no_decay_modules=())
    names = _names_by_group(model, groups)
    assert names[1] == {"fc.weight", "fc.bias"}
    assert "conv1.weight" not in names[0] | names[1]
    assert "bn1.weight" in names[0]


@pytest.mark.parametrize("n_layer,layer_decay", [(1, 0.5), (3, 0.75), (4, 0.9), (2, 1.0)])
def test_layer_decay_scales(n_layer: int, layer_decay: float) -> None:
    model = GPT(GPTConfig(vocab_size=7, block_size=4, n_layer=n_layer, n_head=1, n_embd=4))
    lr = 2e-3
    groups = optimlab.param_groups(model, 0.1, layer_decay=layer_decay, lr=lr)
    for group, names in zip(groups, _names_by_group(model, groups)):
        for name in names:
            match = re.match(r"blocks\.(\d+)\.", name)
            depth = int(match.group(1)) + 1 if match else (0 if name.startswith(("wte", "wpe")) else n_layer + 1)
            expected = layer_decay ** (n_layer + 1 - depth)
            assert group["lr_scale"] == pytest.approx(expected, rel=1e-15)
            assert group["lr"] == pytest.approx(lr * expected, rel=1e-15)
            assert group["weight_decay"] == (0.0 if _expected_no_decay_gpt(name) else 0.1)
    depths = [g["lr_scale"] for g in groups]
    assert depths == sorted(depths)  # ordered from the embeddings to the head


@pytest.mark.parametrize("name", ["torch.adamw", "adamw"])
def test_optimizer_decays_only_the_decay_group(name: str) -> None:
    """With zero gradients AdamW's step is pure decoupled decay θ ← θ(1 − ηλ): only the decay group moves."""
    model = GPT(GPTConfig(vocab_size=9, block_size=4, n_layer=2, n_head=2, n_embd=8))
    lr, weight_decay = 0.1, 0.5
    optimizer = create_optimizer(optimlab.param_groups(model, weight_decay), name, lr=lr)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    for n, p in model.named_parameters():
        factor = 1.0 if _expected_no_decay_gpt(n) else 1.0 - lr * weight_decay
        torch.testing.assert_close(p.detach(), before[n] * factor, rtol=1e-6, atol=0)


@pytest.mark.parametrize("kwargs,match", [
    ({"weight_decay": -0.1}, "weight_decay"),
    ({"weight_decay": float("nan")}, "weight_decay"),
    ({"weight_decay": 0.1, "layer_decay": 0.0}, "layer_decay"),
    ({"weight_decay": 0.1, "layer_decay": 1.5}, "layer_decay"),
    ({"weight_decay": 0.1, "lr": -1.0}, "lr"),
    ({"weight_decay": 0.1, "layer_decay": 0.5, "blocks": "layers"}, "blocks"),
])
def test_bad_arguments(kwargs: dict, match: str) -> None:
    model = GPT(GPTConfig(vocab_size=5, block_size=4, n_layer=1, n_head=1, n_embd=4))
    with pytest.raises(ValueError, match=match):
        optimlab.param_groups(model, **kwargs)
