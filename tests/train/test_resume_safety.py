"""Never lose a run: a resume continues the stored run, damaged or non-finite checkpoints are refused (and never
written), the last K checkpoints are kept, stale temporaries go, a full or read-only disk is one line, and every
command-line value is checked before the first write."""

from __future__ import annotations

import errno
import zipfile
from pathlib import Path

import pytest
import torch
from train_helpers import invoke, run_cli, tiny_config

from optimlab.schedules import create_scheduler
from optimlab.train.checkpoint import CheckpointError, CheckpointFiles, load_checkpoint, save_checkpoint
from optimlab.train.config import TrainConfig
from optimlab.train.trainer import CHECKPOINT_NAME, Trainer

TINY = ("--block-size", "16", "--n-layer", "2", "--n-head", "2", "--n-embd", "16", "--batch-size", "4", "--lr", "3e-3",
        "--log-every", "2", "--eval-every", "4", "--eval-batches", "2", "--monitor-every", "2", "--sample-chars", "0",
        "--no-tensorboard", "--device", "cpu")


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _one_line_error(result, code: int = 2) -> str:
    assert result.exit_code == code, result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error")]
    assert len(errors) == 1 and result.stderr.strip().splitlines()[-1] == errors[0], result.output
    assert "Traceback" not in result.output, result.output
    return errors[0]


@pytest.fixture
def stopped_run(tmp_path: Path, text_file: Path) -> Path:
    """`optimlab train --steps 8 --stop-at 4` (checkpoints at steps 2 and 4)."""
    out = tmp_path / "run"
    first = invoke("train", "--out", str(out), "--data", str(text_file), *TINY, "--steps", "8", "--checkpoint-every",
                   "2", "--stop-at", "4")
    assert first.exit_code == 0, first.output
    return out


# ---------------------------------------------------------------- 1. a resume continues the stored run


def test_resume_without_options_continues_the_stored_run(stopped_run: Path) -> None:
    """The issue: the resume took the defaults (2000 steps, another model). Now: the stored 8 steps."""
    plot = stopped_run / "loss.png"
    first_plot = plot.read_bytes()  # written at the stop...
    assert first_plot.startswith(b"\x89PNG")
    resumed = invoke("train", "--out", str(stopped_run), "--resume")
    assert resumed.exit_code == 0, resumed.output
    assert f"resuming from {stopped_run / CHECKPOINT_NAME} (step 4 of 8)" in resumed.stdout
    assert "done: 8 steps" in resumed.stdout
    assert TrainConfig.load(stopped_run / "config.json").steps == 8
    assert plot.read_bytes().startswith(b"\x89PNG") and plot.read_bytes() != first_plot  # ...and after the resume
    assert load_checkpoint(stopped_run / CHECKPOINT_NAME)["train_config"]["n_embd"] == 16


def test_resume_with_more_steps_rebuilds_the_schedule(stopped_run: Path, text_file: Path) -> None:
    resumed = invoke("train", "--out", str(stopped_run), "--resume", "--steps", "12", "--stop-at", "5")
    assert resumed.exit_code == 0, resumed.output
    assert "changed: steps 8 -> 12 (schedule rebuilt)" in resumed.stdout
    saved = load_checkpoint(stopped_run / CHECKPOINT_NAME)
    assert saved["train_config"]["steps"] == 12 and TrainConfig.load(stopped_run / "config.json").steps == 12
    assert saved["resumes"] == [{"step": 4, "checkpoint": str(stopped_run / CHECKPOINT_NAME),
                                 "changes": {"steps": [8, 12]}}]
    # the learning rate after step 5 is that of a fresh 12-step schedule after 5 steps
    model = torch.nn.Linear(1, 1)
    reference = create_scheduler("warmup-cosine", torch.optim.SGD(model.parameters(), lr=3e-3), total_steps=12)
    for _ in range(5):
        reference.optimizer.step()
        reference.step()
    lrs = [group["lr"] for group in saved["optimizer"]["param_groups"]]
    assert lrs == pytest.approx([reference.get_last_lr()[0]] * len(lrs), rel=1e-12)
    assert saved["scheduler"]["total_steps"] == 12


