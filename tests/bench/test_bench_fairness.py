"""Fairness of the bench's headline: the same tuning seed stream for every optimizer, one learning-rate range
per algorithm whatever its name, --lr-range for all alike, and the winner of a max-mode task is the highest."""

import math

import pytest
from bench_helpers import tiny_config

from optimlab.bench.runner import run_bench, summarize
from optimlab.bench.store import Store
from optimlab.bench.tuning import lr_search_range, search_space
from optimlab.bench.verdict import verdicts
from optimlab.optim.registry import get_spec, list_optimizers

_STATE_ONLY = ("state_dtype", "foreach", "fused")  # storage and kernels: the same algorithm


def test_every_optimizer_gets_the_same_tuning_seed_stream(tmp_path):
    # adam searches [1e-5, 1e-1], sgd [1e-4, 1] (x10 on test functions): the random startup trials must sit
    # at the same quantile of each range, trial by trial
    config = tiny_config(optimizers=("adam", "sgd"), trials=3, seeds=1, steps=5)
    result = run_bench(config, tmp_path / "s.db", quiet=True)
    with Store(tmp_path / "s.db") as store:
        positions = {}
        for optimizer in config.optimizers:
            low, high = lr_search_range(optimizer, lr_widen=10.0)
            tune = store.trials(result.run_id, optimizer=optimizer, phase="tune")
            positions[optimizer] = [(math.log(t["params"]["lr"]) - math.log(low)) / (math.log(high) - math.log(low))
                                    for t in sorted(tune, key=lambda t: t["trial_index"])]
    assert len(positions["adam"]) == 3 and len(set(positions["adam"])) == 3
    assert positions["adam"] == pytest.approx(positions["sgd"], abs=1e-12)


def _algorithm(name):
    spec = get_spec(name)
    cls = spec.resolve()
    preset = tuple(sorted((k, v) for k, v in spec.preset.items() if k not in _STATE_ONLY))
    return cls.__name__.lower(), preset


def test_names_of_one_algorithm_share_one_learning_rate_range():
    groups = {}
    for name in list_optimizers():
        try:
            key = _algorithm(name)
        except (ImportError, AttributeError):
            continue
        groups.setdefault(key, []).append(name)
    shared = [names for names in groups.values() if len(names) > 1]
    assert any("torch.adam" in names and "adam" in names for names in shared)
    for names in shared:
        assert len({get_spec(n).lr_bounds for n in names}) == 1, names


def test_lr_range_overrides_every_optimizer_alike():
    for optimizer in ("adam", "sgd", "lion"):
        space = search_space(optimizer, lr_widen=10.0, lr_range=(1e-3, 1e-2))["lr"]
        assert (space.low, space.high) == (1e-3, 1e-2)
    with pytest.raises(ValueError, match="Invalid lr range"):
        lr_search_range("adam", lr_range=(1e-2, 1e-3))


def test_a_max_mode_bench_crowns_the_highest_accuracy(tmp_path):
    # digits-logreg (higher accuracy is better): adam tuned on its range vs SGD kept at tiny learning rates
    from optimlab.optim.registry import register_optimizer

    slow = register_optimizer("test.sgd-tiny-lr", "torch.optim:SGD", lr_bounds=(1e-6, 2e-6), default_lr=1e-6).name
    config = tiny_config(tasks=("digits-logreg",), optimizers=(slow, "adam"), trials=2, seeds=2, steps=40)
    result = run_bench(config, tmp_path / "m.db", quiet=True)
    with Store(tmp_path / "m.db") as store:
        rows = summarize(store, result.run_id)
    by_name = {r["optimizer"]: r for r in rows}
    assert by_name["adam"]["metric_mean"] > by_name[slow]["metric_mean"] + 0.2
    verdict = verdicts(rows)["digits-logreg"]
    assert verdict.best["optimizer"] == "adam" and verdict.kind in ("winner", "unreached")
