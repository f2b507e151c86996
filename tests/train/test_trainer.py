"""The single-process trainer: exact resume, checkpoints, outputs, and every bad input of the issue."""

from __future__ import annotations

import csv
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from train_helpers import invoke, tiny_config

from optimlab.train.checkpoint import CheckpointError, load_checkpoint
from optimlab.train.config import TrainConfig
from optimlab.train.trainer import CHECKPOINT_NAME, METRICS_NAME, Trainer


def _train(config: TrainConfig, stop_at: int | None = None, **kwargs) -> tuple[Trainer, list[float]]:
    trainer = Trainer(config, quiet=True, **kwargs)
    try:
        return trainer, trainer.train(stop_at=stop_at).losses
    finally:
        trainer.close()


def _metric_rows(out_dir: Path) -> list[dict[str, str]]:
    with (out_dir / METRICS_NAME).open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    return [{k: v for k, v in row.items() if k not in ("tokens_per_s", "elapsed_s")} for row in rows]


def _assert_same_state(a: Trainer, b: Trainer) -> None:
    for (name, x), y in zip(a.model.state_dict().items(), b.model.state_dict().values()):
        assert torch.equal(x, y), name
    state_a, state_b = a.optimizer.state_dict()["state"], b.optimizer.state_dict()["state"]
    assert state_a.keys() == state_b.keys()
    for index in state_a:
        for key, value in state_a[index].items():
            assert torch.equal(value, state_b[index][key]), (index, key)


@pytest.mark.parametrize("overrides", [
    dict(dropout=0.1, accum=2, schedule="warmup-cosine", clip="norm:1.0", optimizer="adamw"),
    dict(dropout=0.0, accum=1, schedule="wsd", clip="autoclip:50", optimizer="torch.adamw", layer_decay=0.8),
])
def test_resume_is_bitwise_exact(tmp_path: Path, text_file: Path, overrides: dict) -> None:
    """2N steps in one go == N steps, stop, resume in a fresh Trainer, N more: the same loss at every step."""
    steps = 12
    full, full_losses = _train(tiny_config(tmp_path / "full", text_file, steps=steps, **overrides))
    first, first_losses = _train(tiny_config(tmp_path / "split", text_file, steps=steps, **overrides),
                                 stop_at=steps // 2)
    assert first.step == steps // 2 and load_checkpoint(tmp_path / "split" / CHECKPOINT_NAME)["step"] == steps // 2
    torch.manual_seed(123)  # disturb every generator: the checkpoint must restore them
    random.seed(123)
    np.random.seed(123)
    resumed, resumed_losses = _train(tiny_config(tmp_path / "split", text_file, steps=steps, **overrides),
                                     resume=True)
    assert len(full_losses) == steps
    assert first_losses + resumed_losses == full_losses  # bitwise: float equality at every step
    _assert_same_state(full, resumed)
    assert _metric_rows(tmp_path / "split") == _metric_rows(tmp_path / "full")
    assert resumed.scheduler.state_dict()["last_epoch"] == full.scheduler.state_dict()["last_epoch"] == steps


def test_outputs_and_falling_loss(tmp_path: Path, text_file: Path) -> None:
    config = tiny_config(tmp_path, text_file, steps=30, eval_every=10, tensorboard=True, sample_chars=40,
                         batch_size=8)
    trainer = Trainer(config, quiet=True)
    result = trainer.train()
    trainer.close()
    assert [s for s, _ in result.val_losses] == [0, 10, 20, 30]
    assert result.val_losses[-1][1] < result.val_losses[0][1] - 0.3
    assert len(result.sample) == 40 and (tmp_path / "sample.txt").read_text() == result.sample + "\n"
    rows = _metric_rows(tmp_path)
    assert [int(r["step"]) for r in rows if r["train_loss"]] == [3, 6, 9, 12, 15, 18, 21, 24, 27, 30]
    assert float(rows[-1]["val_loss"]) == pytest.approx(result.val_losses[-1][1], rel=1e-5)
    assert (tmp_path / "monitor.csv").read_text().startswith("step,")
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))
    assert TrainConfig.load(tmp_path / "config.json") == config
    checkpoint = load_checkpoint(tmp_path / CHECKPOINT_NAME)
    assert checkpoint["vocab"] == trainer.vocab.chars and checkpoint["step"] == 30
    assert set(checkpoint) >= {"model", "optimizer", "scheduler", "clipper", "guard", "rng", "epoch",
                               "batch_in_epoch", "model_config", "train_config"}


def test_nonfinite_steps_are_skipped(tmp_path: Path, text_file: Path) -> None:
    trainer = Trainer(tiny_config(tmp_path, text_file, steps=3, schedule="none"), quiet=True)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.model.wpe.weight.register_hook(lambda grad: grad * float("nan"))
    trainer.train()
    trainer.close()
    assert trainer.guard.skipped_steps == 3
    assert all(torch.equal(p, before[n]) for n, p in trainer.model.named_parameters())


