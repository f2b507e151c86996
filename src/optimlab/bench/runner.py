"""Running a bench: tune every configuration with the same budget, rerun the best over seeds, store it all.

A *study* is one task × optimizer × schedule × clipping. Each study runs ``trials`` tuning trials one
after the other (seed 0, TPE suggestions, see :mod:`optimlab.bench.tuning`), then reruns its best
hyperparameters with seeds ``1..seeds`` (the ``final`` phase, which the report's mean ± std use).
Every optimizer gets the same trial budget, the same tuning seed stream and the same final seeds.

Studies are independent, so ``jobs > 1`` runs them in parallel worker processes, and any number of
``optimlab bench`` processes started with the same arguments on the same database (an SQLite file, or a
PostgreSQL server shared by many machines) cooperate on one run: each unit of work (a study's tuning,
or one of its final reruns) is claimed by one worker at a time (:mod:`optimlab.bench.worker`). The
results depend on none of this. Every finished trial is committed at once (one transaction), so:

* rerunning the same command (same :meth:`BenchConfig.key`) resumes the same run, skipping finished
  trials, even after a SIGKILL;
* Ctrl-C stops cleanly: workers finish the trial in hand, finished trials stay, the run is marked
  ``interrupted`` and the next identical command resumes it.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from optimlab.bench import stats
from optimlab.bench.store import Claim, DiskFullError, Store
from optimlab.bench.tasks import TaskLoadError, fingerprint, get_task, load_tasks
from optimlab.bench.tasks.loader import check_task
from optimlab.bench.trial import TrialConfig, make_scheduler, parse_spec, run_trial
from optimlab.bench.tuning import HistoryItem, best_index, fixed_params, lr_search_range, score, search_space, suggest
from optimlab.bench.worker import DEFAULT_LEASE, check_lease, run_local_workers, work
from optimlab.clip import make_clipper
from optimlab.progress import progress

__all__ = ["BenchConfig", "BenchResult", "Study", "QUICK_TASKS", "QUICK_OPTIMIZERS", "default_device", "default_jobs",
           "run_bench", "summarize"]

QUICK_TASKS = ("rosenbrock", "rastrigin", "beale", "quadratic", "nonconvex-10d", "digits-logreg", "digits-mlp")
QUICK_OPTIMIZERS = ("sgd-momentum", "adam", "adamw", "rmsprop")


@dataclass(frozen=True)
class Study:
    """One configuration family whose hyperparameters are tuned together."""

    task: str
    optimizer: str
    schedule: str
    clip: str


@dataclass(frozen=True)
class BenchConfig:
    """A bench: the cross product of tasks, optimizers, schedules and clipping specs, and the budget.

    Attributes:
        tasks / optimizers / schedules / clips: names and specs (validated by :meth:`validate`).
        trials: tuning trials per study (the same for every optimizer).
        seeds: final reruns of the best configuration per study.
        steps: step budget per trial; ``None`` means each task's own (``quick_steps`` under ``quick``).
        quick: use the tasks' short budgets.
        tune: hyperparameters searched (``"lr"`` plus :data:`optimlab.bench.tuning.EXTRA_SEARCH_SPACE` keys).
        seed: seed of the tuning sampler.
        task_sources: task references (``PATH.py:NAME``, ``module:NAME``) to import before the tasks are
            looked up, here and in every worker (the user's own tasks).
        lr_range: ``(low, high)`` learning-rate search range for every optimizer alike, instead of the
            registry's per-optimizer bounds.
        device: where the tasks' models run (``"cpu"``, ``"cuda"``).
        tune_lr_free: also search the ``lr`` (a multiplier of their own step size) of learning-rate-free
            optimizers (Prodigy, D-Adapt Adam); by default it stays at 1.0 (:func:`~optimlab.bench.tuning.fixed_params`).
    """

    tasks: tuple[str, ...]
    optimizers: tuple[str, ...]
    schedules: tuple[str, ...] = ("constant",)
    clips: tuple[str, ...] = ("none",)
    trials: int = 20
    seeds: int = 3
    steps: int | None = None
    quick: bool = False
    tune: tuple[str, ...] = ("lr",)
    seed: int = 0
    task_sources: tuple[str, ...] = ()
    lr_range: tuple[float, float] | None = None
    device: str = "cpu"
    tune_lr_free: bool = False

    def load_sources(self) -> None:
        """Import :attr:`task_sources` (once per process), so their tasks are found by name."""
        for reference in self.task_sources:
            load_tasks(reference)

    def validate(self) -> None:
        """Raise ``ValueError``/``KeyError`` (listing valid choices) for anything unusable, before running."""
        for label, values in (("tasks", self.tasks), ("optimizers", self.optimizers),
                              ("schedules", self.schedules), ("clips", self.clips)):
            if not values:
                raise ValueError(f"Invalid {label}: empty (give at least one)")
        if self.trials < 1:
            raise ValueError(f"Invalid trials: {self.trials} (accepted range: >= 1)")
        if self.seeds < 1:
            raise ValueError(f"Invalid seeds: {self.seeds} (accepted range: >= 1)")
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"Invalid steps: {self.steps} (accepted range: >= 1)")
        _check_device(self.device)
        self.load_sources()
        for task in self.tasks:
            spec = get_task(task)
            if spec.source != "built-in":
                _check_user_task(spec, self.device)
            elif self.device != "cpu" and not spec.accepts_device:
                raise ValueError(f"Invalid device for task {spec.name!r}: {self.device!r} (this built-in task runs "
                                 "on the CPU only; accepted: 'cpu')")
        for optimizer in self.optimizers:
            search_space(optimizer, self.tune, lr_range=self.lr_range, tune_lr_free=self.tune_lr_free)
        for schedule in self.schedules:
            _check_schedule(schedule)
        for clip in self.clips:
            _check_clip(clip)

    def steps_for(self, task: str) -> int:
        """The step budget of one trial of ``task``."""
        if self.steps is not None:
            return self.steps
        spec = get_task(task)
        return spec.quick_steps if self.quick else spec.steps

    def search_space(self, study: Study) -> dict[str, Any]:
        """The distributions a study searches (:func:`~optimlab.bench.tuning.search_space`)."""
        return search_space(study.optimizer, self.tune, get_task(study.task).lr_widen, self.lr_range, self.tune_lr_free)

    def tune_trials(self, study: Study) -> int:
        """Tuning trials of a study: :attr:`trials`, or 1 when it has nothing to search (a learning-rate-free
        optimizer's lr held fixed and no other hyperparameter tuned: every trial would be the same run)."""
        return self.trials if self.search_space(study) else 1

    def total_trials(self) -> int:
        """Every trial of the bench: each study's tuning trials plus its final reruns."""
        return sum(self.tune_trials(study) + self.seeds for study in self.studies())

    def studies(self) -> list[Study]:
        """Every task × optimizer × schedule × clip, in a fixed order."""
        return [Study(t, o, s, c) for t in self.tasks for o in self.optimizers for s in self.schedules
                for c in self.clips]

    def key(self) -> str:
        """A hash of everything that determines the results (a rerun with the same key resumes).

        Fields added after the first release enter the hash only when set, so older runs keep their keys.
        """
        values = asdict(self)
        for name, default in (("task_sources", ()), ("lr_range", None), ("device", "cpu"), ("tune_lr_free", False)):
            if values[name] == default or values[name] == list(default or []):
                del values[name]
        payload = json.dumps(values, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]

    def to_json(self) -> dict[str, Any]:
        """The configuration plus each task's metadata (what a report needs from the store): metric, mode,
        target, steps, whether it is deterministic, where it comes from and its :func:`fingerprint`, and the
        learning-rate range each optimizer searched (``None`` for a learning rate held fixed)."""
        tasks = {}
        for name in self.tasks:
            spec = get_task(name)
            tasks[name] = {"metric": spec.metric, "mode": spec.mode, "target": spec.target,
                           "steps": self.steps_for(name), "family": spec.family, "description": spec.description,
                           "deterministic": spec.is_deterministic, "source": spec.source,
                           "fingerprint": fingerprint(spec),
                           "lr_ranges": {o: None if "lr" in fixed_params(o, self.tune_lr_free)
                                         else list(lr_search_range(o, spec.lr_widen, self.lr_range))
                                         for o in self.optimizers}}
        return {**asdict(self), "task_info": tasks}


_CHECKED: set[tuple[str, str, str]] = set()


def _check_user_task(spec: Any, device: str) -> None:
    """Build a user task once per process and check its contract (see :func:`check_task`)."""
    key = (spec.name, fingerprint(spec), device)
    if key not in _CHECKED:
        check_task(spec, device)
        _CHECKED.add(key)


def default_device() -> str:
    """``"cuda"`` when a CUDA device is available, else ``"cpu"``."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def _check_device(device: str) -> None:
    if device == "cpu":
        return
    if not device.startswith("cuda"):
        raise ValueError(f"Invalid device: {device!r} (accepted: cpu, cuda, cuda:N)")
    if not torch.cuda.is_available():
        raise ValueError(f"Invalid device: {device!r}: no CUDA device is available (accepted here: cpu)")


def _check_fingerprints(stored: dict[str, Any], config: BenchConfig, run_id: int) -> None:
    """Refuse to resume run ``run_id`` when a task changed since it started (its results would mix)."""
    for name in config.tasks:
        before = stored.get(name, {}).get("fingerprint")
        spec = get_task(name)
        if before is not None and before != fingerprint(spec):
            raise TaskLoadError(f"{spec.source}: task {name!r} changed since run {run_id} started (its code or "
                                "settings differ), so its results would not mix; restore it, or start a fresh run "
                                "(--new)")


def _check_schedule(schedule: str) -> None:
    """Build the schedule on a throw-away optimizer, so a bad name or option fails before any trial runs."""
    if schedule == "constant":
        return
    from optimlab.schedules import list_schedules

    name, _ = parse_spec(schedule)
    if name not in list_schedules():
        valid = sorted({"constant", *list_schedules()})
        raise KeyError(f"Unknown schedule {name!r}. Valid names: {', '.join(valid)}")
    make_scheduler(schedule, torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0), 10)


def _check_clip(clip: str) -> None:
    """Build the clipper on a throw-away tensor (``ValueError`` listing the valid forms when malformed)."""
    make_clipper(clip, [torch.zeros(1, requires_grad=True)])


@dataclass
class BenchResult:
    """What :func:`run_bench` did: the run id, whether it finished, and trial counts."""

    run_id: int
    complete: bool
    trials_run: int
    trials_skipped: int
    resumed: bool
    diverged: int = 0
    trials_by_others: int = 0
    messages: list[str] = field(default_factory=list)


# -- one unit of a study (runs in whichever worker claimed it) --------------------------------------------
Event = tuple[str, str, int]  # (status, study label, steps)


def _history(store: Store, run_id: int, study: Study, mode: str) -> list[tuple[dict[str, Any], HistoryItem]]:
    rows = store.trials(run_id, task=study.task, optimizer=study.optimizer, schedule=study.schedule,
                        clip=study.clip, phase="tune")
    return [(row, HistoryItem(row["params"], score(row["final_metric"], mode, row["status"] == "diverged")))
            for row in rows]


def study_units(config: BenchConfig) -> list[tuple[str, str, str, str, str, int]]:
    """The claimable units of a bench, in order: per study, its tuning, then each final rerun."""
    return [unit for s in config.studies()
            for unit in [(s.task, s.optimizer, s.schedule, s.clip, "tune", 0),
                         *((s.task, s.optimizer, s.schedule, s.clip, "final", i) for i in range(config.seeds))]]


def run_study(store: Store, run_id: int, config: BenchConfig, claim: Claim, report: Callable[[Event], None],
              should_stop: Callable[[], bool], lease: float = DEFAULT_LEASE) -> bool:
    """Run the missing trials of one claimed unit of a study: its tuning trials, or one final rerun.

    Each trial is committed as it finishes, in a transaction that also checks the claim is still this
    worker's (:class:`~optimlab.bench.store.ClaimLost` otherwise). Returns True when the unit is done
    (and marks it so), False when ``should_stop()`` ended it early.
    """
    study = Study(claim.task, claim.optimizer, claim.schedule, claim.clip)
    config.load_sources()
    spec = get_task(study.task)
    steps = config.steps_for(study.task)
    space = config.search_space(study)
    fixed = fixed_params(study.optimizer, config.tune_lr_free)
    label = f"{study.task}/{study.optimizer}"
    history = _history(store, run_id, study, spec.mode)
    if claim.unit == "tune":
        done_tune = {row["trial_index"] for row, _ in history}
        for index in range(config.tune_trials(study)):
            if index in done_tune:
                continue
            if should_stop():
                return False
            params = {**fixed, **suggest(space, [item for _, item in history], index, config.seed)}
            record = run_trial(TrialConfig(study.task, study.optimizer, params, steps, study.schedule, study.clip,
                                           seed=0, phase="tune", trial_index=index, device=config.device))
            store.add_trial(run_id, record, claim=claim, lease=lease)
            history = _history(store, run_id, study, spec.mode)
            report((record.status, label, record.steps))
        store.finish(claim)
        return True
    index = claim.unit_index
    done_final = {row["trial_index"] for row in store.trials(
        run_id, task=study.task, optimizer=study.optimizer, schedule=study.schedule, clip=study.clip, phase="final")}
    if index in done_final:
        store.finish(claim)
        return True
    if should_stop():
        return False
    best = history[best_index([item for _, item in history])][0]["params"]
    probe = spec.instantiate(0, config.device)
    record_trajectory = probe.point is not None and len(probe.point()) == 2
    record = run_trial(TrialConfig(study.task, study.optimizer, best, steps, study.schedule, study.clip,
                                   seed=index + 1, phase="final", trial_index=index,
                                   record_trajectory=record_trajectory, device=config.device))
    store.add_trial(run_id, record, claim=claim, lease=lease, finish=True)
    report((record.status, label, record.steps))
    return True


def _unit_runner(run_id: int, config: BenchConfig, lease: float, store: Store, report: Callable[[Event], None],
                 should_stop: Callable[[], bool]) -> Callable[[Claim], bool]:
    return functools.partial(run_study, store, run_id, config, report=report, should_stop=should_stop, lease=lease)


# -- the bench -----------------------------------------------------------------------------------------
def _count_done(store: Store, run_id: int, config: BenchConfig) -> int:
    studies = {(s.task, s.optimizer, s.schedule, s.clip) for s in config.studies()}
    return sum(1 for row in store.trials(run_id)
               if (row["task"], row["optimizer"], row["schedule"], row["clip"]) in studies)


def run_bench(config: BenchConfig, db_path: str | Path, *, jobs: int = 1, quiet: bool = False,
              new_run: bool = False, command: str = "", lease: float = DEFAULT_LEASE) -> BenchResult:
    """Run (or resume, or join) the bench described by ``config`` in the database ``db_path`` (a path or a URL).

    Resumes the latest run with the same configuration key unless ``new_run``; other processes running the
    same bench on the same database cooperate with this one (:mod:`optimlab.bench.worker`), each unit of
    work claimed by one of them with a lease of ``lease`` seconds. Returns when every trial of the run is
    stored, or after a Ctrl-C (this process's unfinished unit is released, the run is marked
    ``interrupted`` and ``complete`` is False). A full disk raises
    :class:`~optimlab.bench.store.DiskFullError` after marking the run ``interrupted``.
    """
    config.validate()
    if jobs < 1:
        raise ValueError(f"Invalid jobs: {jobs} (accepted range: >= 1)")
    check_lease(lease)
    db_path = str(db_path)
    total = config.total_trials()
    with Store(db_path) as store:
        existing = None if new_run else store.latest_run_with_key(config.key())
        if existing is not None:
            _check_fingerprints(existing["config"].get("task_info", {}), config, int(existing["id"]))
        run_id, resumed = store.open_run(config.key(), config.to_json(), command, study_units(config), new=new_run)
        skipped = _count_done(store, run_id, config)
    result = BenchResult(run_id=run_id, complete=False, trials_run=0, trials_skipped=skipped, resumed=resumed)
    if skipped >= total:
        with Store(db_path, check=False) as store:
            store.set_run_status(run_id, "complete")
        result.complete = True
        return result

    with progress(f"bench run {run_id}", total=total, quiet=quiet, unit="trials") as bar, \
            Store(db_path, check=False) as store:
        bar.advance(skipped)
        steps_total = 0
        started = time.perf_counter()

        def show_run_progress() -> None:
            bar.advance(max(0, _count_done(store, run_id, config) - bar.completed), mine=result.trials_run)

        def on_event(event: Event) -> None:
            nonlocal steps_total
            status, label, steps = event
            steps_total += steps
            result.trials_run += 1
            result.diverged += status == "diverged"
            step_rate = steps_total / max(time.perf_counter() - started, 1e-9)
            bar.advance(0, study=label, steps=steps_total, steps_per_s=round(step_rate), diverged=result.diverged)
            show_run_progress()

        try:
            if jobs == 1:
                work(store, run_id, _unit_runner(run_id, config, lease, store, on_event, lambda: False), lease=lease,
                     on_wait=show_run_progress)
            else:
                store.close()  # no connection crosses the fork; the parent reconnects for progress
                run_local_workers(db_path, run_id, functools.partial(_unit_runner, run_id, config, lease), jobs,
                                  lease, on_event, show_run_progress)
        except KeyboardInterrupt:
            _mark_interrupted(store, run_id)
            result.messages.append(f"interrupted: {result.trials_run} new trials kept; rerun the same command "
                                   "to resume")
            return result
        except DiskFullError as err:
            marked = _mark_interrupted(store, run_id)
            raise DiskFullError(f"{err}; run {run_id} {'is marked interrupted' if marked else 'stays running'}, "
                                f"its {_count_done(store, run_id, config)} stored trials are intact: free space and "
                                "rerun the same command to resume") from err
        show_run_progress()
        done = _count_done(store, run_id, config)
        complete = done >= total
        store.set_run_status(run_id, "complete" if complete else "interrupted")
    result.complete = complete
    result.trials_by_others = max(0, done - skipped - result.trials_run)
    return result


def _mark_interrupted(store: Store, run_id: int) -> bool:
    """Mark the run interrupted unless other workers still hold live claims on it; False if that failed."""
    try:
        _, held = store.units_left(run_id)
        if held == 0:
            store.set_run_status(run_id, "interrupted")
        return True
    except Exception:  # noqa: BLE001  e.g. the disk is still full: the run stays 'running', still resumable
        return False


def summarize(store: Store, run_id: int) -> list[dict[str, Any]]:
    """One row per study of a run: the best hyperparameters and the final-phase statistics over seeds.

    Keys: task, optimizer, schedule, clip, params, metric, mode, target, deterministic, n_seeds, n_diverged,
    metric_values (the seeds' final metrics, diverged seeds excluded), metric_mean, metric_std (sample std,
    ``None`` below two values), metric_ci (95 % Student-t interval of the mean, or ``None``), loss_mean,
    reached (seeds that met the target), steps_to_target_mean, time_to_target_mean (whole-step seconds) and
    grad_evals_to_target_mean (gradient evaluations: twice the steps for SAM; all three over the seeds that
    reached it), grad_evals_per_step (``None`` for trials stored before schema version 4), d_mean (the mean
    step size a learning-rate-free optimizer ended with over the seeds, else ``None``), ms_per_step, state_bytes_per_param, tune_diverged (tuning trials
    that diverged), lr_range (the range searched, when stored), tune_trials (every tuning trial's
    ``(params, final_metric, status)``, for sensitivity plots).
    """
    run = store.get_run(run_id)
    task_info = run["config"]["task_info"]
    groups: dict[tuple[str, str, str, str], list[dict[str, Any]]] = {}
    tuning: dict[tuple[str, str, str, str], list[dict[str, Any]]] = {}
    for row in store.trials(run_id):
        key = (row["task"], row["optimizer"], row["schedule"], row["clip"])
        (groups if row["phase"] == "final" else tuning).setdefault(key, []).append(row)
    rows = []
    for key, trials in groups.items():
        info = task_info[key[0]]
        values = [t["final_metric"] for t in trials if t["status"] == "complete" and t["final_metric"] is not None]
        losses = [t["final_loss"] for t in trials if t["final_loss"] is not None]
        reached = [t for t in trials if t["steps_to_target"] is not None]
        ms = [t["ms_per_step"] for t in trials if t["ms_per_step"] is not None]
        evals = [t["grad_evals"] / t["steps"] for t in trials if t.get("grad_evals") is not None and t["steps"]]
        evals_to_target = [t["grad_evals_to_target"] for t in reached if t.get("grad_evals_to_target") is not None]
        estimates = [t["d_estimate"] for t in trials if t.get("d_estimate") is not None]
        summary = stats.describe(values) if values else None
        tune_rows = tuning.get(key, [])
        rows.append({
            "task": key[0], "optimizer": key[1], "schedule": key[2], "clip": key[3],
            "params": trials[0]["params"], "metric": info["metric"], "mode": info["mode"],
            "target": info["target"], "deterministic": info.get("deterministic", info["family"] == "function"),
            "n_seeds": len(trials), "n_diverged": sum(t["status"] == "diverged" for t in trials),
            "metric_values": values,
            "metric_mean": summary.mean if summary else None,
            "metric_std": summary.std if summary else None,
            "metric_ci": (summary.ci_low, summary.ci_high) if summary and summary.std is not None else None,
            "loss_mean": statistics.fmean(losses) if losses else None,
            "reached": len(reached),
            "steps_to_target_mean": statistics.fmean(t["steps_to_target"] for t in reached) if reached else None,
            "time_to_target_mean": statistics.fmean(t["time_to_target"] for t in reached) if reached else None,
            "grad_evals_to_target_mean": statistics.fmean(evals_to_target) if evals_to_target else None,
            "grad_evals_per_step": statistics.fmean(evals) if evals else None,
            "d_mean": statistics.fmean(estimates) if estimates else None,
            "ms_per_step": statistics.median(ms) if ms else None,
            "state_bytes_per_param": trials[0]["state_bytes_per_param"],
            "tune_diverged": sum(t["status"] == "diverged" for t in tune_rows),
            "lr_range": info.get("lr_ranges", {}).get(key[1]),
            "tune_trials": [(t["params"], t["final_metric"], t["status"]) for t in tune_rows],
        })
    return rows


def default_jobs() -> int:
    """A sensible ``--jobs`` default: the CPU cores available to this process, at most 4."""
    return max(1, min(4, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1))

