"""Recommendations from stored results: which configuration did best on a task, across every run."""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass
from typing import Any

from optimlab.bench.store import Store

__all__ = ["Recommendation", "recommend"]


@dataclass(frozen=True)
class Recommendation:
    """A configuration's final-phase result on a task (mean and population std over its seeds)."""

    optimizer: str
    params: dict[str, Any]
    schedule: str
    clip: str
    metric: str
    mode: str
    mean: float
    std: float
    n_seeds: int
    n_diverged: int
    run_id: int


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
        ranking.append(Recommendation(
            optimizer=optimizer, params=json.loads(params), schedule=schedule, clip=clip, metric=info["metric"],
            mode=info["mode"], mean=statistics.fmean(values), std=statistics.pstdev(values), n_seeds=len(trials),
            n_diverged=sum(t["status"] == "diverged" for t in trials), run_id=run_id,
        ))
    ranking.sort(key=lambda r: (r.n_diverged > 0, r.mean if r.mode == "min" else -r.mean, r.run_id, r.optimizer))
    return ranking