# ---------------------------------------------------------------- bad input: a clear message, nothing overwritten


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory, text_file: Path) -> Path:
    out = tmp_path_factory.mktemp("finished")
    _train(tiny_config(out, text_file, steps=3, checkpoint_every=3))
    return out


@pytest.mark.parametrize("case", ["missing data", "short corpus", "other model", "unknown optimizer",
                                  "unknown schedule", "bad clip", "existing checkpoint", "zero alone",
                                  "fp16 on cpu", "batch too large"])
def test_bad_input_is_rejected_before_writing(case: str, tmp_path: Path, text_file: Path, finished_run: Path) -> None:
    short = tmp_path / "short.txt"
    short.write_text("abc" * 10)
    config_args, resume, error, match = {
        "missing data": (dict(data=str(tmp_path / "missing.txt")), True, FileNotFoundError, "missing.txt"),
        "short corpus": (dict(data=str(short)), True, ValueError, "30 characters, too short for block_size=16"),
        "other model": (dict(n_embd=32), True, CheckpointError, "n_embd: checkpoint 16, this run 32"),
        "unknown optimizer": (dict(optimizer="adamx"), True, KeyError, "Unknown optimizer 'adamx'"),
        "unknown schedule": (dict(schedule="cosinus"), True, ValueError, "Unknown schedule 'cosinus'"),
        "bad clip": (dict(clip="norm:abc"), True, ValueError, "Invalid clipping spec"),
        "existing checkpoint": ({}, False, FileExistsError, "--resume"),
        "zero alone": (dict(zero=True), True, ValueError, "zero"),
        "fp16 on cpu": (dict(precision="fp16"), True, ValueError, "fp16"),
        "batch too large": (dict(batch_size=5000), True, ValueError, "batch_size: 5000"),
    }[case]
    before = _snapshot(finished_run)
    with pytest.raises(error, match=match):
        data = config_args.pop("data", text_file)
        Trainer(tiny_config(finished_run, data, **config_args), resume=resume, quiet=True)
    assert _snapshot(finished_run) == before


def test_resume_without_checkpoint(tmp_path: Path, text_file: Path) -> None:
    with pytest.raises(CheckpointError, match="No checkpoint"):
        Trainer(tiny_config(tmp_path, text_file), resume=True, quiet=True)
    assert not any(tmp_path.iterdir())


def test_other_vocabulary_is_rejected(tmp_path: Path, finished_run: Path) -> None:
    other = tmp_path / "other.txt"
    other.write_text("".join(chr(65 + i % 26) for i in range(3000)))
    with pytest.raises(CheckpointError, match="vocab_size"):
        Trainer(tiny_config(finished_run, other), resume=True, quiet=True)


@pytest.mark.parametrize("field,value", [("steps", 0), ("lr", 0.0), ("val_fraction", 1.0), ("precision", "fp8"),
                                         ("device", "tpu"), ("accum", 0), ("layer_decay", 2.0), ("dropout", 1.0)])
def test_bad_config_values(tmp_path: Path, text_file: Path, field: str, value: object) -> None:
    with pytest.raises(ValueError, match=field):
        config = tiny_config(tmp_path, text_file, **{field: value})
        Trainer(config, quiet=True)


def test_cli_reports_bad_input(tmp_path: Path, text_file: Path, finished_run: Path) -> None:
    missing = invoke("train", "--out", str(tmp_path), "--data", str(tmp_path / "nope.txt"))
    assert missing.exit_code == 2 and "error: Data file not found" in missing.stderr and "nope.txt" in missing.stderr
    before = _snapshot(finished_run)
    other = invoke("train", "--out", str(finished_run), "--data", str(text_file), "--resume", "--n-layer", "3",
                    "--n-embd", "16", "--n-head", "2", "--block-size", "16")
    assert other.exit_code == 2 and "n_layer: checkpoint 2, this run 3" in other.stderr
    assert "Traceback" not in other.stderr and _snapshot(finished_run) == before


def test_cli_quick_run_and_resume(tmp_path: Path, text_file: Path) -> None:
    args = ["train", "--quick", "--out", str(tmp_path), "--data", str(text_file), "--steps", "8", "--block-size", "16",
            "--batch-size", "4", "--eval-every", "4", "--no-tensorboard", "--sample-chars", "10"]
    first = invoke(*args, "--stop-at", "4")
    assert first.exit_code == 0, first.output
    assert "step 0: val loss" in first.stdout and "done: 4 steps" in first.stdout
    second = invoke(*args, "--resume")
    assert second.exit_code == 0, second.output
    assert "done: 8 steps" in second.stdout and "sample after 8 steps" in second.stdout


# ---------------------------------------------------------------- atomic checkpoint under SIGKILL

_WRITER = """
import sys, torch
from optimlab.train.checkpoint import save_checkpoint
path = sys.argv[1]
save_checkpoint(path, {"step": 1, "weights": torch.full((4_000_000,), 1.0)})
print("ready", flush=True)
step = 2
while True:
    save_checkpoint(path, {"step": step, "weights": torch.full((4_000_000,), float(step))})
    step += 1
"""


