"""Data-parallel training through torch.distributed (gloo, 2 CPU processes): DDP and ZeRO equivalence with one
process, ZeRO checkpoints in both directions, a killed rank, a port in use."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import torch
from train_helpers import DDP_STEPS, DDP_STOP, REPO, invoke, run_two_ranks, tiny_config

from optimlab.train.checkpoint import load_checkpoint
from optimlab.train.trainer import CHECKPOINT_NAME, SUMMARY_NAME, Trainer

HERE = Path(__file__).resolve().parent
TOLERANCE = 1e-5  # float32 parameters after 20 steps; only the order of the gradient reductions differs


def _train(config, *, resume: bool = False, stop_at: int | None = None) -> None:
    trainer = Trainer(config, resume=resume, quiet=True)
    trainer.train(stop_at=stop_at)
    trainer.close()


def _max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


def _checkpoint(folder: Path) -> dict:
    return load_checkpoint(folder / CHECKPOINT_NAME)


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory: pytest.TempPathFactory, text_file: Path) -> Path:
    """Single-process references (batch 8), then the 2-process scenarios of ddp_worker.py (batch 4 per rank)."""
    root = tmp_path_factory.mktemp("ddp")
    for accum in (1, 2):
        single = root / f"single-a{accum}"
        _train(tiny_config(single, text_file, batch_size=8, accum=accum, steps=DDP_STEPS), stop_at=DDP_STOP)
        shutil.copytree(single, root / f"single-a{accum}-at{DDP_STOP}")
        if accum == 1:
            shutil.copytree(single, root / "zero-from-single")
        _train(tiny_config(single, text_file, batch_size=8, accum=accum, steps=DDP_STEPS), resume=True)
    run_two_ranks(HERE / "ddp_worker.py", str(root), str(text_file))
    return root


@pytest.mark.slow
@pytest.mark.parametrize("accum", [1, 2])
@pytest.mark.parametrize("zero", [False, True])
def test_two_processes_equal_one_process_with_twice_the_batch(ddp_runs: Path, accum: int, zero: bool) -> None:
    parallel = _checkpoint(ddp_runs / f"ddp-a{accum}-z{int(zero)}")
    single = _checkpoint(ddp_runs / f"single-a{accum}-at{DDP_STOP}")
    assert parallel["step"] == single["step"] == DDP_STOP and parallel["world_size"] == 2
    assert (parallel["epoch"], parallel["batch_in_epoch"]) == (single["epoch"], single["batch_in_epoch"])
    assert _max_difference(parallel["model"], single["model"]) < TOLERANCE
    assert len(parallel["rng"]) == 2  # every rank's generators are saved
    comm = json.loads((ddp_runs / f"ddp-a{accum}-z{int(zero)}" / "comm.json").read_text())
    assert comm["first_bucket"] == DDP_STOP  # one gradient all-reduce per optimizer step: no_sync on the others
    val_losses = [json.loads((ddp_runs / name / SUMMARY_NAME).read_text())["val_loss"]
                  for name in (f"ddp-a{accum}-z{int(zero)}", f"single-a{accum}-at{DDP_STOP}")]
    assert val_losses[0] == pytest.approx(val_losses[1], abs=TOLERANCE)  # sharded evaluation, all-reduced


@pytest.mark.slow
@pytest.mark.parametrize("accum", [1, 2])
def test_zero_checkpoint_holds_the_whole_optimizer_state(ddp_runs: Path, accum: int) -> None:
    zero = _checkpoint(ddp_runs / f"ddp-a{accum}-z1")["optimizer"]
    single = _checkpoint(ddp_runs / f"single-a{accum}-at{DDP_STOP}")["optimizer"]
    assert zero["state"].keys() == single["state"].keys()
    assert len(zero["state"]) == sum(len(g["params"]) for g in single["param_groups"])
    for index, state in single["state"].items():
        for key, value in state.items():
            torch.testing.assert_close(zero["state"][index][key], value, rtol=1e-4, atol=TOLERANCE)
    for zero_group, single_group in zip(zero["param_groups"], single["param_groups"]):
        assert zero_group["params"] == single_group["params"]
        assert zero_group["lr"] == pytest.approx(single_group["lr"], rel=1e-12)


@pytest.mark.slow
def test_zero_checkpoint_resumes_in_one_process(ddp_runs: Path, text_file: Path, tmp_path: Path) -> None:
    shutil.copytree(ddp_runs / "ddp-a1-z1", tmp_path / "run")
    _train(tiny_config(tmp_path / "run", text_file, batch_size=8, steps=DDP_STEPS), resume=True)
    resumed = _checkpoint(tmp_path / "run")
    reference = _checkpoint(ddp_runs / "single-a1")
    assert resumed["step"] == reference["step"] == DDP_STEPS and resumed["world_size"] == 1
    assert _max_difference(resumed["model"], reference["model"]) < TOLERANCE


@pytest.mark.slow
def test_single_process_checkpoint_resumes_under_zero(ddp_runs: Path) -> None:
    resumed = _checkpoint(ddp_runs / "zero-from-single")
    reference = _checkpoint(ddp_runs / "single-a1")
    assert resumed["step"] == DDP_STEPS and resumed["world_size"] == 2
    assert _max_difference(resumed["model"], reference["model"]) < TOLERANCE


def _pids_with(marker: str, rank: int) -> list[int]:
    """Processes of this user whose environment holds ``marker`` and ``RANK=rank`` (the workers of one job)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if marker.encode() in environ and f"RANK={rank}".encode() in environ:
            found.append(int(entry.name))
    return found


