"""One trial: train one task with one configuration (optimizer × schedule × clipping, seed) and measure it.

The loop per step is: training loss on the next batch → divergence check → ``backward`` → clipping
→ ``optimizer.step()`` → scheduler step, with an evaluation every ``eval_every`` steps and at the end,
on the optimizer's evaluation weights for optimizers with ``train()``/``eval()`` modes (schedule-free:
the average :math:`x_t`, see :mod:`optimlab.optim.modes`). A non-finite loss, or one above
:data:`DIVERGENCE_FACTOR` times the initial loss, stops the trial and marks it ``diverged``: the
bench records it and goes on. An optimizer the registry marks ``needs_closure`` (SAM) gets
``optimizer.step(closure)`` instead, the closure clearing the gradients and doing the loss, divergence
check, backward and clipping on the step's batch as often as the optimizer calls it.

Timing: ``optimizer.step()`` alone gives milliseconds per optimizer step (the closure's evaluations
excluded); the whole step (fetching the batch, forward, backward, clipping, optimizer, scheduler; every
evaluation of a closure) is timed too, and time-to-target is the sum of whole-step times until the
evaluation that first meets the target (evaluations excluded). On CUDA the device is synchronised at each
clock reading. Gradient evaluations (forward + backward) are counted: one per step, or one per closure
call (SAM: two per step), in total and until the target was first met.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass
from collections.abc import Callable
from typing import Any

import torch

from optimlab.bench.store import TrialRecord
from optimlab.bench.tasks import get_task
from optimlab.clip import make_clipper
from optimlab.optim.lr_free import step_size_estimate
from optimlab.optim.modes import eval_weights, set_mode
from optimlab.optim.registry import create_optimizer, needs_closure
from optimlab.optim.state import state_bytes_per_param
from optimlab.schedules import create_scheduler, step_scheduler

__all__ = ["DIVERGENCE_FACTOR", "TrialConfig", "make_scheduler", "parse_spec", "run_trial"]

DIVERGENCE_FACTOR = 1e8


@dataclass(frozen=True)
class TrialConfig:
    """What one trial runs.

    Attributes:
        task: a task name (:func:`optimlab.bench.tasks.list_tasks`).
        optimizer: an optimizer name (:func:`optimlab.optim.list_optimizers`).
        params: optimizer keyword arguments, ``lr`` included.
        schedule: ``"constant"`` or a schedule spec ``"NAME"`` / ``"NAME:key=value,key=value"``
            for :func:`optimlab.schedules.create_scheduler`.
        clip: a clipping spec for :func:`optimlab.clip.make_clipper` (``"none"``, ``"norm:1.0"``, ...).
        seed: initial weights and batch order.
        steps: step budget.
        phase: ``"tune"`` or ``"final"`` (stored with the trial).
        trial_index: position within its phase.
        record_trajectory: keep every iterate of a test function (for the 2-D pictures).
        device: where the task's model runs (``"cpu"``, ``"cuda"``, ``"cuda:1"``).
    """

    task: str
    optimizer: str
    params: dict[str, Any]
    steps: int
    schedule: str = "constant"
    clip: str = "none"
    seed: int = 0
    phase: str = "tune"
    trial_index: int = 0
    record_trajectory: bool = False
    device: str = "cpu"


def parse_spec(spec: str) -> tuple[str, dict[str, float]]:
    """Split ``"name:key=value,key=value"`` into ``("name", {key: float(value)})``.

    ``"cosine"`` gives ``("cosine", {})``; a malformed pair raises ``ValueError``.
    """
    name, _, rest = spec.partition(":")
    options: dict[str, float] = {}
    for pair in filter(None, rest.split(",")):
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"Invalid spec {spec!r}: expected 'name:key=value,key=value', got {pair!r}")
        try:
            options[key.strip()] = float(value)
        except ValueError:
            raise ValueError(f"Invalid spec {spec!r}: value of {key!r} is not a number: {value!r}") from None
    return name.strip().lower(), options


def make_scheduler(schedule: str, optimizer: torch.optim.Optimizer, total_steps: int) -> Any:
    """The scheduler for a schedule spec (``None`` for ``"constant"``); integral option values become ints."""
    if schedule == "constant":
        return None
    name, options = parse_spec(schedule)
    typed = {key: int(value) if value.is_integer() else value for key, value in options.items()}
    return create_scheduler(name, optimizer, total_steps, **typed)


def _make_clipper(clip: str, parameters: list[torch.Tensor]) -> Any:
    if clip == "none":
        return None
    return make_clipper(clip, parameters)


def _finite(value: float) -> bool:
    return not (math.isnan(value) or math.isinf(value))


class _Diverged(Exception):
    """The training loss of a step is non-finite or above the divergence limit (carries the loss)."""

    def __init__(self, loss: float) -> None:
        super().__init__(loss)
        self.loss = loss


def _clock(device: str) -> Callable[[], float]:
    """``time.perf_counter`` that first waits for queued CUDA work on a CUDA device."""
    if device.startswith("cuda"):
        def clock() -> float:
            torch.cuda.synchronize(device)
            return time.perf_counter()
        return clock
    return time.perf_counter


def run_trial(config: TrialConfig) -> TrialRecord:
    """Run one trial and return its record (not yet stored)."""
    spec = get_task(config.task)
    instance = spec.instantiate(config.seed, config.device)
    clock = _clock(config.device)
    torch.manual_seed(config.seed)
    parameters = [p for p in instance.model.parameters() if p.requires_grad]
    optimizer = create_optimizer(parameters, config.optimizer, **config.params)
    scheduler = make_scheduler(config.schedule, optimizer, config.steps)
    clipper = _make_clipper(config.clip, parameters)
    set_mode(optimizer, "train")  # schedule-free optimizers train and evaluate at different points

    curve: list[tuple[int, float | None, float | None, float | None]] = []
    trajectory = [instance.point()] if config.record_trajectory and instance.point is not None else None
    step_seconds: list[float] = []
    losses: list[float] = []
    metrics: list[float] = []
    status = "complete"
    steps_to_target: int | None = None
    time_to_target: float | None = None
    grad_evals_to_target: int | None = None
    loss_limit: float | None = None
    grad_evals = 0
    closure_seconds = 0.0
    with_closure = needs_closure(optimizer)

    def evaluate() -> float:
        with eval_weights(optimizer):
            return float(instance.evaluate()[spec.metric])

    def gradient(batch: Any) -> float:
        """Loss, divergence check (raises :class:`_Diverged`), backward and clipping on ``batch``."""
        nonlocal loss_limit, grad_evals
        loss = instance.loss(batch)
        loss_value = float(loss.detach())
        if loss_limit is None:
            loss_limit = DIVERGENCE_FACTOR * max(abs(loss_value), 1.0)
        if not _finite(loss_value) or abs(loss_value) > loss_limit:
            raise _Diverged(loss_value)
        loss.backward()
        grad_evals += 1
        if clipper is not None:
            clipper.step()
        return loss_value

    def closure_on(batch: Any) -> Callable[[], float]:
        """The closure of one step: clear the gradients, then :func:`gradient` on the step's batch (timed)."""
        def closure() -> float:
            nonlocal closure_seconds
            begin = clock()
            optimizer.zero_grad(set_to_none=True)
            value = gradient(batch)
            closure_seconds += clock() - begin
            return value
        return closure

    start = time.perf_counter()
    train_seconds = 0.0
    initial_metric = evaluate()
    if spec.reached(initial_metric):
        steps_to_target, time_to_target, grad_evals_to_target = 0, 0.0, 0
    steps_done = 0
    for step in range(1, config.steps + 1):
        lr = float(optimizer.param_groups[0]["lr"])
        step_start = clock()
        optimizer.zero_grad(set_to_none=True)
        batch = next(instance.batches)
        try:
            if with_closure:
                closure_seconds = 0.0
                tick = clock()
                loss_value = float(optimizer.step(closure_on(batch)))
                tock = clock()
                step_seconds.append(tock - tick - closure_seconds)
            else:
                loss_value = gradient(batch)
                tick = clock()
                optimizer.step()
                tock = clock()
                step_seconds.append(tock - tick)
        except _Diverged as diverged:
            status = "diverged"
            curve.append((step, diverged.loss, None, lr))
            break
        if scheduler is not None:
            step_scheduler(scheduler, loss_value)
        train_seconds += clock() - step_start
        steps_done = step
        losses.append(loss_value)
        metric: float | None = None
        if step % spec.eval_every == 0 or step == config.steps:
            metric = evaluate()
            if not _finite(metric):
                status = "diverged"
                curve.append((step, loss_value, metric, lr))
                break
            metrics.append(metric)
            if steps_to_target is None and spec.reached(metric):
                steps_to_target, time_to_target, grad_evals_to_target = step, train_seconds, grad_evals
        curve.append((step, loss_value, metric, lr))
        if trajectory is not None:
            trajectory.append(instance.point())
    wall_time = time.perf_counter() - start

    artifacts: dict[str, Any] = {}
    if trajectory is not None:
        artifacts["trajectory"] = trajectory
    if instance.point is not None and config.phase == "final":
        with eval_weights(optimizer):  # the point the final metric was measured at
            artifacts["final_point"] = instance.point()
    best_metric = (min(metrics) if spec.mode == "min" else max(metrics)) if metrics else None
    timed = step_seconds[1:] or step_seconds  # the first step also allocates the optimizer state
    return TrialRecord(
        task=config.task,
        optimizer=config.optimizer,
        schedule=config.schedule,
        clip=config.clip,
        phase=config.phase,
        trial_index=config.trial_index,
        seed=config.seed,
        params=dict(config.params),
        status=status,
        steps=steps_done,
        final_loss=losses[-1] if losses and status == "complete" else None,
        best_loss=min(losses) if losses else None,
        final_metric=metrics[-1] if metrics and status == "complete" else None,
        best_metric=best_metric,
        steps_to_target=steps_to_target,
        time_to_target=time_to_target,
        ms_per_step=1e3 * statistics.median(timed) if timed else None,
        state_bytes_per_param=state_bytes_per_param(optimizer),
        wall_time=wall_time,
        curve=curve,
        artifacts=artifacts,
        grad_evals=grad_evals,
        grad_evals_to_target=grad_evals_to_target,
        d_estimate=step_size_estimate(optimizer),
    )
