"""The bench lab's results database: runs, trials, per-step metrics, artifacts and work claims.

One schema and one code path (SQLAlchemy Core) for two backends:

* **SQLite** (the default): ``--db PATH``, one file on one machine, in WAL mode;
* **PostgreSQL**: ``--db postgresql+psycopg://user@host/dbname``, a server that worker processes on many
  machines share. Credentials come from the URL or libpq's ``PG*`` environment variables and ``~/.pgpass``.

A ``db`` string containing ``://`` is a SQLAlchemy URL and is handed to SQLAlchemy as is (e.g. a
Unix-socket URL ``postgresql+psycopg://user@/db?host=/run/postgresql``); anything else is an SQLite file
path. Messages name the database with :func:`describe`, which never shows a password.

The tables and their migrations are in :mod:`optimlab.bench.schema`.

Every write is one transaction (SQLite: ``BEGIN IMMEDIATE``, the file's single writer lock; PostgreSQL:
row locks, plus an advisory lock for migrations and run creation), so a process killed at any moment,
even by SIGKILL, leaves either a whole trial or nothing. Opening checks the database first (SQLite's
``quick_check``, the marker, the version) and raises :class:`StoreError` with a one-line message.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import json
import os
import socket
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event

from optimlab.bench.schema import (
    INTEGER_FIELDS,
    LEGACY_TABLES,
    MIGRATIONS,
    RESULT_TABLES,
    SCHEMA_VERSION,
    TRIAL_SUMMARY_FIELDS,
    artifacts_table,
    claims_table,
    meta_table,
    metrics_table,
    runs_table,
    trials_table,
)

__all__ = ["SCHEMA_VERSION", "MIGRATIONS", "TrialRecord", "Store", "StoreError", "DiskFullError", "ClaimLost",
           "Claim", "database_url", "describe"]

_ADVISORY_LOCK = 0x6F70746C  # PostgreSQL advisory lock key for migrations and run creation ("optl")


class StoreError(Exception):
    """A database that cannot be used: unreachable, unreadable, not optimlab's, too new, full. One line."""


class DiskFullError(StoreError):
    """A write failed because the disk (or the database server's disk) is full."""


class ClaimLost(Exception):
    """This worker's lease on a unit of work expired and another worker took the unit over."""


def database_url(db: str | Path) -> sa.URL:
    """``db`` as a SQLAlchemy URL: a string containing ``://`` as is, anything else an SQLite file path."""
    text = str(db)
    if "://" in text:
        try:
            return sa.make_url(text)
        except sa.exc.ArgumentError:
            raise StoreError(f"Invalid --db URL {_hide_password(text)!r} (accepted: an SQLite file path or a "
                             "SQLAlchemy URL such as postgresql+psycopg://user@host/dbname)") from None
    return sa.URL.create("sqlite", database=str(Path(text)))


def _hide_password(text: str) -> str:
    """``scheme://user:secret@host`` → ``scheme://user:***@host`` for a string that did not even parse."""
    head, sep, tail = text.partition("://")
    credentials, at, rest = tail.rpartition("@")
    if at and ":" in credentials:
        credentials = credentials.split(":", 1)[0] + ":***"
    return f"{head}{sep}{credentials}{at}{rest}" if at else text


def describe(db: str | Path) -> str:
    """How messages name a database: the file path, or the URL with its password hidden."""
    text = str(db)
    if "://" not in text:
        return text
    try:
        url = sa.make_url(text)
    except sa.exc.ArgumentError:
        return _hide_password(text)
    if "password" in url.query:  # libpq also takes ?password=...
        url = url.update_query_dict({"password": "***"})
    return url.render_as_string(hide_password=True)


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def _is_disk_full(error: BaseException) -> bool:
    original = getattr(error, "orig", error)
    if isinstance(original, OSError) and original.errno == errno.ENOSPC:
        return True
    return getattr(original, "sqlstate", None) == "53100" or "database or disk is full" in str(original)


