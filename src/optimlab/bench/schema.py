"""The bench database's tables (SQLAlchemy Core, one schema for SQLite and PostgreSQL) and their migrations.

Schema (version :data:`SCHEMA_VERSION`):

* ``runs``: one bench invocation: a ``key`` (hash of its configuration, so rerunning the same command
  finds it and resumes), its JSON ``config`` (which also carries each task's metric, mode and target, so
  a report needs nothing but the store), ``status`` (``running``, ``interrupted``, ``complete``).
* ``trials``: one training run of one configuration: task × optimizer × schedule × clipping, ``phase``
  (``tune`` or ``final``), ``trial_index``, ``seed``, the hyperparameters (JSON), ``status``
  (``complete`` or ``diverged``) and the summary metrics. ``UNIQUE(run_id, task, optimizer, schedule,
  clip, phase, trial_index)`` makes a duplicate impossible.
* ``metrics``: per step: training loss, the task metric where evaluated, the learning rate.
* ``artifacts``: JSON blobs attached to a trial (2-D trajectories, final parameters).
* ``optimlab_meta``: ``application = optimlab`` and ``schema_version``: the marker that tells an optimlab
  database from any other (a database without it is never written to).
* ``claims``: the run's units of work, each held by at most one worker at a time: a study's tuning
  (``unit = 'tune'``) or one of its final reruns (``unit = 'final'``, ``unit_index`` = the seed's index).
  ``owner`` (``host:pid``) holds it until ``lease_until`` (seconds since the epoch on the database's
  clock), which the owner's heartbeat keeps pushing forward; ``status`` is ``open`` or ``done``.

Real numbers are double precision on both backends (SQLite ``REAL``, PostgreSQL ``DOUBLE PRECISION``), so a
result read back equals the float that was written, bit for bit; NaN and ±inf are stored as NULL.

Versions: 1 the four result tables; 2 the ``trials_by_task`` index (``optimlab recommend``); 3 the
``optimlab_meta`` marker and ``claims``; 4 three ``trials`` columns: ``grad_evals`` (gradient evaluations
in the trial: one per step, two for SAM), ``grad_evals_to_target`` (those until the target was first met)
and ``d_estimate`` (the step size a learning-rate-free optimizer ended with; NULL for the others). Rows
stored before version 4 keep NULL there. Versions 1 and 2 were SQLite-only and kept their version in
``PRAGMA user_version`` (no marker): such a file opens and is migrated. SQLite files keep
``user_version`` equal to the schema version, so an older optimlab refuses a newer file.
"""

from __future__ import annotations

import sqlalchemy as sa

__all__ = ["SCHEMA_VERSION", "MIGRATIONS", "TRIAL_SUMMARY_FIELDS", "INTEGER_FIELDS", "TRIAL_COLUMNS_V4", "RESULT_TABLES", "LEGACY_TABLES",
           "runs_table", "trials_table", "metrics_table",
           "artifacts_table", "meta_table", "claims_table"]

_schema = sa.MetaData()

runs_table = sa.Table(
    "runs", _schema,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("key", sa.Text, nullable=False),
    sa.Column("status", sa.Text, nullable=False),
    sa.Column("config", sa.Text, nullable=False),
    sa.Column("command", sa.Text, nullable=False, server_default=""),
    sa.Column("created_at", sa.Text, nullable=False),
    sa.Column("finished_at", sa.Text),
    sa.Index("runs_by_key", "key"),
)

TRIAL_SUMMARY_FIELDS = (
    "steps", "final_loss", "best_loss", "final_metric", "best_metric", "steps_to_target", "time_to_target",
    "ms_per_step", "state_bytes_per_param", "wall_time", "grad_evals", "grad_evals_to_target", "d_estimate",
)
INTEGER_FIELDS = ("steps", "steps_to_target", "grad_evals", "grad_evals_to_target")
TRIAL_COLUMNS_V4 = ("grad_evals", "grad_evals_to_target", "d_estimate")
"""The ``trials`` columns schema version 4 added."""

def _study_columns() -> list[sa.Column]:
    """``id``, ``run_id`` and the study (task, optimizer, schedule, clip): the key columns trials and claims share."""
    return [sa.Column("id", sa.Integer, primary_key=True),
            sa.Column("run_id", sa.Integer, sa.ForeignKey("runs.id", ondelete="CASCADE"), nullable=False),
            *(sa.Column(name, sa.Text, nullable=False) for name in ("task", "optimizer", "schedule", "clip"))]


