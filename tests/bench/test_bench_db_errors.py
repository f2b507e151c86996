"""Unusable databases give one-line errors (exit code 2) on every command that takes --db, and are never written.

SQLite files: garbage, a text file, a truncated or internally damaged optimlab file, a directory, another
application's SQLite file. PostgreSQL: an unreachable server, a wrong password, a database that is not
optimlab's, a schema newer than this version (the URL is named, its password never shown).
"""

import os
import shutil
import sqlite3
from pathlib import Path

import pytest
import sqlalchemy as sa
from typer.testing import CliRunner

from optimlab.bench.store import SCHEMA_VERSION, Store
from optimlab.cli import app

LEGACY_V2 = Path(__file__).parent / "data" / "optimlab-v2.db"
COMMANDS = [
    ("runs", "list"),
    ("runs", "show", "latest"),
    ("report", "latest", "--out", "{tmp}/report"),
    ("recommend", "--task", "quadratic"),
    ("bench", "--task", "quadratic", "--optimizers", "adam", "--trials", "1", "--seeds", "1", "--steps", "5",
     "--jobs", "1", "--quiet"),
]


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def assert_one_line_error(result, *fragments):
    assert result.exit_code == 2, result.output
    text = result.output.strip()
    assert text.startswith("error: ") and "\n" not in text and "Traceback" not in text, text
    for fragment in fragments:
        assert fragment in text, text


def garbage(path):
    path.write_bytes(os.urandom(8192))


def text_file(path):
    path.write_text("task,optimizer,metric\nquadratic,adam,0.1\n" * 50)


def truncated(path):
    path.write_bytes(LEGACY_V2.read_bytes()[: 4096 * 3 + 1000])


def damaged_page(path):
    data = bytearray(LEGACY_V2.read_bytes())
    data[4 * 4096:5 * 4096] = os.urandom(4096)  # a garbage page in the middle
    path.write_bytes(bytes(data))


def foreign(path):
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE notes (id INTEGER PRIMARY KEY, body TEXT)")
        conn.execute("INSERT INTO notes (body) VALUES ('not a bench')")
    conn.close()


BAD_FILES = {
    "garbage": (garbage, "is not an optimlab database (not an SQLite file"),
    "text": (text_file, "is not an optimlab database (not an SQLite file"),
    "truncated": (truncated, "is damaged"),
    "damaged-page": (damaged_page, "is damaged"),
    "foreign-sqlite": (foreign, "is not an optimlab database (it has tables notes but no optimlab marker)"),
}


@pytest.mark.parametrize("kind", sorted(BAD_FILES))
def test_a_bad_database_file_is_a_one_line_error_and_stays_untouched(tmp_path, kind):
    make, message = BAD_FILES[kind]
    path = tmp_path / "bad.db"
    make(path)
    before = path.read_bytes()
    for command in COMMANDS:
        args = [part.replace("{tmp}", str(tmp_path)) for part in command]
        assert_one_line_error(invoke(*args, "--db", path), str(path), message)
        assert path.read_bytes() == before, command  # never written, not even a journal mode change
        assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.db"], command  # no -wal/-shm, no report


def test_a_directory_as_database_is_a_one_line_error(tmp_path):
    for command in COMMANDS:
        args = [part.replace("{tmp}", str(tmp_path)) for part in command]
        assert_one_line_error(invoke(*args, "--db", tmp_path), f"cannot open {tmp_path}: it is a directory")


def test_read_only_commands_open_the_database_read_only(tmp_path, finished_bench):
    db, _ = finished_bench
    path = tmp_path / "copy.db"
    with sqlite3.connect(db) as source, sqlite3.connect(path) as target:  # a consistent copy, WAL folded in
        source.backup(target)
    target.close()
    before = path.read_bytes()
    for command in (("runs", "list"), ("runs", "show", "latest"), ("recommend", "--task", "rosenbrock")):
        assert invoke(*command, "--db", path).exit_code == 0
    assert path.read_bytes() == before
    with Store(path, readonly=True) as store, pytest.raises(sa.exc.OperationalError, match="readonly database"):
        store.execute("CREATE TABLE x (a)")


def test_a_previous_version_database_is_read_without_migrating(tmp_path):
    path = tmp_path / "old.db"
    shutil.copy(LEGACY_V2, path)
    before = path.read_bytes()
    listing = invoke("runs", "list", "--db", path)
    assert listing.exit_code == 0 and "rosenbrock" in listing.output
    assert path.read_bytes() == before


