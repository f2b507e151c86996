"""The bench runner: divergence is recorded, reruns resume, --jobs gives the same results, names are checked."""

import pytest
import torch
from bench_helpers import tiny_config, trial_keys

from optimlab.bench.runner import BenchConfig, run_bench, summarize
from optimlab.bench.store import Store
from optimlab.bench.verdict import verdicts
from optimlab.optim.registry import register_optimizer
from optimlab.schedules import create_scheduler


@pytest.fixture(scope="module")
def huge_lr_sgd():
    """A registry entry whose whole tuning range diverges on every task."""
    return register_optimizer("test.sgd-huge-lr", "torch.optim:SGD", lr_bounds=(1e4, 1e5), default_lr=1e4).name


def test_diverging_configurations_are_recorded_and_the_bench_goes_on(tmp_path, huge_lr_sgd):
    config = tiny_config(optimizers=(huge_lr_sgd, "adam"), trials=2, seeds=2)
    result = run_bench(config, tmp_path / "d.db", quiet=True)
    assert result.complete and result.trials_run == 8 and result.diverged == 4
    with Store(tmp_path / "d.db") as store:
        huge = store.trials(result.run_id, optimizer=huge_lr_sgd)
        sane = store.trials(result.run_id, optimizer="adam")
        assert len(huge) == 4 and all(t["status"] == "diverged" and t["final_metric"] is None for t in huge)
        assert len(sane) == 4 and all(t["status"] == "complete" for t in sane)
        rows = {row["optimizer"]: row for row in summarize(store, result.run_id)}
        assert store.get_run(result.run_id)["status"] == "complete"
    assert rows[huge_lr_sgd]["metric_mean"] is None and rows[huge_lr_sgd]["n_diverged"] == 2
    assert rows[huge_lr_sgd]["tune_diverged"] == 2 and rows["adam"]["metric_mean"] is not None
    result = verdicts(list(rows.values()))["quadratic"]
    assert result.best["optimizer"] == "adam" and result.kind in ("winner", "unreached")


def test_rerunning_the_same_bench_resumes_and_skips_finished_trials(tmp_path):
    config = tiny_config()
    first = run_bench(config, tmp_path / "r.db", quiet=True)
    again = run_bench(config, tmp_path / "r.db", quiet=True)
    assert (again.run_id, again.resumed, again.trials_run, again.trials_skipped) == (first.run_id, True, 0, 10)
    fresh = run_bench(config, tmp_path / "r.db", quiet=True, new_run=True)
    assert fresh.run_id != first.run_id and fresh.trials_run == 10
    with Store(tmp_path / "r.db") as store:
        assert store.count("trials") == 20
        assert trial_keys(store, first.run_id) == trial_keys(store, fresh.run_id)


def test_parallel_jobs_give_the_same_results_as_one_process(tmp_path):
    config = tiny_config(tasks=("quadratic", "beale"), trials=2, seeds=1)
    serial = run_bench(config, tmp_path / "s.db", quiet=True, jobs=1)
    parallel = run_bench(config, tmp_path / "p.db", quiet=True, jobs=2)
    assert parallel.complete and parallel.trials_run == serial.trials_run == 12
    with Store(tmp_path / "s.db") as s, Store(tmp_path / "p.db") as p:
        assert trial_keys(s, serial.run_id) == trial_keys(p, parallel.run_id)


def test_summary_means_over_final_seeds(tmp_path):
    result = run_bench(tiny_config(optimizers=("adam",), seeds=3), tmp_path / "m.db", quiet=True)
    with Store(tmp_path / "m.db") as store:
        (row,) = summarize(store, result.run_id)
        finals = store.trials(result.run_id, phase="final")
        tunes = store.trials(result.run_id, phase="tune")
    assert [t["seed"] for t in finals] == [1, 2, 3] and {t["seed"] for t in tunes} == {0}
    best_tune = min(tunes, key=lambda t: t["final_metric"])
    assert all(t["params"] == best_tune["params"] for t in finals) and row["params"] == best_tune["params"]
    assert row["metric_mean"] == pytest.approx(sum(t["final_metric"] for t in finals) / 3, rel=1e-12)
    assert row["n_seeds"] == 3 and row["mode"] == "min" and row["metric"] == "gap"


@pytest.mark.parametrize(
    ("overrides", "error", "message"),
    [
        ({"tasks": ("rosenbrok",)}, KeyError, r"Unknown task 'rosenbrok'.*Valid names: beale"),
        ({"optimizers": ("adamm",)}, KeyError, r"Unknown optimizer 'adamm'.*Valid names: adadelta"),
        ({"schedules": ("cosin",)}, KeyError, r"Unknown schedule 'cosin'.*Valid names: constant, cosine"),
        ({"clips": ("norm:x",)}, ValueError, r"Invalid clipping spec 'norm:x'"),
        ({"trials": 0}, ValueError, r"Invalid trials: 0 \(accepted range: >= 1\)"),
        ({"seeds": 0}, ValueError, r"Invalid seeds: 0"),
        ({"steps": 0}, ValueError, r"Invalid steps: 0"),
        ({"optimizers": ()}, ValueError, r"Invalid optimizers: empty"),
        ({"tune": ("lr", "beta9")}, ValueError, r"Invalid hyperparameter to tune: 'beta9'"),
    ],
)
def test_bad_configurations_fail_before_running(tmp_path, overrides, error, message):
    with pytest.raises(error, match=message):
        run_bench(tiny_config(**overrides), tmp_path / "x.db", quiet=True)
    assert not (tmp_path / "x.db").exists()


def test_schedules_and_clipping_are_part_of_the_configuration(tmp_path):
    config = tiny_config(optimizers=("adam",), schedules=("constant", "warmup-cosine"), clips=("none", "norm:0.5"),
                         trials=1, seeds=1)
    result = run_bench(config, tmp_path / "c.db", quiet=True)
    with Store(tmp_path / "c.db") as store:
        rows = summarize(store, result.run_id)
        assert {(r["schedule"], r["clip"]) for r in rows} == {("constant", "none"), ("constant", "norm:0.5"),
                                                               ("warmup-cosine", "none"), ("warmup-cosine", "norm:0.5")}
        (warm,) = store.trials(result.run_id, schedule="warmup-cosine", clip="none", phase="final")
        lrs = [lr for _, _, _, lr in store.curve(warm["id"])]
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=warm["params"]["lr"])
    scheduler = create_scheduler("warmup-cosine", optimizer, 40)
    expected = []
    for _ in range(40):
        expected.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs == pytest.approx(expected, rel=1e-12) and lrs[0] < 0.1 * max(lrs)
    assert BenchConfig(tasks=("quadratic",), optimizers=("adam",)).key() != config.key()
