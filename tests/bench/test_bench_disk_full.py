"""A bench that fills the disk: one-line error (exit code 2), run marked interrupted, and it resumes.

The full disk is SQLite's own: ``PRAGMA max_page_count`` caps the file, and a write past it fails inside
SQLite with SQLITE_FULL ("database or disk is full"), the error a full file system gives.
"""

import pytest
from bench_helpers import trial_keys
from typer.testing import CliRunner

from optimlab.bench.runner import BenchConfig, run_bench
from optimlab.bench.store import Store
from optimlab.cli import app

ARGS = ["bench", "--task", "quadratic", "--optimizers", "sgd-momentum,adam", "--trials", "3", "--seeds", "2",
        "--steps", "150", "--quiet"]
CONFIG = BenchConfig(tasks=("quadratic",), optimizers=("sgd-momentum", "adam"), trials=3, seeds=2, steps=150)


@pytest.mark.parametrize("jobs", [1, 2])
def test_a_full_disk_stops_the_bench_with_one_line_and_the_run_resumes(tmp_path, monkeypatch, jobs):
    db = tmp_path / "full.db"
    connect = Store._sqlite_connect

    def small_disk(dbapi_connection, record):
        connect(dbapi_connection, record)
        dbapi_connection.execute("PRAGMA max_page_count = 18")  # the empty schema takes 13 pages

    with monkeypatch.context() as patch:
        patch.setattr(Store, "_sqlite_connect", staticmethod(small_disk))
        result = CliRunner().invoke(app, [*ARGS, "--jobs", str(jobs), "--db", str(db)])
    assert result.exit_code == 2, result.output
    text = result.output.strip()
    assert "\n" not in text and text.startswith(f"error: cannot write to {db}: no space left on device; run 1 is "
                                                "marked interrupted, its ")
    assert text.endswith("stored trials are intact: free space and rerun the same command to resume")
    with Store(db) as store:
        (run,) = store.runs()
        assert run["status"] == "interrupted" and 1 <= run["n_trials"] < 10
        stored = run["n_trials"]

    resumed = CliRunner().invoke(app, [*ARGS, "--jobs", str(jobs), "--db", str(db)])
    assert resumed.exit_code == 0, resumed.output
    assert f"run 1 (resumed): {10 - stored} trials run, {stored} already done" in resumed.output
    run_bench(CONFIG, tmp_path / "reference.db", quiet=True)
    with Store(db) as store, Store(tmp_path / "reference.db") as reference:
        assert store.runs()[0]["status"] == "complete"
        assert trial_keys(store, 1) == trial_keys(reference, 1)