@pytest.mark.postgres
def test_postgresql_problems_are_one_line_errors_without_the_password(postgres, postgres_url):
    import socket

    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        closed_port = sock.getsockname()[1]
    secret = postgres.password
    unreachable = f"postgresql+psycopg://optimlab:{secret}@127.0.0.1:{closed_port}/optimlab"
    wrong_password = postgres.url("postgres", password="not-the-password")

    foreign_url = postgres_url
    engine = sa.create_engine(foreign_url)
    with engine.begin() as conn:
        conn.execute(sa.text("CREATE TABLE orders (id integer PRIMARY KEY)"))
    engine.dispose()
    newer_url = postgres.create_database("newer_schema")
    Store(newer_url).close()
    engine = sa.create_engine(newer_url)
    with engine.begin() as conn:
        conn.execute(sa.text("UPDATE optimlab_meta SET value = '99' WHERE key = 'schema_version'"))
    engine.dispose()

    cases = [
        (unreachable, f"cannot open postgresql+psycopg://optimlab:***@127.0.0.1:{closed_port}/optimlab: "),
        (wrong_password, "password authentication failed"),
        (foreign_url, "is not an optimlab database (it has tables orders but no optimlab marker)"),
        (newer_url, f"has optimlab schema version 99, newer than this optimlab's {SCHEMA_VERSION}"),
    ]
    for url, message in cases:
        for command in COMMANDS[:2] + COMMANDS[-1:]:
            result = invoke(*command, "--db", url)
            assert_one_line_error(result, message, url.replace(secret, "***").replace("not-the-password", "***"))
            assert secret not in result.output and "not-the-password" not in result.output
    engine = sa.create_engine(foreign_url)
    with engine.connect() as conn:  # nothing was added to the foreign database
        assert sa.inspect(conn).get_table_names() == ["orders"]
    engine.dispose()


@pytest.mark.postgres
def test_urls_are_handed_to_sqlalchemy_and_credentials_may_come_from_libpq(postgres, postgres_url, tmp_path,
                                                                           monkeypatch):
    name = postgres_url.rsplit("/", 1)[1]
    Store(postgres_url).close()
    socket_url = f"postgresql+psycopg://optimlab@/{name}?host={postgres.folder}&port={postgres.port}"
    no_password = f"postgresql+psycopg://optimlab@127.0.0.1:{postgres.port}/{name}"
    listing = invoke("runs", "list", "--db", socket_url)  # a Unix socket (trusted): not a file path
    assert listing.exit_code == 0 and f"postgresql+psycopg://optimlab@/{name}" in listing.output
    assert not any(tmp_path.iterdir())
    assert_one_line_error(invoke("runs", "list", "--db", no_password), "cannot open " + no_password)
    monkeypatch.setenv("PGPASSWORD", postgres.password)
    assert invoke("runs", "list", "--db", no_password).exit_code == 0
    monkeypatch.delenv("PGPASSWORD")
    pgpass = tmp_path / "pgpass"
    pgpass.write_text(f"127.0.0.1:{postgres.port}:*:optimlab:{postgres.password}\n")
    pgpass.chmod(0o600)
    monkeypatch.setenv("PGPASSFILE", str(pgpass))
    assert invoke("runs", "list", "--db", no_password).exit_code == 0
    monkeypatch.setenv("PGOPTIONS", "-csearch_path=optimlab")  # optimlab in its own schema of a shared database
    engine = sa.create_engine(postgres_url)
    with engine.begin() as conn:
        conn.execute(sa.text("CREATE SCHEMA optimlab"))
    engine.dispose()
    with Store(no_password) as store:
        assert store.schema_version == SCHEMA_VERSION
    with Store(f"{postgres_url}?options=-csearch_path%3Doptimlab", readonly=True) as store:
        assert store.runs() == []
    monkeypatch.delenv("PGOPTIONS")
    with Store(postgres_url, readonly=True) as store:  # the public schema's optimlab database is unchanged
        assert store.runs() == []


@pytest.mark.postgres
def test_the_password_is_never_printed_nor_stored(postgres, postgres_url, monkeypatch):
    secret = postgres.password
    args = ["bench", "--task", "quadratic", "--optimizers", "adam", "--trials", "1", "--seeds", "1", "--steps", "5",
            "--jobs", "1", "--db", postgres_url]
    monkeypatch.setattr("sys.argv", ["optimlab", *args])
    ran = invoke(*args)
    assert ran.exit_code == 0 and "postgresql+psycopg://optimlab:***@127.0.0.1" in ran.output
    listing = invoke("runs", "list", "--db", postgres_url)
    with Store(postgres_url, readonly=True) as store:
        (run,) = store.runs()
    assert "--db 'postgresql+psycopg://optimlab:***@127.0.0.1" in run["command"]
    for text in (ran.output, listing.output, run["command"]):
        assert secret not in text
