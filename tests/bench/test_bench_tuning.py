"""Tuning: search spaces from the registry, reproducible TPE suggestions, and a Rosenbrock that gets solved."""

import math

import numpy as np
import pytest
from bench_helpers import tiny_config, trial_keys

from optimlab.bench.runner import BenchConfig, run_bench, summarize
from optimlab.bench.store import Store
from optimlab.bench.tuning import DIVERGED_SCORE, HistoryItem, best_index, score, search_space, suggest
from optimlab.optim.registry import get_spec


def test_search_space_uses_registry_bounds_and_accepted_extras():
    space = search_space("adam", ("lr", "weight_decay", "momentum"))
    low, high = get_spec("adam").lr_bounds
    assert (space["lr"].low, space["lr"].high, space["lr"].log) == (low, high, True)
    assert set(space) == {"lr", "weight_decay"}  # Adam takes no momentum
    assert set(search_space("sgd-momentum", ("lr", "momentum"))) == {"lr"}  # fixed by the preset
    assert set(search_space("sgd", ("lr", "momentum"))) == {"lr", "momentum"}
    assert search_space("sgd", lr_widen=10.0)["lr"].high == pytest.approx(10 * get_spec("sgd").lr_bounds[1])
    with pytest.raises(ValueError, match=r"Invalid hyperparameter to tune: 'beta' \(accepted: lr, weight_decay"):
        search_space("adam", ("lr", "beta"))
    with pytest.raises(ValueError, match="Invalid lr_widen"):
        search_space("adam", lr_widen=0.5)


def test_score_direction_and_divergence():
    assert score(0.25, "min", False) == 0.25 and score(0.9, "max", False) == -0.9
    assert score(0.9, "max", True) == score(None, "min", False) == score(math.nan, "min", False) == DIVERGED_SCORE
    with pytest.raises(ValueError, match="Invalid mode"):
        score(1.0, "up", False)
    history = [HistoryItem({"lr": 1.0}, 3.0), HistoryItem({"lr": 2.0}, 1.0), HistoryItem({"lr": 3.0}, 1.0)]
    assert best_index(history) == 1
    with pytest.raises(ValueError, match="empty"):
        best_index([])


def test_suggestions_are_a_pure_function_of_seed_index_and_history():
    space = search_space("adam", ("lr", "weight_decay"))
    history = [HistoryItem(suggest(space, [], i, seed=7), float(i)) for i in range(6)]
    again = [HistoryItem(suggest(space, [], i, seed=7), float(i)) for i in range(6)]
    assert history == again
    assert suggest(space, history, 6, seed=7) == suggest(space, history, 6, seed=7)
    assert suggest(space, history, 6, seed=7) != suggest(space, history, 6, seed=8)
    for item in history:
        assert space["lr"].low <= item.params["lr"] <= space["lr"].high


def test_startup_draws_are_log_uniform_over_the_range():
    space = search_space("adam")
    logs = np.log10([suggest(space, [], i, seed=0)["lr"] for i in range(300)])
    low, high = np.log10(space["lr"].low), np.log10(space["lr"].high)
    # uniform on [low, high]: mean at the centre, variance (high - low)^2 / 12; 300 draws → 4-sigma bounds
    assert abs(logs.mean() - (low + high) / 2) < 4 * (high - low) / math.sqrt(12 * 300)
    assert abs(logs.var() - (high - low) ** 2 / 12) < 0.25 * (high - low) ** 2 / 12


def test_tpe_concentrates_on_the_good_region():
    space = search_space("sgd")
    history = []
    for i in range(16):  # objective: distance of log10(lr) from -2
        params = suggest(space, history, i, seed=0)
        history.append(HistoryItem(params, abs(math.log10(params["lr"]) + 2)))
    startup = min(h.score for h in history[:4])
    assert min(h.score for h in history) < min(0.1, startup)


def test_a_bench_is_deterministic_for_a_fixed_seed(tmp_path):
    config = tiny_config()
    first = run_bench(config, tmp_path / "a.db", quiet=True)
    second = run_bench(config, tmp_path / "b.db", quiet=True)
    with Store(tmp_path / "a.db") as a, Store(tmp_path / "b.db") as b:
        keys_a, keys_b = trial_keys(a, first.run_id), trial_keys(b, second.run_id)
    assert len(keys_a) == 2 * (3 + 2) and keys_a == keys_b
    other = run_bench(tiny_config(seed=1), tmp_path / "c.db", quiet=True)
    with Store(tmp_path / "c.db") as c:
        assert trial_keys(c, other.run_id) != keys_a


@pytest.mark.slow
def test_tuned_adam_and_sgd_momentum_solve_rosenbrock(tmp_path):
    config = BenchConfig(tasks=("rosenbrock",), optimizers=("adam", "sgd-momentum"), trials=8, seeds=1, steps=1500)
    result = run_bench(config, tmp_path / "r.db", quiet=True)
    with Store(tmp_path / "r.db") as store:
        rows = {row["optimizer"]: row for row in summarize(store, result.run_id)}
        finals = store.trials(result.run_id, phase="final")
    assert set(rows) == {"adam", "sgd-momentum"}
    for trial in finals:
        assert trial["status"] == "complete" and trial["final_metric"] < 1e-3, trial
        assert trial["final_loss"] < 1e-3
