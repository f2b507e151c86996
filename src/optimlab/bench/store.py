"""The bench lab's SQLite store: runs, trials, per-step metrics and artifacts in one file.

Schema (version :data:`SCHEMA_VERSION`, kept in ``PRAGMA user_version``):

* ``runs``: one bench invocation: a ``key`` (hash of its configuration, so rerunning the same command
  finds it and resumes), its JSON ``config`` (which also carries each task's metric, mode and target, so
  a report needs nothing but the store), ``status`` (``running``, ``interrupted``, ``complete``).
* ``trials``: one training run of one configuration: task × optimizer × schedule × clipping, ``phase``
  (``tune`` or ``final``), ``trial_index``, ``seed``, the hyperparameters (JSON), ``status``
  (``complete`` or ``diverged``) and the summary metrics. ``UNIQUE(run_id, task, optimizer, schedule,
  clip, phase, trial_index)`` makes a duplicate impossible.
* ``metrics``: per step: training loss, the task metric where evaluated, the learning rate.
* ``artifacts``: JSON blobs attached to a trial (2-D trajectories, final parameters).

A trial and all its rows are written in one ``BEGIN IMMEDIATE`` transaction, so a process killed at any
moment (even by SIGKILL) leaves either the whole trial or nothing. The database runs in WAL mode with a
busy timeout, so several bench worker processes can write to it at once.

Migrations are a list of SQL scripts; opening a store applies the missing ones in order, each in a
transaction that also bumps ``user_version``.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import sqlite3
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["SCHEMA_VERSION", "MIGRATIONS", "TrialRecord", "Store"]

MIGRATIONS: list[str] = [
    # 1: the initial schema
    """
    CREATE TABLE runs (
        id INTEGER PRIMARY KEY,
        key TEXT NOT NULL,
        status TEXT NOT NULL,
        config TEXT NOT NULL,
        command TEXT NOT NULL DEFAULT '',
        created_at TEXT NOT NULL,
        finished_at TEXT
    );
    CREATE TABLE trials (
        id INTEGER PRIMARY KEY,
        run_id INTEGER NOT NULL REFERENCES runs(id) ON DELETE CASCADE,
        task TEXT NOT NULL,
        optimizer TEXT NOT NULL,
        schedule TEXT NOT NULL,
        clip TEXT NOT NULL,
        phase TEXT NOT NULL CHECK (phase IN ('tune', 'final')),
        trial_index INTEGER NOT NULL,
        seed INTEGER NOT NULL,
        params TEXT NOT NULL,
        status TEXT NOT NULL CHECK (status IN ('complete', 'diverged')),
        steps INTEGER NOT NULL,
        final_loss REAL,
        best_loss REAL,
        final_metric REAL,
        best_metric REAL,
        steps_to_target INTEGER,
        time_to_target REAL,
        ms_per_step REAL,
        state_bytes_per_param REAL,
        wall_time REAL NOT NULL,
        created_at TEXT NOT NULL,
        UNIQUE (run_id, task, optimizer, schedule, clip, phase, trial_index)
    );
    CREATE TABLE metrics (
        trial_id INTEGER NOT NULL REFERENCES trials(id) ON DELETE CASCADE,
        step INTEGER NOT NULL,
        loss REAL,
        metric REAL,
        lr REAL,
        PRIMARY KEY (trial_id, step)
    ) WITHOUT ROWID;
    CREATE TABLE artifacts (
        id INTEGER PRIMARY KEY,
        trial_id INTEGER NOT NULL REFERENCES trials(id) ON DELETE CASCADE,
        kind TEXT NOT NULL,
        data TEXT NOT NULL,
        UNIQUE (trial_id, kind)
    );
    CREATE INDEX runs_by_key ON runs(key);
    """,
    # 2: `optimlab recommend` looks trials up by task across runs
    """
    CREATE INDEX trials_by_task ON trials(task, phase, status);
    """,
]
SCHEMA_VERSION = len(MIGRATIONS)

TRIAL_SUMMARY_FIELDS = (
    "steps", "final_loss", "best_loss", "final_metric", "best_metric", "steps_to_target", "time_to_target",
    "ms_per_step", "state_bytes_per_param", "wall_time",
)


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


@dataclass
class TrialRecord:
    """Everything stored for one finished trial (the row, its per-step curve and its artifacts).

    ``curve`` holds ``(step, loss, metric or None, lr)`` tuples; ``artifacts`` maps a kind
    (``"trajectory"``, ``"final_point"``) to any JSON-serialisable value.
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

    def summary(self) -> dict[str, Any]:
        """The row's values without the curve and artifacts."""
        row = asdict(self)
        row.pop("curve")
        row.pop("artifacts")
        return row


