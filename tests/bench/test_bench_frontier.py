"""The frontier optimizers in the lab: SAM steps with a closure and counts two gradient evaluations per step;
learning-rate-free optimizers keep lr = 1.0 unless asked and the bench stores the d they found."""

from __future__ import annotations

import pytest
import torch
from bench_helpers import tiny_config
from typer.testing import CliRunner

from optimlab.bench.runner import run_bench, summarize
from optimlab.bench.store import Store
from optimlab.bench.tasks import get_task
from optimlab.bench.trial import TrialConfig, run_trial
from optimlab.bench.tuning import fixed_params, search_space
from optimlab.cli import app
from optimlab.optim import create_optimizer
from optimlab.optim.registry import get_spec, needs_closure


def test_sam_names_need_a_closure_and_search_their_base_range() -> None:
    for name, base in (("sam", "sgd-momentum"), ("sam-sgd", "sgd-momentum"), ("sam-adamw", "adamw"),
                       ("asam-sgd", "sgd-momentum"), ("asam-adamw", "adamw")):
        assert needs_closure(name) and get_spec(name).lr_bounds == get_spec(base).lr_bounds, name
        optimizer = create_optimizer(torch.nn.Linear(2, 1), name)
        assert type(optimizer.base_optimizer) is get_spec(base).resolve()
        assert optimizer.param_groups[0]["adaptive"] is name.startswith("asam")
    assert not needs_closure("adamw") and not needs_closure(torch.optim.SGD([torch.zeros(1)], lr=0.1))
    wrapped = create_optimizer(torch.nn.Linear(2, 1), "sam", base_optimizer="lion")
    assert type(wrapped.base_optimizer).__name__ == "Lion"


def _by_hand(task: str, name: str, lr: float, steps: int) -> tuple[list[float], list[int]]:
    """The task's point after ``steps`` of ``step(closure)`` on each step's batch, outside the bench, and the
    number of closure calls made by the end of each step."""
    instance = get_task(task).instantiate(1)
    torch.manual_seed(1)
    optimizer = create_optimizer([p for p in instance.model.parameters() if p.requires_grad], name, lr=lr)
    calls, cumulative = 0, []
    for _ in range(steps):
        batch = next(instance.batches)

        def closure():
            nonlocal calls
            calls += 1
            optimizer.zero_grad(set_to_none=True)
            loss = instance.loss(batch)
            loss.backward()
            return loss

        optimizer.step(closure)
        cumulative.append(calls)
    return instance.point(), cumulative


def test_sam_trial_steps_with_a_closure_and_counts_two_gradient_evaluations_per_step() -> None:
    steps = 120
    sam = run_trial(TrialConfig("quadratic", "asam-sgd", {"lr": 0.01}, steps, seed=1, phase="final"))
    plain = run_trial(TrialConfig("quadratic", "sgd-momentum", {"lr": 0.01}, steps, seed=1, phase="final"))
    assert sam.status == plain.status == "complete"
    assert sam.grad_evals == 2 * steps and plain.grad_evals == steps
    assert sam.steps_to_target is not None and plain.steps_to_target is not None  # both reach gap <= 1e-3
    assert sam.grad_evals_to_target == 2 * sam.steps_to_target
    assert plain.grad_evals_to_target == plain.steps_to_target
    point, evaluations = _by_hand("quadratic", "asam-sgd", 0.01, steps)
    assert sam.artifacts["final_point"] == pytest.approx(point, abs=1e-12) and evaluations[-1] == 2 * steps
    assert sam.d_estimate is None


def test_lbfgs_trial_counts_every_closure_evaluation() -> None:
    """LBFGS evaluates its closure a varying number of times per step (up to max_iter + 1): each call counts."""
    assert needs_closure("lbfgs") and needs_closure("torch.lbfgs")
    steps = 6
    trial = run_trial(TrialConfig("rosenbrock", "lbfgs", {"lr": 0.5}, steps, seed=1, phase="final"))
    point, evaluations = _by_hand("rosenbrock", "torch.lbfgs", 0.5, steps)  # torch's LBFGS, calls counted
    assert trial.status == "complete" and trial.artifacts["final_point"] == point
    per_step = {b - a for a, b in zip([0, *evaluations], evaluations)}
    assert len(per_step) > 1 and max(per_step) > 2, evaluations  # measured: 20, 20, 20, 20, 8, 1
    assert trial.grad_evals == evaluations[-1]
    assert trial.steps_to_target is not None  # rosenbrock evaluates every step: the count at that step
    assert trial.grad_evals_to_target == evaluations[trial.steps_to_target - 1]


def test_sam_in_a_bench_stores_and_summarises_gradient_evaluations(tmp_path) -> None:
    config = tiny_config(optimizers=("asam-sgd", "sgd-momentum"), trials=2, seeds=2, steps=120)
    result = run_bench(config, tmp_path / "sam.db", quiet=True)
    with Store(tmp_path / "sam.db", readonly=True) as store:
        trials = store.trials(result.run_id)
        rows = {row["optimizer"]: row for row in summarize(store, result.run_id)}
    for trial in trials:
        per_step = 2 if trial["optimizer"] == "asam-sgd" else 1
        assert trial["grad_evals"] == per_step * trial["steps"], trial
        if trial["steps_to_target"] is not None:
            assert trial["grad_evals_to_target"] == per_step * trial["steps_to_target"]
    assert rows["asam-sgd"]["grad_evals_per_step"] == 2.0 and rows["sgd-momentum"]["grad_evals_per_step"] == 1.0
    reached = rows["asam-sgd"]
    assert reached["reached"] and reached["grad_evals_to_target_mean"] == 2 * reached["steps_to_target_mean"]
    from optimlab.bench.report import write_report

    with Store(tmp_path / "sam.db", readonly=True) as store:
        write_report(store, result.run_id, tmp_path / "report")
    assert (tmp_path / "report" / "quadratic-grad-evals-to-target.png").is_file()  # a chart of its own for SAM
    assert "quadratic: gradient evaluations until gap" in (tmp_path / "report" / "index.html").read_text()
    plain = run_bench(tiny_config(optimizers=("sgd-momentum",), trials=2, seeds=2, steps=120), tmp_path / "sam.db",
                      quiet=True)  # one gradient evaluation per step: no such chart
    with Store(tmp_path / "sam.db", readonly=True) as store:
        write_report(store, plain.run_id, tmp_path / "plain")
    assert (tmp_path / "plain" / "quadratic-steps-to-target.png").is_file()
    assert not list((tmp_path / "plain").glob("*grad-evals*"))


