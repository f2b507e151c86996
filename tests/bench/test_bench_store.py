"""The SQLite store: migrations, atomic trial writes, uniqueness, run lookup."""

import sqlite3

import pytest

from optimlab.bench.store import MIGRATIONS, SCHEMA_VERSION, Store, TrialRecord


def make_record(index=0, phase="tune", status="complete", steps=3, **overrides):
    values = dict(task="quadratic", optimizer="sgd", schedule="constant", clip="none", phase=phase,
                  trial_index=index, seed=0, params={"lr": 0.1}, status=status, steps=steps, final_loss=0.5,
                  best_loss=0.25, final_metric=0.5, best_metric=0.25, steps_to_target=None, time_to_target=None,
                  ms_per_step=0.01, state_bytes_per_param=4.0, wall_time=0.1,
                  curve=[(s, 1.0 / s, None, 0.1) for s in range(1, steps + 1)], artifacts={"final_point": [1.0, 2.0]})
    values.update(overrides)
    return TrialRecord(**values)


def test_fresh_database_is_at_the_latest_schema(tmp_path):
    with Store(tmp_path / "a.db") as store:
        assert store.schema_version == SCHEMA_VERSION == len(MIGRATIONS) == 2
        names = {row[0] for row in store.execute("SELECT name FROM sqlite_master")}
        assert {"runs", "trials", "metrics", "artifacts", "trials_by_task"} <= names


def test_migrating_a_version_1_database_keeps_its_data(tmp_path):
    path = tmp_path / "old.db"
    conn = sqlite3.connect(path)
    conn.executescript(MIGRATIONS[0])
    conn.execute("PRAGMA user_version = 1")
    conn.execute("INSERT INTO runs (key, status, config, created_at) VALUES ('k', 'complete', '{}', 'then')")
    conn.execute(
        "INSERT INTO trials (run_id, task, optimizer, schedule, clip, phase, trial_index, seed, params, status, "
        "steps, final_metric, wall_time, created_at) VALUES (1, 't', 'sgd', 'constant', 'none', 'final', 0, 1, "
        "'{\"lr\": 0.5}', 'complete', 10, 0.75, 1.0, 'then')")
    conn.commit()
    conn.close()
    with Store(path) as store:
        assert store.schema_version == SCHEMA_VERSION
        assert store.execute("SELECT name FROM sqlite_master WHERE name = 'trials_by_task'")
        (trial,) = store.trials(1)
        assert trial["params"] == {"lr": 0.5} and trial["final_metric"] == 0.75
        assert store.final_trials_for_task("t")[0]["id"] == trial["id"]


def test_a_newer_database_is_refused(tmp_path):
    path = tmp_path / "new.db"
    Store(path).close()
    conn = sqlite3.connect(path)
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.close()
    with pytest.raises(RuntimeError, match="newer than this optimlab"):
        Store(path)


def test_trial_rows_curve_and_artifacts_round_trip(tmp_path):
    with Store(tmp_path / "a.db") as store:
        run_id = store.create_run("key", {"tasks": ["quadratic"]}, "optimlab bench")
        record = make_record(final_metric=float("nan"), best_metric=float("inf"))
        trial_id = store.add_trial(run_id, record)
        (row,) = store.trials(run_id)
        assert row["final_metric"] is None and row["best_metric"] is None  # non-finite stored as NULL
        assert row["params"] == {"lr": 0.1} and row["steps"] == 3
        assert store.curve(trial_id) == [(1, 1.0, None, 0.1), (2, 0.5, None, 0.1), (3, 1 / 3, None, 0.1)]
        assert store.artifact(trial_id, "final_point") == [1.0, 2.0]
        assert store.artifact(trial_id, "trajectory") is None
        assert store.count("metrics") == 3 and store.count("artifacts") == 1


def test_a_failing_trial_write_leaves_nothing(tmp_path):
    with Store(tmp_path / "a.db") as store:
        run_id = store.create_run("key", {})
        with pytest.raises(TypeError):
            store.add_trial(run_id, make_record(artifacts={"bad": object()}))  # fails after the trial row
        assert (store.count("trials"), store.count("metrics"), store.count("artifacts")) == (0, 0, 0)


def test_a_duplicate_trial_is_impossible(tmp_path):
    with Store(tmp_path / "a.db") as store:
        run_id = store.create_run("key", {})
        store.add_trial(run_id, make_record(0))
        with pytest.raises(sqlite3.IntegrityError, match="UNIQUE"):
            store.add_trial(run_id, make_record(0))
        store.add_trial(run_id, make_record(0, phase="final"))
        assert store.count("trials") == 2 and store.count("metrics") == 6


def test_run_lookup_latest_status_and_errors(tmp_path):
    with Store(tmp_path / "a.db") as store:
        with pytest.raises(KeyError, match="No runs"):
            store.get_run("latest")
        first = store.create_run("a", {"x": 1})
        second = store.create_run("a", {"x": 2})
        assert store.get_run("latest")["id"] == second and store.get_run(str(first))["config"] == {"x": 1}
        assert store.latest_run_with_key("a")["id"] == second and store.latest_run_with_key("b") is None
        store.set_run_status(first, "complete")
        assert store.get_run(first)["finished_at"] is not None
        assert [r["id"] for r in store.runs()] == [second, first]
        with pytest.raises(KeyError, match=r"Unknown run 9 .*Known runs: 1, 2"):
            store.get_run(9)
        with pytest.raises(ValueError, match=r"Invalid run id: 'abc' \(accepted: an integer id or 'latest'\)"):
            store.get_run("abc")
        with pytest.raises(ValueError, match="Invalid status"):
            store.set_run_status(first, "done")
        with pytest.raises(ValueError, match="Invalid table"):
            store.count("sqlite_master")