def _first_line(error: BaseException) -> str:
    original = getattr(error, "orig", None) or error
    lines = [line.strip() for line in str(original).splitlines() if line.strip()]
    return lines[0] if lines else type(original).__name__


@dataclass
class TrialRecord:
    """Everything stored for one finished trial (the row, its per-step curve and its artifacts).

    ``curve`` holds ``(step, loss, metric or None, lr)`` tuples; ``artifacts`` maps a kind
    (``"trajectory"``, ``"final_point"``) to any JSON-serialisable value. ``grad_evals`` counts the
    gradient evaluations (forward + backward) of the trial, ``grad_evals_to_target`` those until the
    target was first met, ``d_estimate`` is the step size a learning-rate-free optimizer ended with.
    """

    task: str
    optimizer: str
    schedule: str
    clip: str
    phase: str
    trial_index: int
    seed: int
    params: dict[str, Any]
    status: str
    steps: int
    final_loss: float | None
    best_loss: float | None
    final_metric: float | None
    best_metric: float | None
    steps_to_target: int | None
    time_to_target: float | None
    ms_per_step: float | None
    state_bytes_per_param: float | None
    wall_time: float
    curve: list[tuple[int, float | None, float | None, float | None]] = field(default_factory=list)
    artifacts: dict[str, Any] = field(default_factory=dict)
    grad_evals: int | None = None
    grad_evals_to_target: int | None = None
    d_estimate: float | None = None

    def summary(self) -> dict[str, Any]:
        """The row's values without the curve and artifacts."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("curve", "artifacts")}


@dataclass(frozen=True)
class Claim:
    """A unit of work this worker holds: a study's tuning (``unit='tune'``) or one final rerun."""

    id: int
    run_id: int
    task: str
    optimizer: str
    schedule: str
    clip: str
    unit: str
    unit_index: int
    owner: str
    takeover: bool


def _finite_or_none(value: float | None) -> float | None:
    """NaN and ±inf are stored as NULL (SQLite turns NaN into NULL anyway; the same on both backends)."""
    if value is None or value != value or value in (float("inf"), float("-inf")):
        return None
    return float(value)


class Row(tuple):
    """A result row readable by position or by column name (like ``sqlite3.Row``)."""

    _index: dict[str, int]

    def __new__(cls, values: Sequence[Any], keys: Sequence[str]) -> Row:
        row = super().__new__(cls, values)
        row._index = {key: i for i, key in enumerate(keys)}
        return row

    def __getitem__(self, key: Any) -> Any:  # type: ignore[override]
        return super().__getitem__(self._index[key] if isinstance(key, str) else key)

    def keys(self) -> list[str]:
        """The column names."""
        return list(self._index)


def worker_name() -> str:
    """This process as a claim owner: ``host:pid``."""
    return f"{socket.gethostname()}:{os.getpid()}"


def _dead_on_this_host(owner: str) -> bool:
    """True when ``owner`` (``host:pid``) names a process of this machine that has died."""
    host, _, pid = owner.rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    try:  # Linux: a killed process its parent has not reaped yet is a zombie, dead all the same
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return False