def _endless_ddp_job(out: Path, text_file: Path, *, checkpoint_every: int, stderr: int) -> tuple[str, subprocess.Popen]:
    """`optimlab train --nproc-per-node 2` of a tiny model for a million steps, its workers marked in their
    environment by the returned ``KEY=VALUE`` (see :func:`_pids_with`); rank 0 prints a line per step."""
    marker = f"OPTIMLAB_TEST_JOB={uuid.uuid4().hex}"
    key, _, value = marker.partition("=")
    command = [sys.executable, "-m", "optimlab", "train", "--out", str(out), "--data", str(text_file),
               "--block-size", "16", "--n-layer", "1", "--n-head", "1", "--n-embd", "8", "--batch-size", "2",
               "--steps", "1000000", "--eval-every", "1000000", "--log-every", "1", "--checkpoint-every",
               str(checkpoint_every), "--no-tensorboard", "--nproc-per-node", "2", "--master-port", "0"]
    job = subprocess.Popen(command, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1", key: value},
                           stdout=subprocess.PIPE, stderr=stderr, text=True)
    return marker, job


@pytest.mark.slow
def test_killed_rank_ends_the_job_naming_it(tmp_path: Path, text_file: Path) -> None:
    marker, job = _endless_ddp_job(tmp_path, text_file, checkpoint_every=1000000, stderr=subprocess.PIPE)
    try:
        for line in job.stdout:  # rank 0 prints a line per step once training runs
            if line.startswith("step 1 |"):
                break
        victims = _pids_with(marker, rank=1)
        assert len(victims) == 1, victims
        os.kill(victims[0], signal.SIGKILL)
        killed_at = time.monotonic()
        _, stderr = job.communicate(timeout=60)
        elapsed = time.monotonic() - killed_at
    finally:
        if job.poll() is None:
            job.kill()
    assert job.returncode == 1 and elapsed < 60
    assert "error: data-parallel job failed: rank 1 failed" in stderr and "signal SIGKILL" in stderr
    assert not _pids_with(marker, rank=0)  # the surviving rank was stopped too


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.slow
def test_workers_exit_when_the_launcher_is_killed(tmp_path: Path, text_file: Path) -> None:
    """SIGKILL of `optimlab train --nproc-per-node 2` (no chance to stop its workers): they exit within seconds
    instead of training and checkpointing on as orphans."""
    marker, job = _endless_ddp_job(tmp_path, text_file, checkpoint_every=50, stderr=subprocess.DEVNULL)
    workers: list[int] = []
    try:
        for line in job.stdout:
            if line.startswith("step 1 |"):
                break
        workers = _pids_with(marker, rank=0) + _pids_with(marker, rank=1)
        assert len(workers) == 2, workers
        job.kill()
        job.wait(timeout=60)
        deadline = time.monotonic() + 10
        while any(_alive(pid) for pid in workers) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(_alive(pid) for pid in workers), "workers outlived their launcher by 10 s"
    finally:
        job.kill()
        for pid in workers:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)


@pytest.mark.slow
def test_torchrun_starts_the_workers_as_before(tmp_path: Path, text_file: Path) -> None:
    """`torchrun -m optimlab.train` (the elastic agent is the workers' parent, no OPTIMLAB_LAUNCHER_PID): the
    parent-death arming leaves a normal run alone."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m",
               "optimlab.train", "--out", str(tmp_path), "--data", str(text_file), "--block-size", "16", "--n-layer",
               "1", "--n-head", "1", "--n-embd", "8", "--batch-size", "2", "--steps", "4", "--eval-every", "4",
               "--checkpoint-every", "4", "--sample-chars", "0", "--no-tensorboard", "--device", "cpu", "-q"]
    job = subprocess.run(command, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                         text=True, timeout=300)
    assert job.returncode == 0, job.stderr[-3000:]
    saved = load_checkpoint(tmp_path / CHECKPOINT_NAME)
    assert saved["step"] == 4 and saved["world_size"] == 2


def test_port_in_use_is_reported(tmp_path: Path, text_file: Path) -> None:
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        result = invoke("train", "--out", str(tmp_path), "--data", str(text_file), "--block-size", "16",
                        "--nproc-per-node", "2", "--master-port", str(port))
    assert result.exit_code == 1
    assert f"port {port} on 127.0.0.1 is already in use" in result.stderr and "--master-port" in result.stderr
    assert not (tmp_path / CHECKPOINT_NAME).exists()