def test_learning_rate_free_optimizers_keep_lr_one_unless_asked() -> None:
    for name in ("prodigy", "dadapt-adam"):
        assert fixed_params(name) == {"lr": 1.0} and search_space(name) == {}
        assert set(search_space(name, ("lr", "weight_decay"))) == {"weight_decay"}
        tuned = search_space(name, tune_lr_free=True)["lr"]
        assert (tuned.low, tuned.high) == get_spec(name).lr_bounds and fixed_params(name, True) == {}
    assert fixed_params("adamw") == {} and set(search_space("adamw")) == {"lr"}
    config = tiny_config(tasks=("digits-logreg",), optimizers=("prodigy", "adamw"), trials=3)
    assert [config.tune_trials(study) for study in config.studies()] == [1, 3]  # nothing to search: one run
    assert config.total_trials() == (1 + 2) + (3 + 2)
    assert [config.__class__(**{**config.__dict__, "tune_lr_free": True}).tune_trials(s)
            for s in config.studies()] == [3, 3]
    assert config.key() != config.__class__(**{**config.__dict__, "tune_lr_free": True}).key()


def _prodigy_d_by_hand(steps: int, seed: int) -> float:
    instance = get_task("digits-logreg").instantiate(seed)
    torch.manual_seed(seed)
    optimizer = create_optimizer([p for p in instance.model.parameters() if p.requires_grad], "prodigy", lr=1.0)
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        instance.loss(next(instance.batches)).backward()
        optimizer.step()
    return optimizer.d


def test_bench_stores_the_d_learning_rate_free_optimizers_found(tmp_path) -> None:
    steps = 30
    config = tiny_config(tasks=("digits-logreg",), optimizers=("prodigy", "adamw"), trials=2, seeds=2, steps=steps)
    result = run_bench(config, tmp_path / "d.db", quiet=True)
    assert result.complete and result.trials_run == (1 + 2) + (2 + 2)
    with Store(tmp_path / "d.db", readonly=True) as store:
        trials = store.trials(result.run_id)
        rows = {row["optimizer"]: row for row in summarize(store, result.run_id)}
        run = store.get_run(result.run_id)
    prodigy = [t for t in trials if t["optimizer"] == "prodigy"]
    assert [(t["phase"], t["params"]) for t in prodigy] == [("tune", {"lr": 1.0})] + [("final", {"lr": 1.0})] * 2
    for trial in prodigy:
        assert trial["d_estimate"] == _prodigy_d_by_hand(steps, trial["seed"])  # the d of that very run, stored
    assert {t["d_estimate"] for t in trials if t["optimizer"] == "adamw"} == {None}
    finals = [t["d_estimate"] for t in prodigy if t["phase"] == "final"]
    assert rows["prodigy"]["d_mean"] == pytest.approx(sum(finals) / 2, rel=1e-15) and rows["adamw"]["d_mean"] is None
    assert run["config"]["task_info"]["digits-logreg"]["lr_ranges"]["prodigy"] is None  # held fixed, not searched


def test_tune_lr_free_searches_the_multiplier_and_the_table_shows_d(tmp_path) -> None:
    db = tmp_path / "cli.db"
    output = CliRunner().invoke(app, ["bench", "--task", "digits-logreg", "--optimizers", "prodigy", "--trials", "2",
                                      "--seeds", "1", "--steps", "20", "--jobs", "1", "--quiet", "--tune-lr-free",
                                      "--db", str(db)])
    assert output.exit_code == 0, output.output
    assert "d (lr-free)" in output.output
    with Store(db, readonly=True) as store:
        tune = store.trials(1, phase="tune")
        row = summarize(store, 1)[0]
    assert len(tune) == 2 and all(0.01 <= t["params"]["lr"] <= 10 for t in tune)
    assert len({t["params"]["lr"] for t in tune}) == 2 and f"{row['d_mean']:.3g}" in output.output


def test_report_shows_gradient_evaluations_and_d(tmp_path) -> None:
    from optimlab.bench.report import write_report

    config = tiny_config(tasks=("digits-logreg",), optimizers=("prodigy", "sam-sgd"), trials=1, seeds=1, steps=20)
    result = run_bench(config, tmp_path / "r.db", quiet=True)
    with Store(tmp_path / "r.db", readonly=True) as store:
        rows = {row["optimizer"]: row for row in summarize(store, result.run_id)}
        write_report(store, result.run_id, tmp_path / "report")
    page = (tmp_path / "report" / "index.html").read_text()
    assert "<th>d found (lr-free)</th>" in page and "<th>gradient evaluations to target</th>" in page
    assert f'data-value="{rows["prodigy"]["d_mean"]!r}"' in page

