"""Recommendations from stored results: which configuration did best on a task, across every run, and a
ready-to-paste snippet that builds it."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from optimlab.bench import stats
from optimlab.bench.store import Store
from optimlab.bench.trial import parse_spec
from optimlab.optim.registry import needs_closure

__all__ = ["Recommendation", "recommend", "snippet"]


@dataclass(frozen=True)
class Recommendation:
    """A configuration's final-phase result on a task: mean and sample std over its seeds (``std`` is
    ``None`` for a single seed), whether the task is deterministic, and the run's step budget."""

    optimizer: str
    params: dict[str, Any]
    schedule: str
    clip: str
    metric: str
    mode: str
    mean: float
    std: float | None
    n_seeds: int
    n_diverged: int
    run_id: int
    steps: int
    deterministic: bool = False

    def spread(self) -> str:
        """The metric as ``mean ± std (n=N)`` (see :func:`optimlab.bench.stats.format_value`)."""
        return stats.format_value(stats.Summary(self.n_seeds - self.n_diverged, self.mean, self.std, None, None),
                                  self.deterministic)


def recommend(store: Store, task: str) -> list[Recommendation]:
    """Every stored configuration of ``task`` ranked best first.

    A configuration is (run, optimizer, hyperparameters, schedule, clip); its score is the mean of the task
    metric over its final-phase seeds. Configurations with a diverged seed rank after all that never diverged;
    within each group the better mean (lower for ``min`` metrics, higher for ``max``) comes first.
    """
    groups: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for trial in store.final_trials_for_task(task):
        key = (trial["run_id"], trial["optimizer"], json.dumps(trial["params"], sort_keys=True), trial["schedule"],
               trial["clip"])
        groups.setdefault(key, []).append(trial)
    ranking: list[Recommendation] = []
    info_by_run: dict[int, dict[str, Any]] = {}
    for (run_id, optimizer, params, schedule, clip), trials in groups.items():
        if run_id not in info_by_run:
            info_by_run[run_id] = store.get_run(run_id)["config"]["task_info"][task]
        info = info_by_run[run_id]
        values = [t["final_metric"] for t in trials if t["status"] == "complete" and t["final_metric"] is not None]
        if not values:
            continue
        summary = stats.describe(values)
        ranking.append(Recommendation(
            optimizer=optimizer, params=json.loads(params), schedule=schedule, clip=clip, metric=info["metric"],
            mode=info["mode"], mean=summary.mean, std=summary.std, n_seeds=len(trials),
            n_diverged=sum(t["status"] == "diverged" for t in trials), run_id=run_id, steps=int(info["steps"]),
            deterministic=bool(info.get("deterministic", info["family"] == "function")),
        ))
    ranking.sort(key=lambda r: (r.n_diverged > 0, r.mean if r.mode == "min" else -r.mean, r.run_id, r.optimizer))
    return ranking


def _literal(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else repr(value)


def snippet(best: Recommendation) -> str:
    """Python that builds the recommended optimizer, scheduler and clipper for ``model``, and the loop order."""
    arguments = "".join(f", {k}={_literal(v)}" for k, v in best.params.items())
    lines = ["from optimlab.optim import create_optimizer",
             f"optimizer = create_optimizer(model, {best.optimizer!r}{arguments})"]
    loop = ["loss.backward()"]
    if best.schedule != "constant":
        name, options = parse_spec(best.schedule)
        extra = "".join(f", {k}={int(v) if float(v).is_integer() else v!r}" for k, v in options.items())
        lines[:0] = ["from optimlab.schedules import create_scheduler"]
        lines.append(f"scheduler = create_scheduler({name!r}, optimizer, total_steps={best.steps}{extra})"
                     "  # the bench's step budget: set your run's")
    if best.clip != "none":
        lines[:0] = ["from optimlab.clip import make_clipper"]
        lines.append(f"clipper = make_clipper({best.clip!r}, model.parameters())")
        loop.append("clipper.step()")
    closure = needs_closure(best.optimizer)
    if closure:  # SAM: the gradient work goes into a closure that the optimizer calls (twice)
        loop = [f"optimizer.step(closure) where closure() does optimizer.zero_grad(); loss = ...; {'; '.join(loop)}; "
                "return loss (called twice per step: SAM's two gradients)"]
    else:
        loop.append("optimizer.step()")
    if best.schedule != "constant":
        loop.append("scheduler.step()" if not best.schedule.startswith("plateau") else "scheduler.step(val_loss)")
    if not closure:
        loop.append("optimizer.zero_grad()")
    lines.append("# each step: " + "; ".join(loop))
    if best.optimizer.startswith("schedule-free"):
        lines.append("# schedule-free: optimizer.train() before training steps, optimizer.eval() before evaluating")
    return "\n".join(lines)
