"""Data-parallel plumbing over ``torch.distributed``: process-group setup, reductions, and the launcher.

Workers learn their place from the environment variables that torchrun (torch elastic) sets
(``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``), so the same worker runs
under ``optimlab train --nproc-per-node N`` on one machine and under
``torchrun --nnodes M --nproc-per-node N --rdzv-endpoint HOST:PORT -m optimlab.train ...`` on several.
The backend is gloo on CPU and NCCL on GPU.

:func:`launch` starts the workers through torch elastic's launcher (the engine behind torchrun) with
no restarts: when one worker dies the agent stops the others and :class:`LaunchError` names the rank
that failed first. Collectives carry a timeout (``TrainConfig.dist_timeout_s``) as a second guard when
workers run under an external launcher.

A worker whose launcher dies (``optimlab train`` or torchrun SIGKILLed) must not train on as an orphan:
:func:`exit_with_launcher` asks Linux to send it SIGTERM when its parent dies (``PR_SET_PDEATHSIG``), or
elsewhere watches its parent process id from a thread.
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime
import os
import signal
import socket
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any, NoReturn

import torch
import torch.distributed as dist

__all__ = ["DistContext", "LaunchError", "pick_device", "init_distributed", "shutdown", "end_worker", "all_reduce_sum",
           "all_gather_objects", "port_in_use", "check_launch_options", "launch", "exit_with_launcher",
           "LAUNCHER_PID_VARIABLE"]

LAUNCHER_PID_VARIABLE = "OPTIMLAB_LAUNCHER_PID"
"""Set by :func:`launch` for its workers: the process whose death must end them."""
_PR_SET_PDEATHSIG = 1


@dataclass(frozen=True)
class DistContext:
    """Where this process stands: ``rank`` of ``world_size``, its ``local_rank`` and its ``device``."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        """Rank 0: the only process that logs and writes files."""
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        """More than one process."""
        return self.world_size > 1


class LaunchError(RuntimeError):
    """A data-parallel job that could not start or whose worker failed; the message says which and why.

    ``worker_exit_code`` is the exit code of the worker that failed first (``None`` when it was a signal or the
    job never started): a worker ending with 2 has printed its own one-line error (bad input, a full disk).
    """

    def __init__(self, message: str, worker_exit_code: int | None = None) -> None:
        super().__init__(message)
        self.worker_exit_code = worker_exit_code


def pick_device(device: str, local_rank: int = 0) -> torch.device:
    """``"auto"`` → CUDA when available else CPU; ``"cuda"`` → this local rank's GPU; ``"cpu"`` → CPU."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("Invalid device: 'cuda' requested but no CUDA device is available")
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def init_distributed(device: str = "auto", timeout_s: float = 60.0) -> DistContext:
    """Join the process group described by the environment (a single process when ``WORLD_SIZE`` is unset or 1).

    gloo on CPU, NCCL on CUDA; collectives time out after ``timeout_s`` seconds.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    chosen = pick_device(device, local_rank)
    if world_size == 1:
        return DistContext(device=chosen)
    if chosen.type == "cuda":
        torch.cuda.set_device(chosen)
    backend = "nccl" if chosen.type == "cuda" else "gloo"
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    return DistContext(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank, device=chosen)


def shutdown(context: DistContext, *, finished: bool = True, process_ends: bool = False) -> None:
    """Leave the process group (no-op for a single process).

    After a run that ``finished``, the ranks first meet at a barrier: a rank that tore its gloo
    connections down while the other was still closing its own made that one abort ("terminate
    called without an active exception", about one run in ten on this machine). After a failure there
    is no barrier, which the failed peer would never reach.

    ``process_ends``: the caller ends the process right after (:func:`end_worker`), so after the barrier the
    group is not destroyed at all. Even after the barrier, destroying it still aborted a rank now and then
    under load (gloo's threads joined while a peer closed its sockets); a process that ends with
    ``os._exit`` runs no destructor that could.
    """
    if context.is_distributed and dist.is_initialized():
        if finished:
            dist.barrier()
            if process_ends:
                return
        dist.destroy_process_group()


def end_worker(code: int) -> NoReturn:
    """End this worker process with ``code`` at once: streams flushed, no interpreter teardown (no atexit
    handlers, no destructors of the process group's threads; see :func:`shutdown`). Files the run wrote are
    closed by then (the trainer closes its outputs before returning)."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


def all_reduce_sum(values: torch.Tensor, context: DistContext) -> torch.Tensor:
    """Σ over ranks of ``values`` (returned unchanged for a single process)."""
    if context.is_distributed:
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def all_gather_objects(value: object, context: DistContext) -> list[object]:
    """``[value of rank 0, value of rank 1, ...]`` (``[value]`` for a single process)."""
    if not context.is_distributed:
        return [value]
    gathered: list[object] = [None] * context.world_size
    dist.all_gather_object(gathered, value)
    return gathered


def port_in_use(host: str, port: int) -> bool:
    """Whether a TCP server can *not* bind ``host:port`` right now (another process listens there)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError:
            return True
    return False


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


def _first_failures(error: Exception) -> list[tuple[int, Any]]:
    """``(rank, failure)`` of a ChildFailedError, the cause first: the agent stops survivors with SIGTERM after
    the first failure, and those are consequences."""
    failures = getattr(error, "failures", {})
    return sorted(failures.items(), key=lambda item: (item[1].timestamp, item[1].exitcode == -15, item[0]))


def _describe_failures(error: Exception) -> str:
    ordered = _first_failures(error)
    if not ordered:
        return str(error)
    lines = []
    for rank, failure in ordered:
        how = f"signal {failure.signal_name()}" if failure.exitcode < 0 else f"exit code {failure.exitcode}"
        lines.append(f"rank {rank} (local rank {failure.local_rank}, pid {failure.pid}) ended with {how}")
    first_rank = ordered[0][0]
    return f"rank {first_rank} failed; " + "; ".join(lines)


def exit_with_launcher(poll_s: float = 1.0) -> None:
    """End this worker when the process that started it (the launcher, or torchrun's agent) dies.

    On Linux the kernel sends SIGTERM on the parent's death (``prctl(PR_SET_PDEATHSIG)``); elsewhere a daemon
    thread polls the parent id every ``poll_s`` seconds. A parent that died before this call (the worker was
    already re-parented; :data:`LAUNCHER_PID_VARIABLE` names the launcher when ``launch`` started us) ends
    the worker at once.
    """
    parent = os.getppid()
    expected = os.environ.get(LAUNCHER_PID_VARIABLE)
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    else:
        def watch() -> None:
            while os.getppid() == parent:
                time.sleep(poll_s)
            os.kill(os.getpid(), signal.SIGTERM)

        threading.Thread(target=watch, name="optimlab-exit-with-launcher", daemon=True).start()
    if (expected is not None and os.getppid() != int(expected)) or os.getppid() != parent:
        os.kill(os.getpid(), signal.SIGTERM)  # the launcher is already gone


def check_launch_options(nproc_per_node: int, master_port: int) -> None:
    """Raise ``ValueError`` naming ``--nproc-per-node`` (< 1) or ``--master-port`` (outside 0..65535)."""
    if nproc_per_node < 1:
        raise ValueError(f"Invalid --nproc-per-node: {nproc_per_node} (accepted range: >= 1)")
    if not (0 <= master_port <= 65535):
        raise ValueError(f"Invalid --master-port: {master_port} (accepted range: 0..65535, 0 picks a free port)")


def launch(worker_args: list[str], nproc_per_node: int, *, master_addr: str = "127.0.0.1",
           master_port: int = 29500) -> None:
    """Run ``python -m optimlab.train <worker_args>`` in ``nproc_per_node`` processes on this machine.

    Rendezvous goes through a c10d store at ``master_addr:master_port`` (``master_port=0`` picks a free
    port). Each worker gets ``OMP_NUM_THREADS`` = cores / processes unless already set. Raises
    :class:`LaunchError` when the port is taken or any worker fails (naming the rank that failed first);
    returns when every worker has finished cleanly.
    """
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.elastic.rendezvous.api import RendezvousError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    check_launch_options(nproc_per_node, master_port)
    if master_port == 0:
        master_port = _free_port(master_addr)
    elif port_in_use(master_addr, master_port):
        raise LaunchError(f"port {master_port} on {master_addr} is already in use (another job is listening "
                          "there): pass a free --master-port, or --master-port 0 to pick one")
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc_per_node, run_id=uuid.uuid4().hex,
                          rdzv_backend="c10d", rdzv_endpoint=f"{master_addr}:{master_port}",
                          rdzv_configs={"is_host": True}, max_restarts=0, monitor_interval=0.1)
    threads_set = "OMP_NUM_THREADS" in os.environ  # the workers inherit this process's environment
    if not threads_set:
        os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // nproc_per_node))
    os.environ[LAUNCHER_PID_VARIABLE] = str(os.getpid())
    try:
        elastic_launch(config, entrypoint=sys.executable)("-u", "-m", "optimlab.train", *worker_args)
    except ChildFailedError as error:
        ordered = _first_failures(error)
        first_code = ordered[0][1].exitcode if ordered and ordered[0][1].exitcode >= 0 else None
        raise LaunchError(f"data-parallel job failed: {_describe_failures(error)}", worker_exit_code=first_code) \
            from None
    except RendezvousError as error:
        raise LaunchError(f"could not start the workers' rendezvous at {master_addr}:{master_port} "
                          f"(is the port in use?): {error}") from None
    finally:
        os.environ.pop(LAUNCHER_PID_VARIABLE, None)
        if not threads_set:
            del os.environ["OMP_NUM_THREADS"]