class Store:
    """A connection to a bench database; checks it, and creates and migrates it unless ``readonly``.

    Args:
        db: an SQLite file path (created with its parent folder if missing) or a SQLAlchemy URL.
        readonly: open without writing anything (for ``runs``, ``report``, ``recommend``): the database must
            exist; an older schema is read as it is.
        timeout: seconds to wait for another process's write lock (SQLite) or for the server (PostgreSQL).
        check: run SQLite's ``quick_check`` on open (reads the whole file once).

    Raises:
        StoreError: with a one-line message naming the database (never its password).
    """

    def __init__(self, db: str | Path, *, readonly: bool = False, timeout: float = 60.0, check: bool = True) -> None:
        self.url = database_url(db)
        self.name = describe(db)
        self.readonly = readonly
        self.dialect = self.url.get_backend_name()
        if self.dialect not in ("sqlite", "postgresql"):
            raise StoreError(f"cannot open {self.name}: unsupported database {self.dialect!r} (accepted: an SQLite "
                             "file path or URL, or postgresql+psycopg://user@host/dbname)")
        self.path = Path(self.url.database) if self.dialect == "sqlite" and self.url.database else None
        self._engine = self._create_engine(timeout)
        try:
            self._open(check)
        except BaseException:
            self._engine.dispose()
            raise

    # -- opening -----------------------------------------------------------------------------------------
    def _create_engine(self, timeout: float) -> sa.Engine:
        url, connect_args = self.url, {}
        if self.dialect == "sqlite" and self.path is not None:
            self._check_sqlite_path()
            if self.readonly:
                url = url.set(database=f"file:{self.path}?mode=ro", query={"uri": "true"})
            connect_args = {"timeout": timeout, "check_same_thread": False}
        elif self.dialect == "postgresql":
            connect_args = {"connect_timeout": max(1, int(min(timeout, 30)))}
        try:
            engine = sa.create_engine(url, connect_args=connect_args)
        except ImportError as err:
            hint = " (pip install 'optimlab[postgres]')" if self.dialect == "postgresql" else ""
            raise StoreError(f"cannot open {self.name}: its database driver is not installed: {err}{hint}") from None
        except (sa.exc.ArgumentError, sa.exc.NoSuchModuleError) as err:
            raise StoreError(f"cannot open {self.name}: {_first_line(err)} (accepted: an SQLite file path or a "
                             "SQLAlchemy URL such as postgresql+psycopg://user@host/dbname)") from None
        if self.dialect == "sqlite":
            event.listen(engine, "connect", self._sqlite_connect)
            event.listen(engine, "begin", self._sqlite_begin)
        elif self.dialect == "postgresql" and self.readonly:
            event.listen(engine, "connect", self._postgresql_readonly)
        return engine

    def _check_sqlite_path(self) -> None:
        path = self.path
        assert path is not None
        if path.is_dir():
            raise StoreError(f"cannot open {self.name}: it is a directory (pass a database file path)")
        if self.readonly:
            if not path.exists():
                raise StoreError(f"no database at {self.name} (run `optimlab bench` first, or pass --db PATH)")
            return
        folder = path.parent
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise StoreError(f"cannot create the folder of {self.name}: {err.strerror}") from None
        if not os.access(folder, os.W_OK | os.X_OK) or (path.exists() and not os.access(path, os.W_OK)):
            raise StoreError(f"cannot write to {self.name}: read-only "
                             f"{'file' if path.exists() and not os.access(path, os.W_OK) else 'folder'}")

    @staticmethod
    def _sqlite_connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None  # transactions are begun by _sqlite_begin
        dbapi_connection.execute("PRAGMA foreign_keys = ON")
        dbapi_connection.execute("PRAGMA synchronous = NORMAL")

    @staticmethod
    def _sqlite_begin(conn: sa.Connection) -> None:
        writing = conn.get_execution_options().get("optimlab_write", False)
        conn.exec_driver_sql("BEGIN IMMEDIATE" if writing else "BEGIN")

    @staticmethod
    def _postgresql_readonly(dbapi_connection: Any, _record: Any) -> None:
        with dbapi_connection.cursor() as cursor:
            cursor.execute("SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY")
        dbapi_connection.commit()

    def _open(self, check: bool) -> None:
        try:
            with self._engine.connect() as conn:
                if self.dialect == "sqlite" and check:
                    verdict = [row[0] for row in conn.exec_driver_sql("PRAGMA quick_check").fetchall()]
                    if verdict != ["ok"]:
                        raise StoreError(f"{self.name} is damaged (SQLite quick_check: {verdict[0]}); restore it "
                                         "from a copy or start a new database")
                version = self._version_or_fail(conn)
        except sa.exc.DBAPIError as err:
            raise self._error("cannot open", err) from None
        if self.readonly:
            if version == 0:
                raise StoreError(f"{self.name} holds no optimlab database yet (run `optimlab bench --db ...` "
                                 "first)")
            return
        if self.dialect == "sqlite":
            self._set_wal()
        if version < SCHEMA_VERSION:
            self.migrate()

    def _error(self, doing: str, err: BaseException) -> StoreError:
        reason = _first_line(err)
        if "file is not a database" in reason:
            return StoreError(f"{self.name} is not an optimlab database (not an SQLite file: {reason})")
        if "malformed" in reason:
            return StoreError(f"{self.name} is damaged ({reason}); restore it from a copy or start a new database")
        if _is_disk_full(err):
            return DiskFullError(f"cannot write to {self.name}: no space left on device")
        for secret in (self.url.password, self.url.query.get("password")):
            if isinstance(secret, str) and secret:
                reason = reason.replace(secret, "***")
        return StoreError(f"{doing} {self.name}: {reason}")

    def _set_wal(self) -> None:
        with self._engine.connect() as conn:
            raw = conn.connection.dbapi_connection
            assert raw is not None
            mode = raw.execute("PRAGMA journal_mode").fetchone()[0]
            if mode != "wal":
                raw.execute("PRAGMA journal_mode = WAL")

    def _table_names(self, conn: sa.Connection) -> set[str]:
        return set(sa.inspect(conn).get_table_names())

    def _read_version(self, conn: sa.Connection) -> int | None:
        """The schema version: 0 for an empty database, ``None`` for one that is not optimlab's."""
        names = self._table_names(conn)
        if meta_table.name in names:
            meta = dict(conn.execute(sa.select(meta_table.c.key, meta_table.c.value)).all())
            if meta.get("application") != "optimlab" or not str(meta.get("schema_version", "")).isdigit():
                return None
            return int(meta["schema_version"])
        if not names:
            return 0
        if self.dialect == "sqlite" and LEGACY_TABLES <= names:  # versions 1-2 carried no marker
            version = int(conn.exec_driver_sql("PRAGMA user_version").scalar() or 0)
            if version in (1, 2):
                return version
        return None

    def _version_or_fail(self, conn: sa.Connection) -> int:
        version = self._read_version(conn)
        if version is None:
            names = sorted(self._table_names(conn))
            shown = ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")
            raise StoreError(f"{self.name} is not an optimlab database (it has tables {shown} but no optimlab "
                             "marker); pass a new file or an optimlab database")
        if version > SCHEMA_VERSION:
            raise StoreError(f"{self.name} has optimlab schema version {version}, newer than this optimlab's "
                             f"{SCHEMA_VERSION}: upgrade optimlab to use it")
        return version

    # -- plumbing --------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def transaction(self, *, lock: bool = False) -> Iterator[sa.Connection]:
        """A write transaction (SQLite ``BEGIN IMMEDIATE``); ``lock`` also takes PostgreSQL's advisory lock,
        which serialises migrations and run creation. Any exception rolls everything back; a full disk
        raises :class:`DiskFullError`."""
        if self.readonly:
            raise StoreError(f"{self.name} was opened read-only")
        try:
            with self._engine.connect() as conn:
                conn.execution_options(optimlab_write=True)
                with conn.begin():
                    if lock and self.dialect == "postgresql":
                        conn.execute(sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": _ADVISORY_LOCK})
                    yield conn
        except sa.exc.DBAPIError as err:
            if _is_disk_full(err):
                raise DiskFullError(f"cannot write to {self.name}: no space left on device") from err
            raise
        except OSError as err:
            if _is_disk_full(err):
                raise DiskFullError(f"cannot write to {self.name}: no space left on device") from err
            raise

    @contextlib.contextmanager
    def _reading(self) -> Iterator[sa.Connection]:
        with self._engine.connect() as conn:
            yield conn

    @property
    def schema_version(self) -> int:
        """The schema version of the open database."""
        with self._reading() as conn:
            return self._version_or_fail(conn)

    def migrate(self, target: int = SCHEMA_VERSION) -> None:
        """Apply migrations up to ``target`` in one locked transaction (safe against concurrent openers)."""
        if not (0 <= target <= SCHEMA_VERSION):
            raise ValueError(f"Invalid target schema version: {target} (accepted range: 0..{SCHEMA_VERSION})")
        try:
            with self.transaction(lock=True) as conn:
                version = self._version_or_fail(conn)  # again, under the lock
                for step in range(version, target):
                    MIGRATIONS[step](conn)
                if target > version:
                    if target >= 3:
                        conn.execute(sa.update(meta_table).where(meta_table.c.key == "schema_version")
                                     .values(value=str(target)))
                    if self.dialect == "sqlite":
                        conn.exec_driver_sql(f"PRAGMA user_version = {target}")
        except sa.exc.DBAPIError as err:
            raise self._error("cannot create the tables in", err) from None

    def close(self) -> None:
        """Close every connection."""
        self._engine.dispose()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _clock_sql(self) -> sa.ColumnElement[float]:
        """Seconds since the epoch on the database's clock, as an SQL expression (the server's, for
        PostgreSQL: one clock for every machine's leases; SQLite's machine is this one)."""
        if self.dialect == "postgresql":
            return sa.cast(sa.func.extract("epoch", sa.func.clock_timestamp()), sa.Double)
        return sa.literal(time.time(), sa.Double)

    def _clock(self, conn: sa.Connection) -> float:
        return float(conn.execute(sa.select(self._clock_sql())).scalar_one())

    # -- runs ------------------------------------------------------------------------------------------
    def create_run(self, key: str, config: dict[str, Any], command: str = "") -> int:
        """Insert a new run with status ``running``; returns its id."""
        with self.transaction(lock=True) as conn:
            return self._insert_run(conn, key, config, command)

    @staticmethod
    def _insert_run(conn: sa.Connection, key: str, config: dict[str, Any], command: str) -> int:
        result = conn.execute(sa.insert(runs_table).values(
            key=key, status="running", config=json.dumps(config, sort_keys=True), command=command, created_at=_now()))
        return int(result.inserted_primary_key[0])

    def open_run(self, key: str, config: dict[str, Any], command: str, units: Sequence[tuple[str, ...]],
                 new: bool = False) -> tuple[int, bool]:
        """Find the latest run with ``key`` (or create one when there is none or ``new``), mark it running
        and make sure it has a claim row for every unit ``(task, optimizer, schedule, clip, unit,
        unit_index)``. One locked transaction, so workers started together agree on one run.
        Returns ``(run_id, resumed)``."""
        with self.transaction(lock=True) as conn:
            row = None if new else conn.execute(
                sa.select(runs_table.c.id).where(runs_table.c.key == key).order_by(runs_table.c.id.desc()).limit(1)
            ).first()
            if row is None:
                run_id, resumed = self._insert_run(conn, key, config, command), False
            else:
                run_id, resumed = int(row[0]), True
                conn.execute(sa.update(runs_table).where(runs_table.c.id == run_id, runs_table.c.status != "running")
                             .values(status="running", finished_at=None))
            c = claims_table.c
            existing = {tuple(r) for r in conn.execute(
                sa.select(c.task, c.optimizer, c.schedule, c.clip, c.unit, c.unit_index).where(c.run_id == run_id))}
            missing = [dict(zip(("task", "optimizer", "schedule", "clip", "unit", "unit_index"), unit), run_id=run_id)
                       for unit in units if tuple(unit) not in existing]
            if missing:
                conn.execute(sa.insert(claims_table), missing)
        return run_id, resumed

    def latest_run_with_key(self, key: str) -> dict[str, Any] | None:
        """The most recent run created with configuration ``key``, or ``None``."""
        with self._reading() as conn:
            row = conn.execute(sa.select(runs_table).where(runs_table.c.key == key)
                               .order_by(runs_table.c.id.desc()).limit(1)).first()
        return self._run_dict(row._mapping) if row else None

    def set_run_status(self, run_id: int, status: str) -> None:
        """Set a run's status (``running``, ``interrupted``, ``complete``); ``complete`` stamps ``finished_at``."""
        if status not in ("running", "interrupted", "complete"):
            raise ValueError(f"Invalid status: {status!r} (accepted: 'running', 'interrupted', 'complete')")
        with self.transaction() as conn:
            conn.execute(sa.update(runs_table).where(runs_table.c.id == run_id).values(
                status=status, finished_at=_now() if status == "complete" else None))

    @staticmethod
    def _run_dict(row: Mapping[str, Any]) -> dict[str, Any]:
        run = dict(row)
        run["config"] = json.loads(run["config"])
        return run

    def runs(self) -> list[dict[str, Any]]:
        """All runs, newest first, each with its trial counts (``n_trials``, ``n_diverged``)."""
        t = trials_table.c
        counts = (sa.select(t.run_id, sa.func.count().label("n_trials"),
                            sa.func.sum(sa.case((t.status == "diverged", 1), else_=0)).label("n_diverged"))
                  .group_by(t.run_id).subquery())
        query = (sa.select(runs_table, sa.func.coalesce(counts.c.n_trials, 0).label("n_trials"),
                           sa.func.coalesce(counts.c.n_diverged, 0).label("n_diverged"))
                 .outerjoin(counts, counts.c.run_id == runs_table.c.id).order_by(runs_table.c.id.desc()))
        with self._reading() as conn:
            rows = conn.execute(query).all()
        return [self._run_dict(row._mapping) for row in rows]

    def get_run(self, run_id: int | str) -> dict[str, Any]:
        """The run with id ``run_id``; ``"latest"`` is the newest run. Unknown ids raise ``KeyError``."""
        with self._reading() as conn:
            if isinstance(run_id, str) and run_id.lower() == "latest":
                row = conn.execute(sa.select(runs_table).order_by(runs_table.c.id.desc()).limit(1)).first()
                if row is None:
                    raise KeyError(f"No runs in {self.name}")
                return self._run_dict(row._mapping)
            try:
                number = int(run_id)
            except ValueError:
                raise ValueError(f"Invalid run id: {run_id!r} (accepted: an integer id or 'latest')") from None
            row = conn.execute(sa.select(runs_table).where(runs_table.c.id == number)).first()
            if row is None:
                known = [str(r[0]) for r in conn.execute(sa.select(runs_table.c.id).order_by(runs_table.c.id))]
                raise KeyError(f"Unknown run {number} in {self.name}. Known runs: {', '.join(known) or 'none'}")
        return self._run_dict(row._mapping)

    # -- trials ----------------------------------------------------------------------------------------
    def add_trial(self, run_id: int, record: TrialRecord, *, claim: Claim | None = None, lease: float = 0.0,
                  finish: bool = False) -> int:
        """Write a trial, its curve and its artifacts atomically; returns the trial id.

        With ``claim``, the same transaction first checks that this worker still holds it (renewing its
        lease by ``lease`` seconds; :class:`ClaimLost` otherwise, and nothing is written) and, with
        ``finish``, marks the unit done.
        """
        row = record.summary()
        values = {name: row[name] if name in INTEGER_FIELDS else _finite_or_none(row[name])
                  for name in TRIAL_SUMMARY_FIELDS}
        with self.transaction() as conn:
            if claim is not None:
                self._renew(conn, claim, lease, finish)
            result = conn.execute(sa.insert(trials_table).values(
                run_id=run_id, task=row["task"], optimizer=row["optimizer"], schedule=row["schedule"],
                clip=row["clip"], phase=row["phase"], trial_index=row["trial_index"], seed=row["seed"],
                params=json.dumps(row["params"], sort_keys=True), status=row["status"], created_at=_now(), **values))
            trial_id = int(result.inserted_primary_key[0])
            rows = [{"trial_id": trial_id, "step": step, "loss": _finite_or_none(loss),
                     "metric": _finite_or_none(metric), "lr": _finite_or_none(lr)}
                    for step, loss, metric, lr in record.curve]
            if rows:  # executemany: SQLite's own loop; psycopg's pipeline (one round trip)
                conn.execute(sa.insert(metrics_table), rows)
            if record.artifacts:
                conn.execute(sa.insert(artifacts_table), [
                    {"trial_id": trial_id, "kind": kind, "data": json.dumps(value)}
                    for kind, value in record.artifacts.items()])
        return trial_id

    def trials(self, run_id: int, *, task: str | None = None, optimizer: str | None = None,
               schedule: str | None = None, clip: str | None = None, phase: str | None = None) -> list[dict[str, Any]]:
        """A run's trials (optionally filtered), ordered by task, optimizer, schedule, clip, phase, index."""
        t = trials_table.c
        query = sa.select(*self._trial_columns()).where(t.run_id == run_id)
        for column, value in ((t.task, task), (t.optimizer, optimizer), (t.schedule, schedule), (t.clip, clip),
                              (t.phase, phase)):
            if value is not None:
                query = query.where(column == value)
        query = query.order_by(t.task, t.optimizer, t.schedule, t.clip, t.phase.desc(), t.trial_index)
        with self._reading() as conn:
            return [self._trial_dict(row._mapping) for row in conn.execute(query)]

    def _trial_columns(self) -> list[sa.Column[Any]]:
        """The ``trials`` columns this database has: all of them, except in an older one opened read-only
        (its rows then lack the newer keys, e.g. ``grad_evals`` before schema version 4)."""
        if self.readonly and self.schema_version < SCHEMA_VERSION:
            with self._reading() as conn:
                present = {column["name"] for column in sa.inspect(conn).get_columns(trials_table.name)}
            return [column for column in trials_table.c if column.name in present]
        return list(trials_table.c)

    @staticmethod
    def _trial_dict(row: Mapping[str, Any]) -> dict[str, Any]:
        trial = dict(row)
        trial["params"] = json.loads(trial["params"])
        return trial

    def final_trials_for_task(self, task: str) -> list[dict[str, Any]]:
        """Final-phase trials of ``task`` across every run (for recommendations)."""
        t = trials_table.c
        query = (sa.select(*self._trial_columns()).where(t.task == task, t.phase == "final")
                 .order_by(t.run_id, t.optimizer, t.trial_index))
        with self._reading() as conn:
            return [self._trial_dict(row._mapping) for row in conn.execute(query)]

    def curve(self, trial_id: int) -> list[tuple[int, float | None, float | None, float | None]]:
        """``(step, loss, metric, lr)`` rows of a trial, by step."""
        m = metrics_table.c
        with self._reading() as conn:
            rows = conn.execute(sa.select(m.step, m.loss, m.metric, m.lr).where(m.trial_id == trial_id)
                                .order_by(m.step)).all()
        return [tuple(row) for row in rows]

    def artifact(self, trial_id: int, kind: str) -> Any:
        """The artifact of ``kind`` attached to a trial, or ``None``."""
        a = artifacts_table.c
        with self._reading() as conn:
            data = conn.execute(sa.select(a.data).where(a.trial_id == trial_id, a.kind == kind)).scalar()
        return json.loads(data) if data is not None else None

    def count(self, table: str) -> int:
        """Number of rows in one of the schema's result tables."""
        tables = {t.name: t for t in RESULT_TABLES}
        if table not in tables:
            raise ValueError(f"Invalid table: {table!r} (accepted: runs, trials, metrics, artifacts)")
        with self._reading() as conn:
            return int(conn.execute(sa.select(sa.func.count()).select_from(tables[table])).scalar_one())

    def execute(self, sql: str, parameters: Sequence[Any] = ()) -> list[Row]:
        """Run a query in the driver's own SQL (``?`` parameters on SQLite, ``%s`` on PostgreSQL) and
        return its rows, readable by position and by name (for ad-hoc inspection and tests)."""
        with self._reading() as conn:
            result = conn.exec_driver_sql(sql, tuple(parameters))
            keys = list(result.keys())
            return [Row(row, keys) for row in result.all()]

    # -- claims ------------------------------------------------------------------------------------------
    def claim(self, run_id: int, owner: str, lease: float) -> Claim | None:
        """Take the first open unit of ``run_id`` that nobody holds (or whose lease expired, or whose owner
        died on this machine) and whose prerequisites are done (a final rerun needs its study's tuning);
        ``None`` when there is none right now. PostgreSQL: ``SELECT ... FOR UPDATE SKIP LOCKED``;
        SQLite: inside ``BEGIN IMMEDIATE``."""
        c = claims_table.c
        with self.transaction() as conn:
            now = self._clock(conn)
            held = conn.execute(sa.select(c.owner).distinct().where(
                c.run_id == run_id, c.status == "open", c.owner.is_not(None), c.lease_until >= now)).scalars()
            dead = [name for name in held if _dead_on_this_host(name)]
            tune = claims_table.alias("tune")
            tuned = sa.exists().where(tune.c.run_id == c.run_id, tune.c.task == c.task,
                                      tune.c.optimizer == c.optimizer, tune.c.schedule == c.schedule,
                                      tune.c.clip == c.clip, tune.c.unit == "tune", tune.c.status == "done")
            free = sa.or_(c.owner.is_(None), c.lease_until < now, c.owner.in_(dead)) if dead else \
                sa.or_(c.owner.is_(None), c.lease_until < now)
            row = conn.execute(
                sa.select(claims_table).where(c.run_id == run_id, c.status == "open", free,
                                              sa.or_(c.unit == "tune", tuned))
                .order_by(c.id).limit(1).with_for_update(skip_locked=True, of=claims_table)
            ).first()
            if row is None:
                return None
            takeover = row.owner is not None
            conn.execute(sa.update(claims_table).where(c.id == row.id).values(
                owner=owner, lease_until=now + lease, takeovers=c.takeovers + int(takeover)))
            conn.execute(sa.update(runs_table).where(runs_table.c.id == run_id, runs_table.c.status != "running")
                         .values(status="running", finished_at=None))
        return Claim(id=row.id, run_id=run_id, task=row.task, optimizer=row.optimizer, schedule=row.schedule,
                     clip=row.clip, unit=row.unit, unit_index=row.unit_index, owner=owner, takeover=takeover)

    def _renew(self, conn: sa.Connection, claim: Claim, lease: float, finish: bool = False) -> None:
        c = claims_table.c
        values: dict[str, Any] = {"lease_until": self._clock_sql() + lease}
        if finish:
            values = {"status": "done", "lease_until": None}
        result = conn.execute(sa.update(claims_table).where(c.id == claim.id, c.owner == claim.owner,
                                                            c.status == "open").values(**values))
        if result.rowcount != 1:
            raise ClaimLost(f"{claim.owner} lost its claim on {claim.task}/{claim.optimizer} {claim.unit} "
                            f"{claim.unit_index} to another worker")

    def heartbeat(self, claim: Claim, lease: float) -> None:
        """Push the claim's lease ``lease`` seconds past now; :class:`ClaimLost` if another worker has it."""
        with self.transaction() as conn:
            self._renew(conn, claim, lease)

    def finish(self, claim: Claim) -> None:
        """Mark the claimed unit done; :class:`ClaimLost` if another worker has it."""
        with self.transaction() as conn:
            self._renew(conn, claim, 0.0, finish=True)

    def release(self, claim: Claim) -> None:
        """Give the claim back (when stopping early), so another worker can take it at once."""
        c = claims_table.c
        with self.transaction() as conn:
            conn.execute(sa.update(claims_table).where(c.id == claim.id, c.owner == claim.owner, c.status == "open")
                         .values(owner=None, lease_until=None))

    def units_left(self, run_id: int) -> tuple[int, int]:
        """``(open units, of which held by a live lease)`` of a run."""
        c = claims_table.c
        with self._reading() as conn:
            now = self._clock(conn)
            row = conn.execute(sa.select(sa.func.count(), sa.func.sum(sa.case((c.lease_until >= now, 1), else_=0)))
                               .where(c.run_id == run_id, c.status == "open")).one()
        return int(row[0]), int(row[1] or 0)

    def claims(self, run_id: int) -> list[dict[str, Any]]:
        """Every claim row of a run (for inspection and tests)."""
        with self._reading() as conn:
            return [dict(row._mapping) for row in conn.execute(
                sa.select(claims_table).where(claims_table.c.run_id == run_id).order_by(claims_table.c.id))]
