"""Scale-out of cooperating bench workers on PostgreSQL, and the database's cost per stored trial.

    python benchmarks/store_scaleout.py [--quick]     # prints the tables; run_all.py writes them into perf.md

1. **Workers.** The same bench, started as 1, 2 and 4 separate ``optimlab bench --jobs 1`` processes (as on
   separate machines) on a fresh database of a local PostgreSQL server (default durability): wall time from
   the first start to the last exit, speed-up over one worker, and a check that every run stored the same
   results. Each worker runs one intra-op thread, so on a 2-core machine two workers is the most that can help.
   Each worker is its own session, as on its own machine: Linux's autogroup scheduler shares the CPU between
   sessions, so workers started in one session would split one session's share on a busy machine.
2. **Store overhead.** Milliseconds per stored trial (``Store.add_trial`` with its claim check: one
   transaction writing the trial row, a 300-step curve and an artifact), SQLite file (WAL,
   ``synchronous=NORMAL``) against PostgreSQL (fsync on), interleaved in rounds; median over rounds.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from optimlab.bench.pgtemp import TemporaryPostgres, find_server_binaries
from optimlab.bench.store import Store, TrialRecord, worker_name
from optimlab.io import write_json_and_markdown

SRC = Path(__file__).resolve().parents[1] / "src"
BENCH = ["--task", "digits-logreg,digits-mlp", "--optimizers", "sgd-momentum,adam", "--trials", "4", "--seeds", "2",
         "--steps", "600"]
QUICK_BENCH = ["--task", "quadratic,beale", "--optimizers", "sgd-momentum,adam", "--trials", "2", "--seeds", "1",
               "--steps", "50"]


def _env() -> dict[str, str]:
    path = os.pathsep.join(p for p in (str(SRC), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path, "MPLBACKEND": "Agg"}


def _results(url: str) -> list[tuple[Any, ...]]:
    with Store(url, readonly=True) as store:
        (run,) = store.runs()
        return [(t["task"], t["optimizer"], t["phase"], t["trial_index"], t["params"], t["final_metric"])
                for t in store.trials(run["id"])]


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def scale_out(server: TemporaryPostgres, bench: list[str], workers: tuple[int, ...]) -> list[dict[str, Any]]:
    """Wall time of the bench with each number of worker processes, each on a fresh database."""
    rows, reference = [], None
    for n in workers:
        url = server.create_database(f"scale_{n}")
        command = [sys.executable, "-m", "optimlab", "bench", *bench, "--jobs", "1", "--quiet", "--db", url]
        cpu_before = _children_cpu()
        start = time.perf_counter()
        processes = [subprocess.Popen(command, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                      text=True, start_new_session=True) for _ in range(n)]
        errors = [p.communicate()[1] for p in processes]
        wall = time.perf_counter() - start
        cpu = _children_cpu() - cpu_before
        if any(p.returncode for p in processes):
            raise RuntimeError(f"a worker failed: {errors}")
        results = _results(url)
        reference = reference or results
        rows.append({"workers": n, "wall_s": wall, "cpu_s": cpu, "trials": len(results),
                     "same_results": results == reference})
    for row in rows:
        row["speedup"] = rows[0]["wall_s"] / row["wall_s"]
    return rows


def _record(index: int) -> TrialRecord:
    curve = [(s, 1.0 / s, 0.5 / s if s % 25 == 0 else None, 0.01) for s in range(1, 301)]
    return TrialRecord(task="quadratic", optimizer="adam", schedule="constant", clip="none", phase="tune",
                       trial_index=index, seed=0, params={"lr": 0.01}, status="complete", steps=300, final_loss=0.1,
                       best_loss=0.05, final_metric=0.1, best_metric=0.05, steps_to_target=120, time_to_target=0.3,
                       ms_per_step=0.05, state_bytes_per_param=8.0, wall_time=0.4, curve=curve,
                       artifacts={"final_point": [1.0, 2.0]})


def store_overhead(server: TemporaryPostgres, rounds: int, per_round: int) -> dict[str, Any]:
    """Median ms per stored trial (claim-checked ``add_trial``) on each backend, interleaved round by round."""
    folder = Path(tempfile.mkdtemp(prefix="optimlab-store-bench-"))
    backends = {"SQLite": str(folder / "overhead.db"), "PostgreSQL": server.create_database("overhead")}
    stores = {name: Store(db) for name, db in backends.items()}
    times: dict[str, list[float]] = {name: [] for name in stores}
    try:
        for round_index in range(rounds):
            for name, store in stores.items():
                units = [("quadratic", "adam", "constant", "none", "tune", i) for i in range(per_round)]
                run_id, _ = store.open_run(f"round-{round_index}", {}, "", units, new=True)
                claims = [store.claim(run_id, worker_name(), 60.0) for _ in range(per_round)]
                start = time.perf_counter()
                for i, claim in enumerate(claims):
                    store.add_trial(run_id, _record(i), claim=claim, lease=60.0)
                times[name].append(1e3 * (time.perf_counter() - start) / per_round)
    finally:
        for store in stores.values():
            store.close()
    return {name: {"ms_per_trial": statistics.median(values), "min": min(values), "max": max(values)}
            for name, values in times.items()} | {"rounds": rounds, "trials_per_round": per_round,
                                                  "curve_rows": 300}


def run(quick: bool = False) -> dict[str, Any]:
    """Both measurements on one throwaway PostgreSQL server with default durability."""
    if find_server_binaries() is None:
        return {"skipped": "PostgreSQL is not installed (apt-get install postgresql)"}
    with TemporaryPostgres(durable=True) as server:
        overhead = store_overhead(server, rounds=3 if quick else 7, per_round=10 if quick else 40)
        workers = scale_out(server, QUICK_BENCH if quick else BENCH, (1, 2) if quick else (1, 2, 4))
    return {"bench": QUICK_BENCH if quick else BENCH, "cores": len(os.sched_getaffinity(0)), "workers": workers,
            "overhead": overhead, "load_before": os.getloadavg()[0]}


def to_markdown(results: dict[str, Any]) -> str:
    """The tables."""
    if "skipped" in results:
        return f"Not measured: {results['skipped']}.\n"
    lines = [f"`optimlab bench {' '.join(results['bench'])}`, each worker a separate `--jobs 1` process, "
             f"on a local PostgreSQL server; {results['cores']} cores (load average "
             f"{results['load_before']:.1f} when it started).", "",
             "| workers | wall s | speed-up | CPU s, all workers | trials | same results as 1 worker |",
             "|---|---|---|---|---|---|"]
    for row in results["workers"]:
        lines.append(f"| {row['workers']} | {row['wall_s']:.1f} | {row['speedup']:.2f}x | {row['cpu_s']:.1f} | "
                     f"{row['trials']} | {'yes' if row['same_results'] else 'NO'} |")
    lines += ["", "CPU s counts every worker's start-up (Python, torch, the tasks) as well as its trials: the "
              "start-up is paid once per worker."]
    overhead = results["overhead"]
    lines += ["", f"Store overhead: one stored trial ({overhead['curve_rows']}-step curve, an artifact, the claim "
              f"check), median of {overhead['rounds']} interleaved rounds of {overhead['trials_per_round']}:", "",
              "| backend | ms per trial (median) | min | max |", "|---|---|---|---|"]
    for name in ("SQLite", "PostgreSQL"):
        row = overhead[name]
        lines.append(f"| {name} | {row['ms_per_trial']:.2f} | {row['min']:.2f} | {row['max']:.2f} |")
    return "\n".join(lines) + "\n"


def write(results: dict[str, Any], out: str | Path) -> tuple[Path, Path]:
    """Write ``store_scaleout.json`` and ``store_scaleout.md`` into ``out`` (atomically); return both paths."""
    return write_json_and_markdown(out, "store_scaleout", results, to_markdown(results))


def main(argv: list[str] | None = None) -> None:
    """``--quick`` (tiny sizes: checks the plumbing) and ``--out DIR`` (also write the JSON and Markdown)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    results = run(args.quick)
    if args.out:
        write(results, args.out)
    print(to_markdown(results))


if __name__ == "__main__":
    main()
