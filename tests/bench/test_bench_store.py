"""The store on both backends (SQLite file, real PostgreSQL server): schema and migrations, atomic trial writes,
uniqueness, doubles bit for bit, run lookup, claims and leases."""

import math
import shutil
import sqlite3
import struct
import time

import pytest
import sqlalchemy as sa
from pathlib import Path

from optimlab.bench.store import SCHEMA_VERSION, ClaimLost, Store, StoreError, TrialRecord

LEGACY_V2 = Path(__file__).parent / "data" / "optimlab-v2.db"  # written by optimlab b301bf8 (schema version 2)


def make_record(index=0, phase="tune", status="complete", steps=3, task="quadratic", **overrides):
    values = dict(task=task, optimizer="sgd", schedule="constant", clip="none", phase=phase,
                  trial_index=index, seed=0, params={"lr": 0.1}, status=status, steps=steps, final_loss=0.5,
                  best_loss=0.25, final_metric=0.5, best_metric=0.25, steps_to_target=None, time_to_target=None,
                  ms_per_step=0.01, state_bytes_per_param=4.0, wall_time=0.1,
                  curve=[(s, 1.0 / s, None, 0.1) for s in range(1, steps + 1)], artifacts={"final_point": [1.0, 2.0]})
    values.update(overrides)
    return TrialRecord(**values)


def bits(value):
    return struct.pack("<d", value)


def test_fresh_database_is_at_the_latest_schema(db_url):
    with Store(db_url) as store:
        assert store.schema_version == SCHEMA_VERSION == 4
        names = {row[0] for row in store.execute(
            "SELECT name FROM sqlite_master" if store.dialect == "sqlite" else
            "SELECT tablename FROM pg_tables WHERE schemaname = 'public' UNION SELECT indexname FROM pg_indexes")}
        assert {"runs", "trials", "metrics", "artifacts", "claims", "optimlab_meta", "trials_by_task"} <= names
        assert {tuple(r) for r in store.execute("SELECT key, value FROM optimlab_meta")} == {
            ("application", "optimlab"), ("schema_version", "4")}
        assert {"grad_evals", "grad_evals_to_target", "d_estimate"} <= _columns(store)
        if store.dialect == "sqlite":
            assert store.execute("PRAGMA user_version")[0][0] == 4
            assert store.execute("PRAGMA journal_mode")[0][0] == "wal"


def _columns(store):
    import sqlalchemy

    with store._reading() as conn:
        return {column["name"] for column in sqlalchemy.inspect(conn).get_columns("trials")}


def test_a_version_3_database_gains_the_trial_columns_of_version_4(db_url):
    """Version 4's migration adds grad_evals, grad_evals_to_target and d_estimate to an existing trials table
    (on both backends), keeps its rows (NULL there), and new trials store them."""
    with Store(db_url) as store:
        run_id = store.create_run("key", {"tasks": ["quadratic"]})
        store.add_trial(run_id, make_record(0))
    engine = sa.create_engine(Store(db_url).url)
    with engine.begin() as conn:  # back to version 3: the trials table as it was
        for name in ("grad_evals", "grad_evals_to_target", "d_estimate"):
            conn.execute(sa.text(f"ALTER TABLE trials DROP COLUMN {name}"))
        conn.execute(sa.text("UPDATE optimlab_meta SET value = '3' WHERE key = 'schema_version'"))
        if engine.dialect.name == "sqlite":
            conn.execute(sa.text("PRAGMA user_version = 3"))
    engine.dispose()
    with Store(db_url, readonly=True) as store:  # read as it is
        assert store.schema_version == 3 and "grad_evals" not in store.trials(run_id)[0]
    with Store(db_url) as store:
        assert store.schema_version == 4
        assert {"grad_evals", "grad_evals_to_target", "d_estimate"} <= _columns(store)
        (old,) = store.trials(run_id)
        assert (old["grad_evals"], old["grad_evals_to_target"], old["d_estimate"]) == (None, None, None)
        store.add_trial(run_id, make_record(1, grad_evals=6, grad_evals_to_target=4, d_estimate=0.125))
        new = store.trials(run_id)[1]
        assert (new["grad_evals"], new["grad_evals_to_target"], new["d_estimate"]) == (6, 4, 0.125)


def legacy_rows(path):
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as conn:
        return {table: conn.execute(f"SELECT * FROM {table} ORDER BY 1, 2").fetchall()
                for table in ("runs", "trials", "metrics", "artifacts")}