@pytest.mark.slow
def test_sigkill_during_checkpoint_write_leaves_previous_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "checkpoint.pt"
    writer = subprocess.Popen([sys.executable, "-c", _WRITER, str(path)], stdout=subprocess.PIPE, text=True)
    try:
        assert writer.stdout.readline().strip() == "ready"
        deadline = time.monotonic() + 60
        while not list(tmp_path.glob(".checkpoint.pt.*.tmp")):  # a write is in progress
            assert time.monotonic() < deadline, "the writer never started a second checkpoint"
        os.kill(writer.pid, signal.SIGKILL)
    finally:
        writer.wait(timeout=60)
    assert writer.returncode == -signal.SIGKILL
    saved = torch.load(path, weights_only=False)
    assert saved["step"] >= 1 and torch.equal(saved["weights"], torch.full((4_000_000,), float(saved["step"])))


@pytest.mark.slow
def test_quick_preset_learns(tmp_path: Path) -> None:
    """The first quarter of `optimlab train --quick` (same preset and schedule) already cuts the validation loss."""
    trainer = Trainer(TrainConfig.quick(out_dir=str(tmp_path), tensorboard=False, device="cpu"), quiet=True)
    result = trainer.train(stop_at=100)
    trainer.close()
    (_, initial), *_, (_, reached) = result.val_losses
    assert initial == pytest.approx(4.42, abs=0.1)  # ≈ ln(vocabulary size): an untrained model
    assert reached < initial - 1.5


@pytest.fixture
def one_thread():
    """Run in-process computations on one thread, like the `optimlab train` subprocesses of these tests."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.slow
def test_killed_run_resumes_exactly(tmp_path: Path, text_file: Path, one_thread: None) -> None:
    """`optimlab train` SIGKILLed mid-run, resumed from its last checkpoint: the same steps as an unbroken run."""
    steps, every = 100_000, 5  # a long planned run (the schedule spans it); checkpoints every 5 steps
    killed = tmp_path / "killed"
    command = [sys.executable, "-m", "optimlab", "train", "--out", str(killed), "--data", str(text_file),
               "--block-size", "16", "--n-layer", "2", "--n-head", "2", "--n-embd", "16", "--batch-size", "4",
               "--steps", str(steps), "--checkpoint-every", str(every), "--log-every", "1", "--eval-every", "3",
               "--eval-batches", "2", "--lr", "3e-3", "--optimizer", "adamw", "--dropout", "0.1", "--no-tensorboard",
               "--device", "cpu", "--monitor-every", "2", "--quiet"]
    job = subprocess.Popen(command, env={**os.environ, "OMP_NUM_THREADS": "1"}, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (killed / CHECKPOINT_NAME).exists():
            assert job.poll() is None and time.monotonic() < deadline, job.stderr.read() if job.poll() else "slow"
            time.sleep(0.05)
        time.sleep(0.3)  # let it run past the checkpoint, logging steps the resumed run will redo
    finally:
        job.send_signal(signal.SIGKILL)
        job.communicate(timeout=60)
    assert job.returncode == -signal.SIGKILL
    at = load_checkpoint(killed / CHECKPOINT_NAME)["step"]
    config = dict(block_size=16, n_layer=2, n_head=2, n_embd=16, batch_size=4, steps=steps, checkpoint_every=every,
                  log_every=1, eval_every=3, eval_batches=2, lr=3e-3, dropout=0.1, monitor_every=2)
    resumed, resumed_losses = _train(tiny_config(killed, text_file, **config), stop_at=at + every, resume=True)
    full, full_losses = _train(tiny_config(tmp_path / "full", text_file, **config), stop_at=at + every)
    assert resumed_losses == full_losses[at:]
    _assert_same_state(full, resumed)
    assert _metric_rows(killed) == _metric_rows(tmp_path / "full")


def test_bf16_autocast_tracks_fp32(tmp_path: Path, text_file: Path) -> None:
    _, fp32 = _train(tiny_config(tmp_path / "fp32", text_file, steps=4))
    bf16_trainer, bf16 = _train(tiny_config(tmp_path / "bf16", text_file, steps=4, precision="bf16"))
    assert all(p.dtype == torch.float32 for p in bf16_trainer.model.parameters())  # autocast, fp32 master weights
    assert bf16 != fp32  # bf16 matmuls really ran
    np.testing.assert_allclose(bf16, fp32, rtol=0, atol=0.05)


def test_config_json_roundtrip_and_unknown_fields(tmp_path: Path, text_file: Path) -> None:
    config = tiny_config(tmp_path, text_file, layer_decay=0.7)
    config.save(tmp_path / "config.json")
    assert TrainConfig.load(tmp_path / "config.json") == config
    with pytest.raises(ValueError, match="Unknown TrainConfig field.*n_layers"):
        TrainConfig.from_dict({**config.to_dict(), "n_layers": 3})
