"""The trainer's step policy alone (accumulate, clip, guard, step, schedule) and evaluation in eval mode."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from train_helpers import tiny_config

from optimlab.clip import make_clipper
from optimlab.guard import NonFiniteGuard
from optimlab.schedules import create_scheduler
from optimlab.train.step import StepPolicy
from optimlab.train.trainer import Trainer


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1)).double()


def _data(steps: int, rows: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    return [(torch.randn(rows, 6, generator=generator, dtype=torch.float64),
             torch.randn(rows, 1, generator=generator, dtype=torch.float64)) for _ in range(steps)]


def _policy(model: torch.nn.Module, accum: int, *, guard: bool = False, schedule: str | None = None) -> StepPolicy:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)  # SGD: a gradient k times too large shows
    scheduler = create_scheduler(schedule, optimizer, total_steps=10) if schedule else None
    return StepPolicy(optimizer, make_clipper("norm:0.5", model.parameters()), accum=accum, scheduler=scheduler,
                      guard=NonFiniteGuard(optimizer, log=False) if guard else None)


def _mse(model: torch.nn.Module):
    return lambda batch: torch.nn.functional.mse_loss(model(batch[0]), batch[1])


def test_accumulating_k_micro_batches_equals_one_batch_k_times_larger() -> None:
    """float64, clipping active: k=4 micro-batches of 5 rows == 1 batch of 20 rows, step after step."""
    k, steps = 4, 5
    data = _data(steps, 5 * k)
    small, large = _model(), _model()
    accumulated, single = _policy(small, k), _policy(large, 1)
    for inputs, targets in data:
        micro = list(zip(inputs.chunk(k), targets.chunk(k)))
        a = accumulated.step(micro, _mse(small))
        b = single.step([(inputs, targets)], _mse(large))
        assert a.loss == pytest.approx(b.loss, rel=1e-6)  # the logged loss is summed in float32
        assert a.grad_norm == pytest.approx(b.grad_norm, rel=1e-12) and a.clipped == b.clipped
    assert any(s.clipped for s in [a, b])  # the clipping rule took part
    for p, q in zip(small.parameters(), large.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-13)


def test_wrong_number_of_micro_batches_is_refused() -> None:
    model = _model()
    with pytest.raises(ValueError, match="got 1 micro-batches for accum=2"):
        _policy(model, 2).step(_data(1, 4), _mse(model))


def test_skipped_step_does_not_advance_the_schedule() -> None:
    """A NaN loss at step 3 is skipped: parameters untouched, and the LR sequence is that of a run without it."""
    model, reference_model = _model(), _model()
    policy = _policy(model, 1, guard=True, schedule="warmup-cosine")
    reference = _policy(reference_model, 1, guard=True, schedule="warmup-cosine")
    data = _data(6, 4)
    lrs = []
    for index, batch in enumerate(data):
        if index == 3:
            before = [p.detach().clone() for p in model.parameters()]
            outcome = policy.step([batch], lambda b: _mse(model)(b) * float("nan"))
            assert outcome.skipped and all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
        outcome = policy.step([batch], _mse(model))
        assert not outcome.skipped
        lrs.append(policy.optimizer.param_groups[0]["lr"])
        reference.step([batch], _mse(reference_model))
        assert lrs[-1] == reference.optimizer.param_groups[0]["lr"]
    assert policy.guard.skipped_steps == 1
    assert policy.scheduler.last_epoch == reference.scheduler.last_epoch == 6
    assert len(set(lrs)) == 6  # the schedule moves every step, so an extra advance would show


def test_accumulation_in_the_trainer_equals_a_larger_batch(tmp_path: Path, text_file: Path) -> None:
    """One process: batch 4 x accum 2 == batch 8 (same windows: the epoch stream is addressed by position)."""
    runs = {}
    for batch_size, accum in ((4, 2), (8, 1)):
        trainer = Trainer(tiny_config(tmp_path / f"a{accum}", text_file, batch_size=batch_size, accum=accum,
                                      steps=6, dropout=0.0), quiet=True)
        runs[accum] = (trainer.train().losses, trainer.model.state_dict())
        trainer.close()
    (losses_a, weights_a), (losses_b, weights_b) = runs[2], runs[1]
    assert losses_a == pytest.approx(losses_b, rel=1e-5)
    for name in weights_a:
        torch.testing.assert_close(weights_a[name], weights_b[name], rtol=0, atol=2e-6)


def test_evaluation_runs_in_eval_mode(tmp_path: Path, text_file: Path) -> None:
    """dropout=0.5: evaluation sees every module in eval mode (no dropout), gives the same value twice and the
    value of the dropout-free model, and leaves the model in train mode."""
    trainer = Trainer(tiny_config(tmp_path, text_file, dropout=0.5, steps=2), quiet=True)
    trainer.train()
    modes: list[bool] = []
    hooks = [m.register_forward_pre_hook(lambda module, args: modes.append(module.training))
             for m in trainer.model.modules()]
    first, second = trainer.evaluate(), trainer.evaluate()
    for hook in hooks:
        hook.remove()
    assert modes and not any(modes)
    assert first == second
    assert trainer.model.training and all(m.training for m in trainer.model.modules())
    for module in trainer.model.modules():  # the same weights without dropout
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        elif isinstance(getattr(module, "dropout", None), float):  # attention's dropout_p
            module.dropout = 0.0
    assert trainer.evaluate() == first
    trainer.close()
