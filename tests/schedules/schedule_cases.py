"""The data table every schedule test runs over: one row per schedule class, with a random-argument draw and
a builder that works on ``optimlab.schedules`` and on ``torch.optim.lr_scheduler`` alike (same class names).

Adding a schedule = adding a row here; the parity, closed-form and resume tests then apply to it.
"""

from __future__ import annotations

import io
import random
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import torch
import torch.optim.lr_scheduler as torch_sched
import torch.optim.swa_utils as torch_swa

import optimlab.schedules as ours

Draw = Callable[[random.Random], dict[str, Any]]
Build = Callable[[ModuleType, torch.optim.Optimizer, dict[str, Any]], Any]


@dataclass(frozen=True)
class Case:
    """One schedule under test.

    ``draw(rng)`` picks random constructor arguments (also ``lrs``: the two groups' learning rates and
    ``optimizer``: "sgd" or "adam"); ``build(lib, optimizer, kw)`` constructs it from ``lib`` (optimlab's
    module or torch's). ``torch_parity`` is False for optimlab-only schedules; ``metric`` marks
    ReduceLROnPlateau (stepped with ``kw["metrics"][t]``). Every warmup-like phase a draw makes (LinearLR,
    ConstantLR, OneCycle's rise, SequentialLR/ChainedScheduler/with_warmup/WarmupCosine/WSD warmups) lasts at
    least 4 steps, so the resume test's split at step 2 falls inside it.
    """

    name: str
    draw: Draw
    build: Build
    torch_parity: bool = True
    metric: bool = False
    momentum: bool = False


def _lrs(rng: random.Random) -> list[float]:
    return [10 ** rng.uniform(-3, 0), 10 ** rng.uniform(-3, 0)]


def _base(rng: random.Random, **kw: Any) -> dict[str, Any]:
    return {"lrs": _lrs(rng), "optimizer": "sgd", **kw}


def _lambda_fns(kw: dict[str, Any]) -> list[Callable[[int], float]]:
    a, b = kw["a"], kw["b"]
    return [lambda t: a**t, lambda t: 1.0 / (1.0 + b * t)]


def _multiplicative_fns(kw: dict[str, Any]) -> list[Callable[[int], float]]:
    a, b = kw["a"], kw["b"]
    return [lambda t: a, lambda t: 1.0 - b / (t + 5.0)]


def _with_warmup(lib: ModuleType, opt: torch.optim.Optimizer, kw: dict[str, Any]) -> Any:
    inner = lib.CosineAnnealingLR(opt, T_max=kw["T_max"], eta_min=kw["eta_min"])
    if lib is ours:
        return ours.with_warmup(inner, kw["warmup"], start_factor=kw["start"])
    warm = lib.LinearLR(opt, start_factor=kw["start"], end_factor=1.0, total_iters=kw["warmup"])
    return lib.SequentialLR(opt, [warm, inner], milestones=[kw["warmup"]])


def _sequential(lib: ModuleType, opt: torch.optim.Optimizer, kw: dict[str, Any]) -> Any:
    first = lib.LinearLR(opt, start_factor=kw["start"], total_iters=kw["warmup"])
    second = lib.ExponentialLR(opt, gamma=kw["gamma"])
    third = lib.CosineAnnealingLR(opt, T_max=kw["T_max"], eta_min=kw["eta_min"])
    return lib.SequentialLR(opt, [first, second, third], milestones=[kw["warmup"], kw["second_end"]])


def _chained(lib: ModuleType, opt: torch.optim.Optimizer, kw: dict[str, Any]) -> Any:
    children = [lib.ExponentialLR(opt, gamma=kw["gamma"]), lib.StepLR(opt, step_size=kw["step_size"], gamma=0.5),
                lib.LinearLR(opt, start_factor=kw["start"], total_iters=kw["warmup"])]
    if kw["with_cosine"]:
        children.append(lib.CosineAnnealingLR(opt, T_max=kw["T_max"]))
    return lib.ChainedScheduler(children)


