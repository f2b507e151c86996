"""A small finished bench shared by the report and CLI tests (built once per session)."""

import secrets

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


@pytest.fixture(scope="session")
def postgres():
    """A real PostgreSQL server on a free local port in a temporary folder, for the whole session.

    Skipped only when no server binaries are installed (`.ci/run` installs Debian's postgresql package);
    a server that is installed but does not start fails the tests that need it.
    """
    from optimlab.bench.pgtemp import TemporaryPostgres, find_server_binaries

    if find_server_binaries() is None:
        pytest.skip("PostgreSQL is not installed (apt-get install postgresql; .ci/run does it)")
    server = TemporaryPostgres().start()
    yield server
    server.stop()


@pytest.fixture
def postgres_url(postgres):
    """The URL of a new, empty database on the session's server."""
    return postgres.create_database(f"t_{secrets.token_hex(4)}")


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def db_url(request, tmp_path):
    """A new, empty database on each backend: an SQLite file path, or a PostgreSQL URL."""
    if request.param == "sqlite":
        return str(tmp_path / "bench.db")
    return request.getfixturevalue("postgres_url")
