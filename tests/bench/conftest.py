"""A small finished bench shared by the report and CLI tests (built once per session)."""

import pytest

from optimlab.bench.runner import BenchConfig, run_bench


@pytest.fixture(scope="session")
def finished_bench(tmp_path_factory):
    """(database path, run id) of a bench over a 2-D function, the 10-D function and digits."""
    db = tmp_path_factory.mktemp("bench") / "bench.db"
    config = BenchConfig(tasks=("rosenbrock", "nonconvex-10d", "digits-logreg"), optimizers=("adam", "sgd-momentum"),
                         trials=2, seeds=2, steps=30)
    result = run_bench(config, db, quiet=True)
    assert result.complete
    return db, result.run_id