def _plateau_metrics(rng: random.Random, steps: int = 400) -> list[float]:
    """A noisy loss curve with stalls, so every plateau rule (patience, cooldown, threshold) is exercised."""
    value, out = 1.0, []
    for _ in range(steps):
        value *= rng.choice([0.9, 0.99, 1.0, 1.0, 1.0, 1.001, 1.05])
        out.append(value)
    return out


CASES: list[Case] = [
    Case("LambdaLR", lambda r: _base(r, a=r.uniform(0.95, 0.999), b=r.uniform(0.001, 0.05)),
         lambda lib, opt, kw: lib.LambdaLR(opt, _lambda_fns(kw))),
    Case("MultiplicativeLR", lambda r: _base(r, a=r.uniform(0.97, 0.999), b=r.uniform(0.01, 0.2)),
         lambda lib, opt, kw: lib.MultiplicativeLR(opt, _multiplicative_fns(kw))),
    Case("StepLR", lambda r: _base(r, step_size=r.randint(1, 60), gamma=r.uniform(0.1, 0.95)),
         lambda lib, opt, kw: lib.StepLR(opt, step_size=kw["step_size"], gamma=kw["gamma"])),
    Case("MultiStepLR",
         lambda r: _base(r, milestones=sorted(r.choices(range(1, 300), k=r.randint(1, 6))), gamma=r.uniform(0.1, 0.9)),
         lambda lib, opt, kw: lib.MultiStepLR(opt, milestones=kw["milestones"], gamma=kw["gamma"])),
    Case("ConstantLR", lambda r: _base(r, factor=r.uniform(0.05, 1.0), total_iters=r.randint(4, 150)),
         lambda lib, opt, kw: lib.ConstantLR(opt, factor=kw["factor"], total_iters=kw["total_iters"])),
    Case("LinearLR",
         lambda r: _base(r, start=r.uniform(0.01, 1.0), end=r.uniform(0.0, 1.0), total_iters=r.randint(4, 200)),
         lambda lib, opt, kw: lib.LinearLR(opt, start_factor=kw["start"], end_factor=kw["end"],
                                           total_iters=kw["total_iters"])),
    Case("ExponentialLR", lambda r: _base(r, gamma=r.uniform(0.95, 1.01)),
         lambda lib, opt, kw: lib.ExponentialLR(opt, gamma=kw["gamma"])),
    Case("PolynomialLR", lambda r: _base(r, total_iters=r.randint(10, 400), power=r.uniform(0.5, 3.0)),
         lambda lib, opt, kw: lib.PolynomialLR(opt, total_iters=kw["total_iters"], power=kw["power"])),
    Case("CosineAnnealingLR", lambda r: _base(r, T_max=r.randint(10, 200), eta_min=r.choice([0.0, r.uniform(0, 1e-3)])),
         lambda lib, opt, kw: lib.CosineAnnealingLR(opt, T_max=kw["T_max"], eta_min=kw["eta_min"])),
    Case("CosineAnnealingWarmRestarts",
         lambda r: _base(r, T_0=r.randint(5, 60), T_mult=r.choice([1, 2, 3]), eta_min=r.uniform(0, 1e-4)),
         lambda lib, opt, kw: lib.CosineAnnealingWarmRestarts(opt, T_0=kw["T_0"], T_mult=kw["T_mult"],
                                                              eta_min=kw["eta_min"])),
    Case("CyclicLR",
         lambda r: {"lrs": _lrs(r), "optimizer": r.choice(["sgd", "adam"]), "base": [r.uniform(1e-4, 1e-2)] * 2,
                    "scale": r.uniform(2, 20), "up": r.randint(3, 50), "down": r.choice([None, r.randint(3, 50)]),
                    "mode": r.choice(["triangular", "triangular2", "exp_range"]), "gamma": r.uniform(0.99, 1.0),
                    "mom": r.uniform(0.7, 0.85)},
         lambda lib, opt, kw: lib.CyclicLR(opt, base_lr=kw["base"], max_lr=[b * kw["scale"] for b in kw["base"]],
                                           step_size_up=kw["up"], step_size_down=kw["down"], mode=kw["mode"],
                                           gamma=kw["gamma"], base_momentum=kw["mom"], max_momentum=0.9),
         momentum=True),
    Case("CyclicLR-scale_fn",
         lambda r: {"lrs": _lrs(r), "optimizer": "sgd", "base": r.uniform(1e-4, 1e-2), "up": r.randint(3, 30),
                    "decay": r.uniform(0.5, 0.99), "scale_mode": r.choice(["cycle", "iterations"])},
         lambda lib, opt, kw: lib.CyclicLR(opt, base_lr=kw["base"], max_lr=10 * kw["base"], step_size_up=kw["up"],
                                           scale_fn=lambda x: kw["decay"] ** x, scale_mode=kw["scale_mode"]),
         momentum=True),
    Case("OneCycleLR",
         lambda r: {"lrs": _lrs(r), "optimizer": r.choice(["sgd", "adam"]),
                    "max_lr": [r.uniform(0.01, 1.0), r.uniform(0.01, 1.0)], "pct": r.uniform(0.1, 0.45),
                    "anneal": r.choice(["cos", "linear"]), "three": r.choice([False, True]),
                    "div": r.uniform(5, 50), "final": r.uniform(1e2, 1e4)},
         lambda lib, opt, kw: lib.OneCycleLR(opt, max_lr=kw["max_lr"], total_steps=320, pct_start=kw["pct"],
                                             anneal_strategy=kw["anneal"], three_phase=kw["three"],
                                             div_factor=kw["div"], final_div_factor=kw["final"]),
         momentum=True),
    Case("ReduceLROnPlateau",
         lambda r: _base(r, mode=r.choice(["min", "max"]), factor=r.uniform(0.1, 0.9), patience=r.randint(0, 10),
                         threshold=r.choice([1e-4, 1e-2, 0.0]), threshold_mode=r.choice(["rel", "abs"]),
                         cooldown=r.randint(0, 5), min_lr=[r.uniform(0, 1e-3), 0.0], eps=r.choice([1e-8, 1e-12]),
                         metrics=_plateau_metrics(r)),
         lambda lib, opt, kw: lib.ReduceLROnPlateau(opt, mode=kw["mode"], factor=kw["factor"], patience=kw["patience"],
                                                    threshold=kw["threshold"], threshold_mode=kw["threshold_mode"],
                                                    cooldown=kw["cooldown"], min_lr=kw["min_lr"], eps=kw["eps"]),
         metric=True),
    Case("SequentialLR",
         lambda r: _base(r, start=r.uniform(0.01, 0.5), warmup=r.randint(4, 40), gamma=r.uniform(0.97, 0.999),
                         second_end=r.randint(60, 150), T_max=r.randint(20, 200), eta_min=r.uniform(0, 1e-4)),
         _sequential),
    Case("ChainedScheduler",
         lambda r: _base(r, gamma=r.uniform(0.98, 0.999), step_size=r.randint(5, 80), start=r.uniform(0.05, 0.5),
                         warmup=r.randint(4, 40), with_cosine=r.choice([False, True]), T_max=r.randint(20, 150)),
         _chained),
    Case("with_warmup",
         lambda r: _base(r, start=r.uniform(0.001, 0.5), warmup=r.randint(4, 50), T_max=r.randint(20, 300),
                         eta_min=r.uniform(0, 1e-4)),
         _with_warmup),
    Case("SWALR",
         lambda r: _base(r, swa_lr=[r.uniform(1e-4, 1e-2), r.uniform(1e-4, 1e-2)], anneal=r.choice([0, 1, 5, 40]),
                         strategy=r.choice(["cos", "linear"])),
         lambda lib, opt, kw: (torch_swa if lib is torch_sched else lib).SWALR(
             opt, swa_lr=kw["swa_lr"], anneal_epochs=kw["anneal"], anneal_strategy=kw["strategy"])),
    Case("WarmupCosineLR",
         lambda r: _base(r, warmup=r.randint(4, 50), total=r.randint(60, 400), start=r.uniform(0.0, 0.5),
                         eta_min=[r.uniform(0, 1e-4), 0.0]),
         lambda lib, opt, kw: lib.WarmupCosineLR(opt, warmup_steps=kw["warmup"], total_steps=kw["total"],
                                                 start_factor=kw["start"], eta_min=kw["eta_min"]),
         torch_parity=False),
    Case("WarmupStableDecayLR",
         lambda r: _base(r, warmup=r.randint(4, 50), decay=r.randint(1, 100), total=r.randint(160, 400),
                         start=r.uniform(0.0, 0.5), eta_min=r.uniform(0, 1e-4),
                         shape=r.choice(["linear", "cosine", "1-sqrt"])),
         lambda lib, opt, kw: lib.WarmupStableDecayLR(opt, warmup_steps=kw["warmup"], decay_steps=kw["decay"],
                                                      total_steps=kw["total"], start_factor=kw["start"],
                                                      eta_min=kw["eta_min"], decay_shape=kw["shape"]),
         torch_parity=False),
]

