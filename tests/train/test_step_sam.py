"""The trainer's step policy with an optimizer that needs a closure (SAM): two gradient evaluations per step
on the same micro-batches, equal to SAM's own two-pass API driven by hand, with and without the guard."""

from __future__ import annotations

import pytest
import torch
from test_step import _data, _model  # the same small float64 model and data as the plain policy's tests

from optimlab.clip import make_clipper
from optimlab.guard import NonFiniteGuard
from optimlab.optim import create_optimizer
from optimlab.train.step import StepPolicy


def _mse(model: torch.nn.Module, calls: list[int] | None = None):
    def loss(batch):
        if calls is not None:
            calls.append(1)
        return torch.nn.functional.mse_loss(model(batch[0]), batch[1])
    return loss


def _by_hand(model: torch.nn.Module, optimizer, micro: list, clip: float) -> None:
    """SAM's first_step/second_step around the accumulated, clipped gradients of the same micro-batches."""
    for _ in range(2):
        optimizer.zero_grad(set_to_none=True)
        for batch in micro:
            (_mse(model)(batch) / len(micro)).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        if optimizer._saved:
            optimizer.second_step()
        else:
            optimizer.first_step()


@pytest.mark.parametrize("guarded", [False, True])
@pytest.mark.parametrize("name", ["sam-sgd", "asam-adamw"])
def test_sam_step_equals_the_two_pass_api_over_accumulated_micro_batches(name: str, guarded: bool) -> None:
    k, steps, clip = 2, 4, 0.5
    model, reference = _model(), _model()
    optimizer = create_optimizer(model.parameters(), name, lr=0.05)
    reference_optimizer = create_optimizer(reference.parameters(), name, lr=0.05)
    guard = NonFiniteGuard(optimizer, log=False) if guarded else None
    policy = StepPolicy(optimizer, make_clipper(f"norm:{clip}", model.parameters()), accum=k, guard=guard)
    calls: list[int] = []
    for inputs, targets in _data(steps, 4 * k):
        micro = list(zip(inputs.chunk(k), targets.chunk(k)))
        outcome = policy.step(iter(micro), _mse(model, calls))  # an iterator: the policy keeps the batches itself
        _by_hand(reference, reference_optimizer, micro, clip)
        assert not outcome.skipped
    assert len(calls) == 2 * k * steps  # two gradient evaluations per step, each over the k micro-batches
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-14)


def test_sam_with_fp16_grad_scaler_is_refused() -> None:
    model = _model()
    optimizer = create_optimizer(model.parameters(), "sam-sgd")
    scaler = torch.amp.GradScaler("cpu")
    with pytest.raises(ValueError, match="Invalid optimizer for fp16: SAM steps with a closure"):
        StepPolicy(optimizer, make_clipper("none", model.parameters()), scaler=scaler)


def test_trainer_runs_sam_by_name_and_resumes_bit_for_bit(tmp_path, text_file) -> None:
    """The whole trainer with ``optimizer="asam-adamw"`` (accumulation, clipping, guard, schedule): the loss
    falls, and stopping half-way and resuming gives the same losses and state bit for bit."""
    from test_trainer import _assert_same_state, _train
    from train_helpers import tiny_config

    from optimlab.optim.sam import SAM

    options = dict(steps=8, accum=2, clip="norm:1.0", schedule="warmup-cosine", optimizer="asam-adamw",
                   skip_nonfinite=True, eval_every=4, checkpoint_every=4)
    full, losses = _train(tiny_config(tmp_path / "full", text_file, **options))
    assert isinstance(full.optimizer, SAM) and losses[-1] < losses[0]
    _train(tiny_config(tmp_path / "split", text_file, **options), stop_at=4)
    resumed, rest = _train(tiny_config(tmp_path / "split", text_file, **options), resume=True)
    assert rest == losses[4:]
    _assert_same_state(full, resumed)


@pytest.mark.parametrize("guarded", [False, True])
def test_the_closure_returns_the_loss_averaged_over_ranks(guarded: bool) -> None:
    """Every evaluation the optimizer asks for returns the loss through ``reduce_mean``, as the gradients are
    all-reduced under DDP: L-BFGS reads it (stopping tests, line search), so every rank takes the same decisions
    and runs as many evaluations (each with its all-reduce). Here ``reduce_mean`` adds a marker instead."""
    model = _model()
    optimizer = create_optimizer(model.parameters(), "lbfgs", lr=0.1, max_iter=3)
    guard = NonFiniteGuard(optimizer, log=False) if guarded else None
    policy = StepPolicy(optimizer, make_clipper("none", model.parameters()), accum=2, guard=guard)
    seen: list[float] = []
    step = optimizer.step
    optimizer.step = lambda closure: step(lambda: seen.append(float(closure())) or seen[-1])  # what L-BFGS reads
    inputs, targets = _data(1, 8)[0]
    micro = list(zip(inputs.chunk(2), targets.chunk(2)))
    outcome = policy.step(micro, _mse(model), reduce_mean=lambda loss: loss + 1000.0)
    assert len(seen) >= 3 and all(value > 1000.0 for value in seen)  # the replayed first loss and the others
    assert outcome.loss == seen[0]  # the logged loss is the same mean over ranks
