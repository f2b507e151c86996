"""Every registered task runs end to end (tiny budget) and writes rows; tasks are deterministic per seed."""

import math

import pytest
import torch

from optimlab.bench.store import Store
from optimlab.bench.tasks import TaskSpec, get_task, list_tasks
from optimlab.bench.tasks.digits import digits_data
from optimlab.bench.trial import TrialConfig, run_trial

ALL_TASKS = list_tasks()


def test_registry_covers_the_issue():
    expected = {"rosenbrock", "rastrigin", "beale", "quadratic", "nonconvex-10d", "digits-logreg", "digits-mlp",
                "exploding-rnn", "char-gpt"}
    assert set(ALL_TASKS) == expected
    assert set(list_tasks("function")) == {"rosenbrock", "rastrigin", "beale", "quadratic", "nonconvex-10d"}
    with pytest.raises(ValueError, match="Invalid family"):
        list_tasks("vision")
    with pytest.raises(KeyError, match=r"Unknown task 'digits'.*Valid names: beale, char-gpt"):
        get_task("digits")


@pytest.mark.parametrize("name", ALL_TASKS)
def test_every_task_runs_a_short_trial_and_writes_rows(name, tmp_path):
    spec = get_task(name)
    record = run_trial(TrialConfig(name, "torch.sgd", {"lr": 1e-3}, steps=3, phase="final",
                                   record_trajectory=spec.family == "function"))
    assert record.status == "complete" and record.steps == 3
    assert math.isfinite(record.final_metric) and math.isfinite(record.final_loss)
    assert record.ms_per_step > 0 and record.state_bytes_per_param == 0.0  # plain SGD keeps no state
    with Store(tmp_path / "t.db") as store:
        run_id = store.create_run("k", {"tasks": [name]})
        trial_id = store.add_trial(run_id, record)
        rows = store.trials(run_id)
        assert len(rows) == 1 and rows[0]["final_metric"] == record.final_metric
        assert [step for step, *_ in store.curve(trial_id)] == [1, 2, 3]
        if spec.family == "function":
            assert len(store.artifact(trial_id, "final_point")) == get_task(name).build(0).model.x.numel()


@pytest.mark.parametrize("name", ["digits-mlp", "exploding-rnn", "char-gpt"])
def test_model_tasks_are_deterministic_per_seed(name):
    spec = get_task(name)
    first, again, other = spec.build(3), spec.build(3), spec.build(4)
    for a, b in zip(first.model.parameters(), again.model.parameters()):
        assert torch.equal(a, b)
    assert any(not torch.equal(a, b) for a, b in zip(first.model.parameters(), other.model.parameters()))
    batch_a, batch_b = next(first.batches), next(again.batches)
    assert all(torch.equal(x, y) for x, y in zip(batch_a, batch_b))
    assert first.evaluate() == again.evaluate()
    assert spec.metric in first.evaluate() and "loss" in first.evaluate()


def test_digits_split_is_fixed_disjoint_and_standardised():
    x_train, y_train, x_val, y_val = digits_data()
    assert (len(y_train), len(y_val)) == (1438, 359)  # 20 % of 1797, rounded
    assert set(map(tuple, x_train.tolist())).isdisjoint(map(tuple, x_val.tolist()))
    assert float(x_train.mean(0).abs().max()) < 1e-5
    assert set(y_val.tolist()) == set(range(10))


def test_task_spec_validation_and_target_direction():
    spec = get_task("digits-mlp")
    assert spec.reached(0.99) and not spec.reached(0.5) and spec.better(0.9, 0.8)
    gap = get_task("rosenbrock")
    assert gap.reached(1e-4) and not gap.reached(1.0) and gap.better(0.1, 0.2)
    with pytest.raises(ValueError, match=r"Invalid mode for task 'x': 'up' \(accepted: 'min', 'max'\)"):
        TaskSpec("x", "", "m", "up", 1.0, 10, 5, 1, "model", spec.build)
    with pytest.raises(ValueError, match=r"Invalid eval_every for task 'x': 0"):
        TaskSpec("x", "", "m", "min", 1.0, 10, 5, 0, "model", spec.build)


def test_huge_learning_rate_is_recorded_as_diverged_not_raised():
    record = run_trial(TrialConfig("quadratic", "sgd", {"lr": 1e6}, steps=50))
    assert record.status == "diverged"
    assert record.steps < 50 and record.final_metric is None and record.final_loss is None
    last_loss = record.curve[-1][1]
    assert not math.isfinite(last_loss) or last_loss > 1e8