CASES_BY_NAME = {case.name: case for case in CASES}


def make_optimizer(kw: dict[str, Any], tensor_lr: bool = False) -> torch.optim.Optimizer:
    """Two param groups with different learning rates (SGD with momentum, or Adam)."""
    def lr(value: float) -> float | torch.Tensor:
        return torch.tensor(value, dtype=torch.float64) if tensor_lr else value

    groups = [{"params": [torch.nn.Parameter(torch.zeros(3))], "lr": lr(kw["lrs"][0])},
              {"params": [torch.nn.Parameter(torch.zeros(2))], "lr": lr(kw["lrs"][1])}]
    if kw["optimizer"] == "adam":
        return torch.optim.Adam(groups, lr=lr(kw["lrs"][0]), foreach=False)
    return torch.optim.SGD(groups, lr=lr(kw["lrs"][0]), momentum=0.9, foreach=False)


def momenta(optimizer: torch.optim.Optimizer) -> list[float]:
    """Each group's momentum (SGD) or beta1 (Adam)."""
    return [float(g["betas"][0]) if "betas" in g else float(g["momentum"]) for g in optimizer.param_groups]


def lrs(optimizer: torch.optim.Optimizer) -> list[float]:
    """Each group's current learning rate as a float."""
    return [float(g["lr"]) for g in optimizer.param_groups]


