"""Kill-and-resume with a real SIGKILL, and Ctrl-C (SIGINT) keeping finished trials."""

import signal
import sqlite3
import subprocess
import time

import pytest
from bench_helpers import cli_command, cli_env, run_cli, trial_keys

from optimlab.bench.runner import BenchConfig, run_bench
from optimlab.bench.store import Store

ARGS = ("bench", "--task", "quadratic", "--optimizers", "sgd-momentum,adam", "--trials", "3", "--seeds", "2",
        "--steps", "150", "--quiet")
CONFIG = BenchConfig(tasks=("quadratic",), optimizers=("sgd-momentum", "adam"), trials=3, seeds=2, steps=150)
TOTAL = 2 * (3 + 2)


def count_trials(db) -> int:
    if not db.exists():
        return 0
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as conn:
            return conn.execute("SELECT COUNT(*) FROM trials").fetchone()[0]
    except sqlite3.OperationalError:  # the schema is not created yet
        return 0


def start_and_stop_midway(db, sig, jobs) -> subprocess.Popen:
    """Start the bench, wait until a few trials are stored, send ``sig``, and wait for the process."""
    process = subprocess.Popen(cli_command(*ARGS, "--db", str(db), "--jobs", str(jobs)), env=cli_env(),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 90
    while count_trials(db) < 2 and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.02)
    process.send_signal(sig)
    process.communicate(timeout=60)
    return process


def assert_consistent_and_complete(db, reference_db):
    with Store(db) as store:
        assert store.execute("PRAGMA integrity_check")[0][0] == "ok"
        (run,) = store.runs()
        assert run["status"] == "complete" and run["n_trials"] == TOTAL
        for trial in store.trials(run["id"]):  # every stored trial has its whole curve
            assert len(store.curve(trial["id"])) == trial["steps"] + (trial["status"] == "diverged")
        keys = trial_keys(store, run["id"])
    with Store(reference_db) as reference:
        assert keys == trial_keys(reference, reference.runs()[0]["id"])  # same trials, same results


@pytest.fixture(scope="module")
def reference_db(tmp_path_factory):
    """The same bench (the CLI arguments above make exactly CONFIG), never interrupted."""
    db = tmp_path_factory.mktemp("reference") / "ref.db"
    assert run_bench(CONFIG, db, quiet=True).complete
    return db


@pytest.mark.slow
@pytest.mark.parametrize("jobs", [1, 2])
def test_sigkill_then_rerun_completes_without_duplicates(tmp_path, reference_db, jobs):
    db = tmp_path / "killed.db"
    killed = start_and_stop_midway(db, signal.SIGKILL, jobs)
    assert killed.returncode == -signal.SIGKILL
    stored = count_trials(db)  # workers (jobs=2) died with the parent: nothing is written after the kill
    time.sleep(0.3)
    assert 2 <= stored == count_trials(db) < TOTAL
    if jobs == 1:  # the user's way: the same command again
        resumed = run_cli(*ARGS, "--db", str(db), "--jobs", "1")
        assert resumed.returncode == 0, resumed.stderr
        assert "(resumed)" in resumed.stdout and f"{TOTAL - stored} trials run, {stored} already done" in resumed.stdout
    else:
        result = run_bench(CONFIG, db, jobs=2, quiet=True)
        assert result.resumed and (result.trials_run, result.trials_skipped) == (TOTAL - stored, stored)
    assert_consistent_and_complete(db, reference_db)


@pytest.mark.slow
def test_ctrl_c_stops_cleanly_and_keeps_finished_trials(tmp_path, reference_db):
    db = tmp_path / "interrupted.db"
    interrupted = start_and_stop_midway(db, signal.SIGINT, 2)
    assert interrupted.returncode == 130
    with Store(db) as store:
        (run,) = store.runs()
        assert run["status"] == "interrupted" and 2 <= run["n_trials"] < TOTAL
    result = run_bench(CONFIG, db, jobs=2, quiet=True)
    assert result.resumed and result.trials_skipped == run["n_trials"]
    assert_consistent_and_complete(db, reference_db)