def test_a_database_written_by_the_previous_version_opens_and_migrates(tmp_path):
    path = tmp_path / "old.db"
    shutil.copy(LEGACY_V2, path)
    before, raw = legacy_rows(path), path.read_bytes()
    with Store(path, readonly=True) as store:  # read-only: read as it is, nothing written
        assert store.schema_version == 2
        (run,) = store.runs()
        assert run["n_trials"] == len(before["trials"]) == 6 and run["config"]["tasks"] == ["rosenbrock"]
        from optimlab.bench.runner import summarize  # the summary (and the report) read rows without v4's columns

        assert {(row["grad_evals_per_step"], row["d_mean"]) for row in summarize(store, 1)} == {(None, None)}
    assert path.read_bytes() == raw
    with Store(path) as store:
        assert store.schema_version == SCHEMA_VERSION
        assert store.execute("PRAGMA user_version")[0][0] == SCHEMA_VERSION
        trials = store.trials(1)
        assert [(t["id"], t["final_metric"], t["params"]) for t in trials] == sorted(
            (r[0], r[14], __import__("json").loads(r[9])) for r in before["trials"])
        first = before["trials"][0][0]
        assert store.curve(first) == [tuple(r[1:]) for r in before["metrics"] if r[0] == first]
        assert store.artifact(before["artifacts"][0][1], before["artifacts"][0][2]) is not None
    after = legacy_rows(path)  # the migrations added tables and three trials columns (NULL), changed no row
    assert {table: [row[:len(before[table][0])] for row in rows] for table, rows in after.items()} == before
    assert {row[len(before["trials"][0]):] for row in after["trials"]} == {(None, None, None)}


def test_a_version_1_database_gets_the_recommend_index(tmp_path):
    path = tmp_path / "v1.db"
    shutil.copy(LEGACY_V2, path)
    with sqlite3.connect(path) as conn:  # version 1 was version 2 without this index
        conn.execute("DROP INDEX trials_by_task")
        conn.execute("PRAGMA user_version = 1")
    with Store(path) as store:
        assert store.schema_version == SCHEMA_VERSION
        assert store.execute("SELECT name FROM sqlite_master WHERE name = 'trials_by_task'")
        assert len(store.final_trials_for_task("rosenbrock")) == 2


def test_a_newer_database_is_refused(db_url):
    Store(db_url).close()
    engine = sa.create_engine(Store(db_url).url)
    with engine.begin() as conn:
        conn.execute(sa.text("UPDATE optimlab_meta SET value = '5' WHERE key = 'schema_version'"))
    engine.dispose()
    for readonly in (False, True):
        with pytest.raises(StoreError, match=r"has optimlab schema version 5, newer than this optimlab's 4: upgrade"):
            Store(db_url, readonly=readonly)


def test_doubles_round_trip_bit_for_bit(db_url):
    awkward = [0.1 + 0.2, 1 / 3, math.pi * 1e-300, 5e-324, 1.7976931348623157e308, -2.5e-17, 123456789.123456789]
    with Store(db_url) as store:
        run_id = store.create_run("key", {"tasks": ["quadratic"]})
        trial_id = store.add_trial(run_id, make_record(
            final_loss=awkward[0], best_loss=awkward[1], final_metric=awkward[2], best_metric=awkward[3],
            time_to_target=awkward[4], ms_per_step=awkward[5], wall_time=awkward[6], params={"lr": awkward[1]},
            curve=[(i, v, -v, v / 7) for i, v in enumerate(awkward)]))
        (row,) = store.trials(run_id)
        stored = [row[k] for k in ("final_loss", "best_loss", "final_metric", "best_metric", "time_to_target",
                                   "ms_per_step", "wall_time")]
        assert [bits(v) for v in stored] == [bits(v) for v in awkward]
        assert bits(row["params"]["lr"]) == bits(awkward[1])
        assert [tuple(bits(x) for x in r[1:]) for r in store.curve(trial_id)] == [
            (bits(v), bits(-v), bits(v / 7)) for v in awkward]


def test_trial_rows_curve_and_artifacts_round_trip(db_url):
    with Store(db_url) as store:
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


def test_a_failing_trial_write_leaves_nothing(db_url):
    with Store(db_url) as store:
        run_id = store.create_run("key", {})
        with pytest.raises(TypeError):
            store.add_trial(run_id, make_record(artifacts={"bad": object()}))  # fails after the trial row
        assert (store.count("trials"), store.count("metrics"), store.count("artifacts")) == (0, 0, 0)


def test_a_duplicate_trial_is_impossible(db_url):
    with Store(db_url) as store:
        run_id = store.create_run("key", {})
        store.add_trial(run_id, make_record(0))
        with pytest.raises(sa.exc.IntegrityError, match="(?i)unique"):
            store.add_trial(run_id, make_record(0))
        store.add_trial(run_id, make_record(0, phase="final"))
        assert store.count("trials") == 2 and store.count("metrics") == 6


