"""Cooperating bench workers: claim a unit of work, keep its lease alive, run it, and repeat.

Any number of processes, on one machine or many, run :func:`work` on the same run of the same database
(``optimlab bench`` started several times with the same arguments, and its ``--jobs`` local processes):

1. :meth:`Store.claim <optimlab.bench.store.Store.claim>` takes the first open unit nobody holds, in one
   transaction (PostgreSQL ``SELECT ... FOR UPDATE SKIP LOCKED``; SQLite ``BEGIN IMMEDIATE``), with a lease of
   ``lease`` seconds on the database's clock;
2. a :class:`Heartbeat` thread renews the lease every ``lease / 4`` seconds while the unit runs, and every
   stored trial renews it too, in the trial's own transaction, which also checks the claim is still this
   worker's: a worker that lost its claim (paused longer than the lease) writes nothing and moves on;
3. a worker that dies stops renewing: once its lease expires, the next worker to look takes the unit over,
   from its last stored trial (on the same machine at once, since a dead process id is visible there);
4. a worker with nothing to claim waits for the units others hold (they may fail and come back), and
   returns when every unit of the run is done.

What each unit computes depends only on the trials stored before it, so the number of workers, their
speed and their deaths change nothing but the time.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import queue
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch

from optimlab.bench.store import Claim, ClaimLost, Store, StoreError, worker_name

__all__ = ["DEFAULT_LEASE", "Heartbeat", "work", "run_local_workers", "check_lease"]

DEFAULT_LEASE = 60.0
"""Seconds a claim outlives its last heartbeat (the longest a dead machine's unit waits for a takeover)."""

UnitRunner = Callable[[Claim], bool]  # runs a claimed unit; True when done, False when stopped early


def check_lease(lease: float) -> None:
    """``ValueError`` unless ``lease`` is a usable number of seconds."""
    if not lease > 0.2:
        raise ValueError(f"Invalid lease: {lease} (accepted: seconds > 0.2)")


class Heartbeat:
    """While in a ``with`` block, a daemon thread renews ``claim``'s lease every ``lease / 4`` seconds.

    ``lost`` turns True when the database says another worker took the claim over.
    """

    def __init__(self, store: Store, claim: Claim, lease: float) -> None:
        self._store, self._claim, self._lease = store, claim, lease
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="optimlab-heartbeat", daemon=True)
        self.lost = False

    def _beat(self) -> None:
        while not self._stop.wait(self._lease / 4):
            try:
                self._store.heartbeat(self._claim, self._lease)
            except ClaimLost:
                self.lost = True
                return
            except Exception:  # noqa: BLE001  a busy or briefly unreachable database: try again next beat
                continue

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def work(store: Store, run_id: int, run_unit: UnitRunner, *, lease: float = DEFAULT_LEASE,
         should_stop: Callable[[], bool] = lambda: False, on_wait: Callable[[], None] = lambda: None,
         owner: str | None = None) -> bool:
    """Claim and run units of ``run_id`` until every unit is done (True) or ``should_stop()`` (False).

    A unit stopped early, or left by an exception, is released at once for another worker.
    ``on_wait`` is called on every poll while waiting for units other workers hold.
    """
    owner = owner or worker_name()
    poll = min(1.0, lease / 4)
    while not should_stop():
        claim = store.claim(run_id, owner, lease)
        if claim is None:
            left, _ = store.units_left(run_id)
            if left == 0:
                return True
            on_wait()
            time.sleep(poll)
            continue
        try:
            with Heartbeat(store, claim, lease):
                finished = run_unit(claim)
        except ClaimLost:
            continue
        except BaseException:
            with contextlib.suppress(Exception):
                store.release(claim)
            raise
        if not finished:
            store.release(claim)
    return False


# -- local worker processes (--jobs) --------------------------------------------------------------------
Factory = Callable[[Store, Callable[[tuple[Any, ...]], None], Callable[[], bool]], UnitRunner]


def _die_with_parent() -> None:
    """Linux: have the kernel SIGKILL this worker when the bench process dies (even by SIGKILL), so an
    orphaned worker cannot keep writing while a rerun resumes. Elsewhere workers check their parent id."""
    if sys.platform.startswith("linux"):
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGKILL)


def _process_main(db: str, run_id: int, factory: Factory, lease: float, events: Any, stop: Any,
                  parent_pid: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent turns Ctrl-C into the stop event
    _die_with_parent()
    torch.set_num_threads(1)

    def should_stop() -> bool:
        return stop.is_set() or os.getppid() != parent_pid

    try:
        with Store(db, check=False) as store:
            work(store, run_id, factory(store, events.put, should_stop), lease=lease, should_stop=should_stop)
    except StoreError as err:
        events.put(("error", err))
    except BaseException:  # noqa: BLE001  reported to the parent, which raises it
        events.put(("error", RuntimeError(f"bench worker {os.getpid()} failed:\n{traceback.format_exc()}")))


def run_local_workers(db: str, run_id: int, factory: Factory, jobs: int, lease: float,
                      on_event: Callable[[tuple[Any, ...]], None], on_idle: Callable[[], None]) -> None:
    """Run :func:`work` in ``jobs`` child processes; ``factory(store, report, should_stop)`` builds each one's
    unit runner, whose ``report(event)`` reaches ``on_event`` here. ``on_idle`` runs about every 0.2 s.

    Ctrl-C sets the workers' stop event, waits for the trials in hand and raises ``KeyboardInterrupt``; a
    worker's error stops the others and is raised here.
    """
    method = "fork" if sys.platform.startswith("linux") else "spawn"
    context = multiprocessing.get_context(method)
    events = context.Queue()
    stop = context.Event()
    processes = [context.Process(target=_process_main, args=(db, run_id, factory, lease, events, stop, os.getpid()),
                                 daemon=True) for _ in range(jobs)]
    for process in processes:
        process.start()
    error: BaseException | None = None

    def drain(timeout: float) -> None:
        nonlocal error
        deadline = time.monotonic() + timeout
        while True:
            try:
                item = events.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                return
            if item[0] == "error":
                error = error or item[1]
                stop.set()
            else:
                on_event(item)

    try:
        while any(process.is_alive() for process in processes):
            drain(0.2)
            on_idle()
        drain(0.0)
    except KeyboardInterrupt:
        stop.set()
        for process in processes:
            process.join()
        drain(0.0)
        raise
    finally:
        for process in processes:
            process.join()
    if error is not None:
        raise error