def _finite_or_none(value: float | None) -> float | None:
    """SQLite stores NaN as NULL anyway; make that explicit, and keep +-inf out of REAL columns."""
    if value is None or value != value or value in (float("inf"), float("-inf")):
        return None
    return float(value)


class Store:
    """A connection to a bench database; creates and migrates it on open.

    Args:
        path: the SQLite file (created with its parent folder if missing).
        timeout: seconds to wait for another process's write lock.
    """

    def __init__(self, path: str | Path, timeout: float = 60.0) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._conn = sqlite3.connect(self.path, timeout=timeout, isolation_level=None)
        self._conn.row_factory = sqlite3.Row
        self._conn.execute("PRAGMA foreign_keys = ON")
        self._conn.execute("PRAGMA journal_mode = WAL")
        self._conn.execute("PRAGMA synchronous = NORMAL")
        self.migrate()

    # -- plumbing --------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """``BEGIN IMMEDIATE`` ... ``COMMIT``; any exception rolls everything back."""
        self._conn.execute("BEGIN IMMEDIATE")
        try:
            yield self._conn
        except BaseException:
            self._conn.execute("ROLLBACK")
            raise
        self._conn.execute("COMMIT")

    @property
    def schema_version(self) -> int:
        """The schema version of the open database."""
        return int(self._conn.execute("PRAGMA user_version").fetchone()[0])

    def migrate(self, target: int = SCHEMA_VERSION) -> None:
        """Apply migrations up to ``target`` (each in its own transaction; safe against concurrent openers)."""
        if not (0 <= target <= SCHEMA_VERSION):
            raise ValueError(f"Invalid target schema version: {target} (accepted range: 0..{SCHEMA_VERSION})")
        while self.schema_version < target:
            with self.transaction() as conn:
                version = int(conn.execute("PRAGMA user_version").fetchone()[0])
                if version >= target:
                    break
                for statement in MIGRATIONS[version].split(";"):
                    if statement.strip():
                        conn.execute(statement)
                conn.execute(f"PRAGMA user_version = {version + 1}")
        if self.schema_version > SCHEMA_VERSION:
            raise RuntimeError(
                f"{self.path} has schema version {self.schema_version}, newer than this optimlab's {SCHEMA_VERSION}"
            )

    def close(self) -> None:
        """Close the connection."""
        self._conn.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- runs ------------------------------------------------------------------------------------------
    def create_run(self, key: str, config: dict[str, Any], command: str = "") -> int:
        """Insert a new run with status ``running``; returns its id."""
        with self.transaction() as conn:
            cursor = conn.execute(
                "INSERT INTO runs (key, status, config, command, created_at) VALUES (?, 'running', ?, ?, ?)",
                (key, json.dumps(config, sort_keys=True), command, _now()),
            )
            return int(cursor.lastrowid)

    def latest_run_with_key(self, key: str) -> dict[str, Any] | None:
        """The most recent run created with configuration ``key``, or ``None``."""
        row = self._conn.execute("SELECT * FROM runs WHERE key = ? ORDER BY id DESC LIMIT 1", (key,)).fetchone()
        return self._run_dict(row) if row else None

    def set_run_status(self, run_id: int, status: str) -> None:
        """Set a run's status (``running``, ``interrupted``, ``complete``); ``complete`` stamps ``finished_at``."""
        if status not in ("running", "interrupted", "complete"):
            raise ValueError(f"Invalid status: {status!r} (accepted: 'running', 'interrupted', 'complete')")
        with self.transaction() as conn:
            conn.execute(
                "UPDATE runs SET status = ?, finished_at = ? WHERE id = ?",
                (status, _now() if status == "complete" else None, run_id),
            )

    @staticmethod
    def _run_dict(row: sqlite3.Row) -> dict[str, Any]:
        run = dict(row)
        run["config"] = json.loads(run["config"])
        return run

    def runs(self) -> list[dict[str, Any]]:
        """All runs, newest first, each with its trial counts (``n_trials``, ``n_diverged``)."""
        rows = self._conn.execute(
            """SELECT runs.*, COUNT(trials.id) AS n_trials,
                      COALESCE(SUM(trials.status = 'diverged'), 0) AS n_diverged
               FROM runs LEFT JOIN trials ON trials.run_id = runs.id
               GROUP BY runs.id ORDER BY runs.id DESC"""
        ).fetchall()
        return [self._run_dict(row) for row in rows]

    def get_run(self, run_id: int | str) -> dict[str, Any]:
        """The run with id ``run_id``; ``"latest"`` is the newest run. Unknown ids raise ``KeyError``."""
        if isinstance(run_id, str) and run_id.lower() == "latest":
            row = self._conn.execute("SELECT * FROM runs ORDER BY id DESC LIMIT 1").fetchone()
            if row is None:
                raise KeyError(f"No runs in {self.path}")
            return self._run_dict(row)
        try:
            number = int(run_id)
        except ValueError:
            raise ValueError(f"Invalid run id: {run_id!r} (accepted: an integer id or 'latest')") from None
        row = self._conn.execute("SELECT * FROM runs WHERE id = ?", (number,)).fetchone()
        if row is None:
            known = [str(r[0]) for r in self._conn.execute("SELECT id FROM runs ORDER BY id")]
            raise KeyError(f"Unknown run {number} in {self.path}. Known runs: {', '.join(known) or 'none'}")
        return self._run_dict(row)

    # -- trials ----------------------------------------------------------------------------------------
    def add_trial(self, run_id: int, record: TrialRecord) -> int:
        """Write a trial, its curve and its artifacts atomically; returns the trial id."""
        row = record.summary()
        with self.transaction() as conn:
            cursor = conn.execute(
                f"""INSERT INTO trials (run_id, task, optimizer, schedule, clip, phase, trial_index, seed, params,
                        status, {', '.join(TRIAL_SUMMARY_FIELDS)}, created_at)
                    VALUES ({', '.join('?' * (11 + len(TRIAL_SUMMARY_FIELDS)))})""",
                (
                    run_id, row["task"], row["optimizer"], row["schedule"], row["clip"], row["phase"],
                    row["trial_index"], row["seed"], json.dumps(row["params"], sort_keys=True), row["status"],
                    *(row[name] if name in ("steps", "steps_to_target") else _finite_or_none(row[name])
                      for name in TRIAL_SUMMARY_FIELDS),
                    _now(),
                ),
            )
            trial_id = int(cursor.lastrowid)
            conn.executemany(
                "INSERT INTO metrics (trial_id, step, loss, metric, lr) VALUES (?, ?, ?, ?, ?)",
                [(trial_id, step, _finite_or_none(loss), _finite_or_none(metric), _finite_or_none(lr))
                 for step, loss, metric, lr in record.curve],
            )
            conn.executemany(
                "INSERT INTO artifacts (trial_id, kind, data) VALUES (?, ?, ?)",
                [(trial_id, kind, json.dumps(value)) for kind, value in record.artifacts.items()],
            )
        return trial_id

    def trials(self, run_id: int, *, task: str | None = None, optimizer: str | None = None,
               schedule: str | None = None, clip: str | None = None, phase: str | None = None) -> list[dict[str, Any]]:
        """A run's trials (optionally filtered), ordered by task, optimizer, schedule, clip, phase, index."""
        clauses, values = ["run_id = ?"], [run_id]
        for column, value in (("task", task), ("optimizer", optimizer), ("schedule", schedule), ("clip", clip),
                              ("phase", phase)):
            if value is not None:
                clauses.append(f"{column} = ?")
                values.append(value)
        rows = self._conn.execute(
            f"SELECT * FROM trials WHERE {' AND '.join(clauses)} "
            "ORDER BY task, optimizer, schedule, clip, phase DESC, trial_index",
            values,
        ).fetchall()
        return [self._trial_dict(row) for row in rows]

    @staticmethod
    def _trial_dict(row: sqlite3.Row) -> dict[str, Any]:
        trial = dict(row)
        trial["params"] = json.loads(trial["params"])
        return trial

    def final_trials_for_task(self, task: str) -> list[dict[str, Any]]:
        """Final-phase trials of ``task`` across every run (for recommendations)."""
        rows = self._conn.execute(
            "SELECT * FROM trials WHERE task = ? AND phase = 'final' ORDER BY run_id, optimizer, trial_index", (task,)
        ).fetchall()
        return [self._trial_dict(row) for row in rows]

    def curve(self, trial_id: int) -> list[tuple[int, float | None, float | None, float | None]]:
        """``(step, loss, metric, lr)`` rows of a trial, by step."""
        rows = self._conn.execute(
            "SELECT step, loss, metric, lr FROM metrics WHERE trial_id = ? ORDER BY step", (trial_id,)
        ).fetchall()
        return [tuple(row) for row in rows]

    def artifact(self, trial_id: int, kind: str) -> Any:
        """The artifact of ``kind`` attached to a trial, or ``None``."""
        row = self._conn.execute(
            "SELECT data FROM artifacts WHERE trial_id = ? AND kind = ?", (trial_id, kind)
        ).fetchone()
        return json.loads(row[0]) if row else None

    def count(self, table: str) -> int:
        """Number of rows in one of the schema's tables."""
        if table not in ("runs", "trials", "metrics", "artifacts"):
            raise ValueError(f"Invalid table: {table!r} (accepted: runs, trials, metrics, artifacts)")
        return int(self._conn.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0])

    def execute(self, sql: str, parameters: Sequence[Any] = ()) -> list[sqlite3.Row]:
        """Run a read-only query and return its rows (for ad-hoc inspection and tests)."""
        return self._conn.execute(sql, parameters).fetchall()