def step_once(case: Case, scheduler: Any, optimizer: torch.optim.Optimizer, kw: dict[str, Any], t: int) -> None:
    """One training step: the optimizer (no gradients, so a no-op on the weights), then the scheduler."""
    optimizer.step()
    if case.metric:
        scheduler.step(kw["metrics"][t])
    else:
        scheduler.step()


def trajectory(case: Case, lib: ModuleType, kw: dict[str, Any], steps: int, tensor_lr: bool = False
               ) -> tuple[list[list[float]], list[list[float]]]:
    """Learning rates (and momenta) after construction and after each of ``steps`` steps."""
    optimizer = make_optimizer(kw, tensor_lr)
    scheduler = case.build(lib, optimizer, kw)
    lr_rows, mom_rows = [lrs(optimizer)], [momenta(optimizer)]
    for t in range(steps):
        step_once(case, scheduler, optimizer, kw, t)
        lr_rows.append(lrs(optimizer))
        mom_rows.append(momenta(optimizer))
    return lr_rows, mom_rows


def roundtrip(obj: Any) -> Any:
    """``torch.save`` then ``torch.load(weights_only=True)``: what a checkpoint on disk gives back."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def max_rel_err(actual: list[list[float]], expected: list[list[float]]) -> float:
    """Largest ``|a − e| / max(|e|, tiny)`` over all entries."""
    worst = 0.0
    for row_a, row_e in zip(actual, expected, strict=True):
        for a, e in zip(row_a, row_e, strict=True):
            worst = max(worst, abs(a - e) / max(abs(e), 1e-300)) if (a, e) != (0.0, 0.0) else worst
    return worst


def draws(case: Case, count: int, seed: int = 0) -> list[dict[str, Any]]:
    """``count`` reproducible argument draws for ``case``."""
    rng = random.Random(f"{case.name}-{seed}")
    return [case.draw(rng) for _ in range(count)]


__all__ = ["CASES", "CASES_BY_NAME", "Case", "draws", "make_optimizer", "max_rel_err", "momenta", "lrs",
           "roundtrip", "step_once", "torch_sched", "trajectory"]
