"""Cooperating workers: the same bench command started three times on one database (a real PostgreSQL server,
an SQLite file) stores every trial once, with the results of a single process; a worker SIGKILLed mid-study,
or frozen past its lease, is taken over and the results still equal the single-process run's."""

import signal
import subprocess
import time

import pytest
from bench_helpers import cli_command, cli_env

from optimlab.bench.runner import BenchConfig, run_bench, summarize
from optimlab.bench.store import Store, StoreError

pytestmark = pytest.mark.slow

CONFIG = BenchConfig(tasks=("quadratic", "beale", "rosenbrock"), optimizers=("sgd-momentum", "adam"), trials=3,
                     seeds=2, steps=100)
ARGS = ("bench", "--task", "quadratic,beale,rosenbrock", "--optimizers", "sgd-momentum,adam", "--trials", "3",
        "--seeds", "2", "--steps", "100", "--jobs", "1", "--quiet")
TOTAL = 6 * (3 + 2)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The same bench in one process, on a third database."""
    db = tmp_path_factory.mktemp("reference") / "one-process.db"
    assert run_bench(CONFIG, db, quiet=True).complete
    with Store(db) as store:
        return results(store)


def results(store):
    """Everything a report shows: per trial its row (params, metrics, status) and its whole curve; per study
    the summary (best parameters, metric means)."""
    (run,) = store.runs()
    trials = {}
    for t in store.trials(run["id"]):
        key = (t["task"], t["optimizer"], t["phase"], t["trial_index"])
        trials[key] = ({k: t[k] for k in ("params", "status", "seed", "steps", "final_loss", "best_loss",
                                          "final_metric", "best_metric", "steps_to_target")}, store.curve(t["id"]))
    summary = [{k: v for k, v in row.items() if k not in ("ms_per_step", "time_to_target_mean")}
               for row in summarize(store, run["id"])]
    return trials, summary


def start_worker(db, *extra):
    return subprocess.Popen(cli_command(*ARGS, "--db", str(db), *extra), env=cli_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def finish(workers, timeout=180):
    outputs = [worker.communicate(timeout=timeout) for worker in workers]
    return [(worker.returncode, out, err) for worker, (out, err) in zip(workers, outputs)]


def assert_complete_and_equal(db, reference):
    with Store(db) as store:
        (run,) = store.runs()
        assert run["status"] == "complete" and run["n_trials"] == TOTAL  # UNIQUE: each trial stored once
        claims = store.claims(run["id"])
        assert len(claims) == 6 * 3 and {c["status"] for c in claims} == {"done"}
        assert results(store) == reference  # bit for bit: curves, metrics, best parameters
        return claims


IN_PROGRESS = """SELECT c.id, c.owner, COUNT(t.id) FROM claims c LEFT JOIN trials t ON t.run_id = c.run_id
    AND t.task = c.task AND t.optimizer = c.optimizer AND t.phase = 'tune'
    WHERE c.run_id = 1 AND c.unit = 'tune' AND c.status = 'open' AND c.owner IS NOT NULL
    GROUP BY c.id, c.owner"""


def watch(db, deadline=90.0):
    """A read-only store on ``db`` once the first worker has created it."""
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        try:
            return Store(db, readonly=True, check=False)
        except StoreError:  # not created yet
            time.sleep(0.02)
    raise AssertionError(f"no database at {db} after {deadline} s")


def wait_for_a_study_in_progress(store, workers, deadline=90.0):
    """A worker holding a tuning unit with at least one trial stored and more to go: (worker, claim id, owner)."""
    by_pid = {worker.pid: worker for worker in workers}
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        for claim_id, owner, done in store.execute(IN_PROGRESS):
            pid = int(owner.rsplit(":", 1)[1])
            if pid in by_pid and 1 <= done < CONFIG.trials:
                return by_pid[pid], claim_id, owner
        time.sleep(0.01)
    raise AssertionError("no worker was seen in the middle of a study")


def seconds_until_taken_over(store, claim_id, owner, since, deadline=120.0):
    """Poll until another worker holds the claim (its owner changed); the seconds since ``since``."""
    while time.monotonic() < since + deadline:
        now = next(c for c in store.claims(1) if c["id"] == claim_id)
        if now["owner"] != owner:
            return time.monotonic() - since
        assert now["status"] == "open", "the unit was finished before its worker was stopped"
        time.sleep(0.02)
    raise AssertionError(f"no takeover within {deadline} s")


@pytest.mark.parametrize("backend", ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def test_three_workers_store_every_trial_once_with_single_process_results(backend, tmp_path, reference, request):
    db = tmp_path / "shared.db" if backend == "sqlite" else request.getfixturevalue("postgres_url")
    outcomes = finish([start_worker(db) for _ in range(3)])
    for code, out, err in outcomes:
        assert code == 0, err
    assert sum("run 1 (started)" in out for _, out, _ in outcomes) == 1  # one run, the others joined it
    claims = assert_complete_and_equal(db, reference)
    assert len({c["owner"] for c in claims}) >= 2  # the work was shared
    mine = sum(int(out.split(" trials run")[0].rsplit(" ", 1)[1]) for _, out, _ in outcomes)
    assert mine == TOTAL  # every worker's own count adds up to the run


def test_a_worker_killed_mid_study_is_taken_over(tmp_path, reference):
    db = tmp_path / "shared.db"
    workers = [start_worker(db) for _ in range(3)]
    with watch(db) as store:
        victim, claim_id, owner = wait_for_a_study_in_progress(store, workers)
        victim.send_signal(signal.SIGKILL)
        takeover_s = seconds_until_taken_over(store, claim_id, owner, time.monotonic())
    survivors = [w for w in workers if w is not victim]
    for code, _, err in finish(survivors):
        assert code == 0, err
    assert victim.wait() == -signal.SIGKILL
    claims = assert_complete_and_equal(db, reference)
    assert next(c for c in claims if c["id"] == claim_id)["takeovers"] >= 1
    print(f"takeover of a SIGKILLed worker's study (same machine): {takeover_s:.2f} s")


@pytest.mark.postgres
def test_a_worker_frozen_past_its_lease_loses_its_study_and_writes_nothing(postgres_url, reference):
    lease = 2.0
    workers = [start_worker(postgres_url, "--lease", str(lease)) for _ in range(2)]
    with watch(postgres_url) as store:
        frozen, claim_id, owner = wait_for_a_study_in_progress(store, workers)
        frozen.send_signal(signal.SIGSTOP)  # a lost machine: alive, silent
        takeover_s = seconds_until_taken_over(store, claim_id, owner, time.monotonic())
    assert takeover_s >= lease * 0.5  # not before the lease ran out (the last heartbeat was at most lease/4 ago)
    frozen.send_signal(signal.SIGCONT)  # it wakes up, finishes its trial, finds the claim gone, writes nothing
    for code, _, err in finish(workers):
        assert code == 0, err
    claims = assert_complete_and_equal(postgres_url, reference)
    assert next(c for c in claims if c["id"] == claim_id)["takeovers"] >= 1
    print(f"takeover of a frozen worker's study after its {lease} s lease: {takeover_s:.2f} s")