def test_run_lookup_latest_status_and_errors(db_url):
    with Store(db_url) as store:
        with pytest.raises(KeyError, match="No runs"):
            store.get_run("latest")
        first = store.create_run("a", {"x": 1})
        second = store.create_run("a", {"x": 2})
        assert store.get_run("latest")["id"] == second and store.get_run(str(first))["config"] == {"x": 1}
        assert store.latest_run_with_key("a")["id"] == second and store.latest_run_with_key("b") is None
        store.set_run_status(first, "complete")
        assert store.get_run(first)["finished_at"] is not None
        store.add_trial(first, make_record(0, status="diverged"))
        store.add_trial(first, make_record(1))
        assert [(r["id"], r["n_trials"], r["n_diverged"]) for r in store.runs()] == [(second, 0, 0), (first, 2, 1)]
        with pytest.raises(KeyError, match=r"Unknown run 9 .*Known runs: 1, 2"):
            store.get_run(9)
        with pytest.raises(ValueError, match=r"Invalid run id: 'abc' \(accepted: an integer id or 'latest'\)"):
            store.get_run("abc")
        with pytest.raises(ValueError, match="Invalid status"):
            store.set_run_status(first, "done")
        with pytest.raises(ValueError, match="Invalid table"):
            store.count("sqlite_master")


UNITS = [("quadratic", "sgd", "constant", "none", "tune", 0), ("quadratic", "sgd", "constant", "none", "final", 0),
         ("beale", "sgd", "constant", "none", "tune", 0)]


def test_each_unit_is_claimed_by_one_worker_and_finals_wait_for_their_tuning(db_url):
    with Store(db_url) as a, Store(db_url) as b:
        run_id, resumed = a.open_run("k", {}, "", UNITS)
        assert not resumed and b.open_run("k", {}, "", UNITS) == (run_id, True)  # no second run, no new units
        assert len(a.claims(run_id)) == 3
        first = a.claim(run_id, "host-a:1", lease=60)
        second = b.claim(run_id, "host-b:1", lease=60)
        assert (first.task, first.unit, second.task, second.unit) == ("quadratic", "tune", "beale", "tune")
        assert a.claim(run_id, "host-a:1", lease=60) is None  # the final waits for quadratic's tuning
        assert a.units_left(run_id) == (3, 2)
        a.finish(first)
        final = b.claim(run_id, "host-b:1", lease=60)
        assert (final.task, final.unit, final.unit_index, final.takeover) == ("quadratic", "final", 0, False)
        b.add_trial(run_id, make_record(0, phase="final"), claim=final, lease=60, finish=True)
        b.release(second)  # stopped early: free again at once
        again = a.claim(run_id, "host-a:1", lease=60)
        assert (again.task, again.takeover) == ("beale", False)
        a.finish(again)
        assert a.units_left(run_id) == (0, 0) and a.claim(run_id, "host-a:1", lease=60) is None


def test_an_expired_lease_is_taken_over_and_the_old_owner_writes_nothing(db_url):
    with Store(db_url) as store:
        run_id, _ = store.open_run("k", {}, "", UNITS[:1])
        stale = store.claim(run_id, "far-away-host:4242", lease=0.3)
        assert store.claim(run_id, "here:1", lease=0.3) is None  # held
        time.sleep(0.4)
        taken = store.claim(run_id, "here:1", lease=30)
        assert taken.takeover and store.claims(run_id)[0]["takeovers"] == 1
        with pytest.raises(ClaimLost, match="far-away-host:4242 lost its claim on quadratic/sgd tune 0"):
            store.add_trial(run_id, make_record(0), claim=stale, lease=30)
        with pytest.raises(ClaimLost):
            store.heartbeat(stale, 30)
        assert store.count("trials") == 0
        store.add_trial(run_id, make_record(0), claim=taken, lease=30)
        assert store.count("trials") == 1


def test_a_dead_process_on_this_machine_loses_its_claim_at_once(db_url):
    import socket
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    with Store(db_url) as store:
        run_id, _ = store.open_run("k", {}, "", UNITS[:1])
        store.claim(run_id, f"{socket.gethostname()}:{dead.stdout.strip()}", lease=600)
        taken = store.claim(run_id, "here:1", lease=600)
        assert taken is not None and taken.takeover


def test_urls_and_paths_and_what_messages_show(tmp_path):
    from optimlab.bench.store import describe

    assert describe("postgresql+psycopg://bench:s3cret@db/optimlab") == "postgresql+psycopg://bench:***@db/optimlab"
    assert "s3cret" not in describe("postgresql+psycopg://bench@db/optimlab?password=s3cret")
    assert describe(tmp_path / "a.db") == str(tmp_path / "a.db")
    with Store(f"sqlite:///{tmp_path}/url.db") as store:  # a URL is a URL, also for SQLite
        assert store.path == tmp_path / "url.db" and store.schema_version == SCHEMA_VERSION
    with pytest.raises(StoreError, match=r"cannot open mysql://u:\*\*\*@h/db: unsupported database 'mysql'"):
        Store("mysql://u:pw@h/db")
    with pytest.raises(StoreError, match="no database at"):
        Store(tmp_path / "missing.db", readonly=True)
    assert not (tmp_path / "missing.db").exists()