trials_table = sa.Table(
    "trials", _schema,
    *_study_columns(),
    sa.Column("phase", sa.Text, sa.CheckConstraint("phase IN ('tune', 'final')"), nullable=False),
    sa.Column("trial_index", sa.Integer, nullable=False),
    sa.Column("seed", sa.Integer, nullable=False),
    sa.Column("params", sa.Text, nullable=False),
    sa.Column("status", sa.Text, sa.CheckConstraint("status IN ('complete', 'diverged')"), nullable=False),
    sa.Column("steps", sa.Integer, nullable=False),
    *(sa.Column(name, sa.Integer if name in INTEGER_FIELDS else sa.Double)
      for name in TRIAL_SUMMARY_FIELDS if name not in ("steps", "wall_time")),
    sa.Column("wall_time", sa.Double, nullable=False),
    sa.Column("created_at", sa.Text, nullable=False),
    sa.UniqueConstraint("run_id", "task", "optimizer", "schedule", "clip", "phase", "trial_index"),
    sa.Index("trials_by_task", "task", "phase", "status"),
)

metrics_table = sa.Table(
    "metrics", _schema,
    sa.Column("trial_id", sa.Integer, sa.ForeignKey("trials.id", ondelete="CASCADE"), primary_key=True,
              autoincrement=False),
    sa.Column("step", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("loss", sa.Double),
    sa.Column("metric", sa.Double),
    sa.Column("lr", sa.Double),
    sqlite_with_rowid=False,
)

artifacts_table = sa.Table(
    "artifacts", _schema,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("trial_id", sa.Integer, sa.ForeignKey("trials.id", ondelete="CASCADE"), nullable=False),
    sa.Column("kind", sa.Text, nullable=False),
    sa.Column("data", sa.Text, nullable=False),
    sa.UniqueConstraint("trial_id", "kind"),
)

meta_table = sa.Table(
    "optimlab_meta", _schema,
    sa.Column("key", sa.Text, primary_key=True),
    sa.Column("value", sa.Text, nullable=False),
)

claims_table = sa.Table(
    "claims", _schema,
    *_study_columns(),
    sa.Column("unit", sa.Text, sa.CheckConstraint("unit IN ('tune', 'final')"), nullable=False),
    sa.Column("unit_index", sa.Integer, nullable=False),
    sa.Column("status", sa.Text, sa.CheckConstraint("status IN ('open', 'done')"), nullable=False,
              server_default="open"),
    sa.Column("owner", sa.Text),
    sa.Column("lease_until", sa.Double),
    sa.Column("takeovers", sa.Integer, nullable=False, server_default="0"),
    sa.UniqueConstraint("run_id", "task", "optimizer", "schedule", "clip", "unit", "unit_index"),
)

RESULT_TABLES = (runs_table, trials_table, metrics_table, artifacts_table)
LEGACY_TABLES = {"runs", "trials", "metrics", "artifacts"}


def _create_result_tables(conn: sa.Connection) -> None:
    for table in RESULT_TABLES:  # with their indexes (runs_by_key, and trials_by_task of version 2)
        table.create(conn)


def _add_trials_by_task(conn: sa.Connection) -> None:
    next(index for index in trials_table.indexes if index.name == "trials_by_task").create(conn, checkfirst=True)


def _add_marker_and_claims(conn: sa.Connection) -> None:
    meta_table.create(conn)
    conn.execute(sa.insert(meta_table), [{"key": "application", "value": "optimlab"},
                                         {"key": "schema_version", "value": "0"}])
    claims_table.create(conn)


def _add_trial_columns_v4(conn: sa.Connection) -> None:
    # a database created at version >= 4 by _create_result_tables already has them
    present = {column["name"] for column in sa.inspect(conn).get_columns(trials_table.name)}
    for name in TRIAL_COLUMNS_V4:
        if name not in present:
            column_type = trials_table.c[name].type.compile(dialect=conn.dialect)
            conn.exec_driver_sql(f"ALTER TABLE {trials_table.name} ADD COLUMN {name} {column_type}")


MIGRATIONS = [_create_result_tables, _add_trials_by_task, _add_marker_and_claims, _add_trial_columns_v4]
"""Migration ``i`` takes a database from schema version ``i`` to ``i + 1`` (inside one transaction)."""
SCHEMA_VERSION = len(MIGRATIONS)
