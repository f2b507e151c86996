"""The trainer evaluates and samples schedule-free optimizers on their averaged (eval-mode) weights."""

from __future__ import annotations

from pathlib import Path

import torch

from optimlab.train.trainer import Trainer

from train_helpers import tiny_config


def _weights(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def _max_difference(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a, b))


def test_validation_and_sample_see_the_eval_weights(tmp_path: Path, text_file: Path) -> None:
    trainer = Trainer(tiny_config(tmp_path, text_file, optimizer="schedule-free-adamw", steps=6, eval_every=6,
                                  checkpoint_every=6), quiet=True)
    trainer.train()
    optimizer = trainer.optimizer
    train_weights = _weights(trainer.model)
    optimizer.eval()
    eval_weights = _weights(trainer.model)
    optimizer.train()
    assert _max_difference(train_weights, eval_weights) > 1e-4  # the two points are far enough apart to tell

    seen: list[list[torch.Tensor]] = []
    handle = trainer.model.register_forward_pre_hook(lambda module, args: seen.append(_weights(module)))
    trainer.evaluate()
    evaluations = len(seen)
    trainer.sample(4)
    handle.remove()
    assert evaluations > 0 and len(seen) > evaluations
    assert max(_max_difference(weights, eval_weights) for weights in seen) <= 1e-6
    # back in train mode on the training weights (up to the rounding of the y -> x -> y switch)
    assert optimizer.param_groups[0]["train_mode"] is True
    assert _max_difference(_weights(trainer.model), train_weights) <= 1e-6
    trainer.close()