@pytest.mark.parametrize("option,value,named", [
    ("--optimizer", "lion", "optimizer: checkpoint 'adamw', this run 'lion'"),
    ("--optimizer", "adafactor", "optimizer: checkpoint 'adamw', this run 'adafactor'"),
    ("--lr", "0.01", "lr: checkpoint 0.003, this run 0.01"),
    ("--steps", "3", "steps: checkpoint 8, this run 3 (the checkpoint is at step 4)"),
    ("--batch-size", "8", "batch_size: checkpoint 4, this run 8"),
])
def test_resume_refuses_a_change_of_the_run(stopped_run: Path, option: str, value: str, named: str) -> None:
    before = _snapshot(stopped_run)
    line = _one_line_error(invoke("train", "--out", str(stopped_run), "--resume", option, value))
    assert named in line
    assert _snapshot(stopped_run) == before


# ---------------------------------------------------------------- 2. checksums, the last K checkpoints


def _tensor_record(path: Path) -> tuple[int, int]:
    """(offset, size) of the largest tensor record's data inside the checkpoint file."""
    with zipfile.ZipFile(path) as archive:
        info = max((i for i in archive.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    with path.open("rb") as handle:  # the local header: 30 bytes + name + extra field
        handle.seek(info.header_offset + 26)
        name_length, extra_length = int.from_bytes(handle.read(2), "little"), int.from_bytes(handle.read(2), "little")
    return info.header_offset + 30 + name_length + extra_length, info.file_size


@pytest.mark.parametrize("damage", ["one flipped byte", "4 KiB zeroed"])
def test_damaged_checkpoint_is_refused_and_the_previous_one_offered(stopped_run: Path, damage: str) -> None:
    latest = stopped_run / CHECKPOINT_NAME
    data = bytearray(latest.read_bytes())
    offset, size = _tensor_record(latest)
    if damage == "one flipped byte":
        data[offset + size // 2] ^= 0x10
    else:
        data[offset:offset + min(4096, size)] = bytes(min(4096, size))
    latest.write_bytes(bytes(data))
    line = _one_line_error(invoke("train", "--out", str(stopped_run), "--resume"))
    previous = stopped_run / "checkpoint.step2.pt"
    assert f"Checkpoint {latest} is damaged" in line and "fails its CRC-32 checksum" in line
    assert f"the previous checkpoint checkpoint.step2.pt (step 2) passes its checksums: resume from it with " \
           f"--resume-from {previous}" in line
    resumed = invoke("train", "--out", str(stopped_run), "--resume-from", str(previous))
    assert resumed.exit_code == 0, resumed.output
    assert f"resuming from {previous} (step 2 of 8)" in resumed.stdout and "done: 8 steps" in resumed.stdout
    assert load_checkpoint(latest)["step"] == 8


def test_keep_checkpoints(tmp_path: Path, text_file: Path) -> None:
    config = tiny_config(tmp_path, text_file, steps=10, checkpoint_every=2, keep_checkpoints=3)
    Trainer(config, quiet=True).train()
    files = CheckpointFiles(tmp_path)
    assert [step for step, _ in files.previous()] == [8, 6]
    assert [load_checkpoint(path)["step"] for _, path in files.previous()] == [8, 6]
    assert load_checkpoint(files.latest)["step"] == 10
    assert sorted(p.name for p in tmp_path.glob("*.pt")) == ["checkpoint.pt", "checkpoint.step6.pt",
                                                            "checkpoint.step8.pt"]


# ---------------------------------------------------------------- 3. non-finite checkpoints: never written or loaded


def test_nan_weights_never_overwrite_the_last_good_checkpoint(tmp_path: Path, text_file: Path) -> None:
    trainer = Trainer(tiny_config(tmp_path, text_file, steps=12, checkpoint_every=3), quiet=True)
    trainer.train(stop_at=3)
    good = (tmp_path / CHECKPOINT_NAME).read_bytes()
    with torch.no_grad():
        trainer.model.wpe.weight[0, 0] = float("nan")  # every later step is skipped by the guard
    with pytest.raises(CheckpointError, match=r"not writing the checkpoint of step 6: non-finite values in "
                                              r"model\.wpe\.weight; the last good checkpoint \(step 3\) is kept"):
        trainer.train(stop_at=6)
    trainer.close()
    assert trainer.guard.skipped_steps == 3
    assert (tmp_path / CHECKPOINT_NAME).read_bytes() == good


def test_nonfinite_checkpoint_is_not_loaded(tmp_path: Path) -> None:
    model = {"w": torch.tensor([1.0, float("inf")])}
    optimizer = {"state": {0: {"exp_avg": torch.tensor([float("nan")]), "step": torch.tensor(1.0)}}}
    save_checkpoint(tmp_path / "c.pt", dict(step=7, model_config={}, vocab=[], model=model, optimizer=optimizer))
    with pytest.raises(CheckpointError, match=r"\(step 7\) holds non-finite values in model\.w, optimizer\.exp_avg "
                                              r"of parameter 0"):
        load_checkpoint(tmp_path / "c.pt")


def test_diverging_run_ends_with_one_line(tmp_path: Path, text_file: Path) -> None:
    """lr 1e30: the weights overflow, every step is skipped, and the run stops with one line (no traceback)."""
    result = invoke("train", "--out", str(tmp_path), "--data", str(text_file), *TINY, "--steps", "40",
                    "--checkpoint-every", "100", "--lr", "1e30", "--schedule", "none", "--quiet")
    line = _one_line_error(result, code=1)
    assert "optimizer steps in a row had non-finite gradients" in line or "non-finite values in" in line


# ---------------------------------------------------------------- 6. stale temporaries of a killed write


def test_stale_checkpoint_temporaries_are_removed_on_start(stopped_run: Path) -> None:
    stale = [stopped_run / ".checkpoint.pt.k1ll3d.tmp", stopped_run / ".checkpoint.pt.x9.tmp"]
    for path in stale:
        path.write_bytes(b"\0" * 100_000)
    other = stopped_run / ".notes.txt.tmp"
    other.write_text("not ours")
    resumed = invoke("train", "--out", str(stopped_run), "--resume")
    assert resumed.exit_code == 0, resumed.output
    assert "removed 2 temporary file(s) of an interrupted checkpoint write" in resumed.stdout
    assert not any(path.exists() for path in stale) and other.exists()


# ---------------------------------------------------------------- 7. a full disk, a read-only folder


def test_full_disk_is_one_line_and_keeps_the_previous_checkpoint(stopped_run: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """ENOSPC injected where the checkpoint's bytes reach the disk (fsync of the temporary file)."""
    import optimlab.io

    real_fsync = optimlab.io.os.fsync

    def fsync(fd: int) -> None:
        if Path(f"/proc/self/fd/{fd}").resolve().name.startswith(".checkpoint.pt."):
            raise OSError(errno.ENOSPC, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr(optimlab.io.os, "fsync", fsync)
    line = _one_line_error(invoke("train", "--out", str(stopped_run), "--resume"))
    assert line == (f"error: cannot write checkpoint to {stopped_run}: no space left on device; "
                    "the previous checkpoint (step 4) is intact")
    assert load_checkpoint(stopped_run / CHECKPOINT_NAME)["step"] == 4
    assert not list(stopped_run.glob(".checkpoint.pt.*.tmp"))


def test_full_tmpfs_is_one_line(tmp_path: Path, text_file: Path, small_tmpfs: Path) -> None:
    """A real full disk (a 2 MiB tmpfs filled up after the first checkpoint): torch's own error is translated."""
    out = small_tmpfs / "run"
    first = invoke("train", "--out", str(out), "--data", str(text_file), *TINY, "--steps", "8", "--checkpoint-every",
                   "4", "--stop-at", "4")
    assert first.exit_code == 0, first.output
    with (small_tmpfs / "filler").open("wb", buffering=0) as filler:  # fill the disk up...
        with pytest.raises(OSError, match="No space left on device"):
            while True:
                filler.write(b"\0" * 4096)
        filler.truncate(filler.tell() - 32 * 1024)  # ...then leave a few pages for metrics.csv, not a checkpoint
    line = _one_line_error(invoke("train", "--out", str(out), "--resume"))
    assert line == f"error: cannot write checkpoint to {out}: no space left on device; the previous checkpoint " \
                   "(step 4) is intact"
    assert load_checkpoint(out / CHECKPOINT_NAME)["step"] == 4


def test_read_only_out_is_refused_before_training(text_file: Path, read_only_dir: Path) -> None:
    line = _one_line_error(invoke("train", "--out", str(read_only_dir / "run"), "--data", str(text_file), *TINY))
    assert line.startswith(f"error: Invalid --out: cannot write to {read_only_dir / 'run'}: ")
    assert "step 0" not in line


# ---------------------------------------------------------------- 8. every value checked before the first write


@pytest.mark.parametrize("args,named", [
    (("--stop-at", "0"), "Invalid --stop-at: 0 (accepted range: >= 1)"),
    (("--nproc-per-node", "2", "--master-port", "70000"), "Invalid --master-port: 70000 (accepted range: 0..65535"),
    (("--nproc-per-node", "0"), "Invalid --nproc-per-node: 0 (accepted range: >= 1)"),
    (("--keep-checkpoints", "0"), "Invalid keep_checkpoints: 0"),
    (("--optimizer", "sam-sgd", "--zero", "--nproc-per-node", "2"), "Invalid zero: sam-sgd steps with a closure"),
    (("--optimizer", "asam-adamw", "--precision", "fp16"), "Invalid precision: 'fp16' with asam-adamw, which steps"),
])
def test_bad_values_write_nothing(tmp_path: Path, text_file: Path, args: tuple[str, ...], named: str) -> None:
    out = tmp_path / "run"
    line = _one_line_error(invoke("train", "--out", str(out), "--data", str(text_file), *TINY, *args))
    assert named in line
    assert not out.exists()


def test_binary_data_is_refused(tmp_path: Path) -> None:
    binary = tmp_path / "weights.bin"
    binary.write_bytes(bytes(range(256)) * 200)
    line = _one_line_error(invoke("train", "--out", str(tmp_path / "run"), "--data", str(binary), *TINY))
    assert f"Invalid --data: {binary} holds NUL bytes at offset 0" in line
    binary.write_bytes(b"text, then " + bytes([0xff, 0xfe]) + b" more" * 2000)
    line = _one_line_error(invoke("train", "--out", str(tmp_path / "run"), "--data", str(binary), *TINY))
    assert f"Invalid --data: {binary} is not UTF-8 text (byte 0xff at offset 11)" in line
    assert not (tmp_path / "run").exists()


def test_check_update_reaches_the_guard(tmp_path: Path, text_file: Path) -> None:
    """--check-update: a step whose update overflows (decoupled decay factor 1 - lr*wd = -1e40) is rolled back."""
    trainer = Trainer(tiny_config(tmp_path, text_file, steps=2, check_update=True, lr=1e30, weight_decay=1e10,
                                  schedule="none", optimizer="torch.adamw"), quiet=True)
    before = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
    trainer.train()
    trainer.close()
    assert trainer.guard.check_update and trainer.guard.skipped_steps == 2
    assert all(torch.equal(p, before[name]) for name, p in trainer.model.named_parameters())


def test_checksums_are_written_even_when_torch_is_told_to_skip_them(tmp_path: Path) -> None:
    from torch.utils.serialization import config

    config.save.compute_crc32 = False  # not monkeypatch: its undo deletes a torch config entry
    try:
        save_checkpoint(tmp_path / "c.pt", dict(step=1, model_config={}, vocab=[], model={"w": torch.ones(3)},
                                                optimizer={"state": {}}))
        assert config.save.compute_crc32 is False
    finally:
        config.save.compute_crc32 = True
    assert load_checkpoint(tmp_path / "c.pt")["step"] == 1


@pytest.mark.slow
def test_full_disk_under_ddp_is_one_line_and_exit_code_2(text_file: Path, small_tmpfs: Path) -> None:
    """Rank 0 cannot write its checkpoint: its one line is the job's only error line, exit code 2 (not the
    launcher's 'rank 0 failed' on top)."""
    out = small_tmpfs / "run"
    first = invoke("train", "--out", str(out), "--data", str(text_file), *TINY, "--steps", "8", "--checkpoint-every",
                   "4", "--stop-at", "4", "-q")  # one process, global batch 4; resumed below by 2 x 2
    assert first.exit_code == 0, first.output
    with (small_tmpfs / "filler").open("wb", buffering=0) as filler:
        with pytest.raises(OSError, match="No space left on device"):
            while True:
                filler.write(b"\0" * 4096)
        filler.truncate(filler.tell() - 32 * 1024)
    resumed = run_cli("train", "--out", str(out), "--resume", "--nproc-per-node", "2", "--batch-size", "2",
                      "--master-port", "0", "-q")
    errors = [line for line in resumed.stderr.splitlines() if line.startswith("error")]
    assert resumed.returncode == 2, resumed.stderr[-2000:]
    assert errors == [f"error: cannot write checkpoint to {out}: no space left on device; the previous checkpoint "
                      "(step 4) is intact"], resumed.stderr[-2000:]
    assert load_checkpoint(out / CHECKPOINT_NAME)["step"] == 4
