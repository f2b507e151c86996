"""``optimlab checkpoint convert|verify``: a trainer's checkpoint to the sharded layout and back, bit for bit, and
one-line errors (exit code 2) for a checkpoint of another layout, a foreign or damaged one, or a taken target."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from train_helpers import invoke, tiny_config

from optimlab.optim.groups import param_groups
from optimlab.optim.registry import create_optimizer
from optimlab.train.checkpoint import load_checkpoint
from optimlab.train.dcp_checkpoint import MANIFEST_NAME, load_sharded
from optimlab.train.model import GPT, GPTConfig
from optimlab.train.trainer import Trainer


def _same(first: Any, second: Any) -> bool:
    """Equal values, tensors and arrays bit for bit, through dicts, lists and tuples."""
    if isinstance(first, torch.Tensor):
        return isinstance(second, torch.Tensor) and first.dtype == second.dtype and torch.equal(first, second)
    if isinstance(first, np.ndarray):
        return isinstance(second, np.ndarray) and np.array_equal(first, second)
    if isinstance(first, dict):
        return isinstance(second, dict) and first.keys() == second.keys() and all(
            _same(first[k], second[k]) for k in first)
    if isinstance(first, (list, tuple)):
        return type(first) is type(second) and len(first) == len(second) and all(map(_same, first, second))
    return first == second


def _one_line_error(result: Any) -> str:
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in result.output, result.output
    return lines[0]


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory, text_file: Path) -> Path:
    """A trainer's run stopped (and checkpointed) at step 2 of 4."""
    out = tmp_path_factory.mktemp("convert") / "run"
    trainer = Trainer(tiny_config(out, text_file, steps=4, checkpoint_every=2, layer_decay=0.8), quiet=True)
    trainer.train(stop_at=2)
    trainer.close()
    return out


@pytest.fixture(scope="module")
def converted(run: Path) -> tuple[Path, Path]:
    sharded, back = run.parent / "sharded", run.parent / "back.pt"
    to_sharded = invoke("checkpoint", "convert", str(run / "checkpoint.pt"), str(sharded))
    assert to_sharded.exit_code == 0, to_sharded.output
    assert f"-> {sharded} (sharded;" in to_sharded.stdout
    to_single = invoke("checkpoint", "convert", str(sharded), str(back))
    assert to_single.exit_code == 0, to_single.output
    assert f"(sharded, step 2 of a run on 1 rank(s)) -> {back} (single file)" in to_single.stdout
    return sharded, back


def test_round_trip_is_bit_for_bit(run: Path, converted: tuple[Path, Path]) -> None:
    original, back = load_checkpoint(run / "checkpoint.pt"), load_checkpoint(converted[1])
    assert original.keys() == back.keys()
    for key in original:
        assert _same(original[key], back[key]), key


def test_the_sharded_checkpoint_loads_into_the_trainers_model_by_name(run: Path, converted: tuple[Path, Path]) -> None:
    """The optimizer state of each parameter lands on that parameter (a permuted naming would round-trip, not this)."""
    original = load_checkpoint(run / "checkpoint.pt")
    settings = original["train_config"]
    model = GPT(GPTConfig(**original["model_config"]))
    groups = param_groups(model, settings["weight_decay"], layer_decay=settings["layer_decay"], lr=settings["lr"])
    optimizer = create_optimizer(groups, settings["optimizer"], lr=settings["lr"],
                                 weight_decay=settings["weight_decay"])
    extra = load_sharded(converted[0], model, optimizer)
    assert extra["step"] == 2 and _same(extra["rng"], original["rng"])
    assert _same(model.state_dict(), original["model"])
    assert _same(optimizer.state_dict(), original["optimizer"])


def test_the_converted_file_resumes_like_the_original_with_and_without_fsdp(
        run: Path, converted: tuple[Path, Path], text_file: Path, tmp_path: Path) -> None:
    """The single file, its conversion back and the sharded folder, resumed without and with --fsdp (one process: a
    one-rank group, bit for bit the unsharded run): the same losses."""
    losses = {}
    for name, source, fsdp in (("original", run / "checkpoint.pt", False), ("converted", converted[1], False),
                               ("single-fsdp", run / "checkpoint.pt", True), ("sharded-fsdp", converted[0], True)):
        trainer = Trainer(tiny_config(tmp_path / name, text_file, steps=4, checkpoint_every=2, layer_decay=0.8,
                                      fsdp=fsdp), quiet=True, resume_from=source)
        losses[name] = trainer.train().losses
        trainer.close()
    assert len(losses["original"]) == 2 and all(value == losses["original"] for value in losses.values()), losses


@pytest.mark.parametrize("name", ["muon", "sgd"])
def test_conversion_of_regrouping_and_stateless_optimizers(tmp_path: Path, text_file: Path, name: str) -> None:
    """Muon regroups its parameters (matrices, embeddings, the rest); plain SGD has no state, which DCP does not
    store: both convert to the sharded layout and back bit for bit, and the sharded copy resumes like the file."""
    from optimlab.train.dcp_checkpoint import sharded_to_single, single_to_sharded

    trainer = Trainer(tiny_config(tmp_path / "run", text_file, steps=2, checkpoint_every=2, optimizer=name),
                      quiet=True)
    trainer.train()
    trainer.close()
    single_to_sharded(tmp_path / "run" / "checkpoint.pt", tmp_path / "sharded")
    back = sharded_to_single(tmp_path / "sharded", tmp_path / "back.pt")
    original = load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    assert _same(back["optimizer"], original["optimizer"]) and _same(back["model"], original["model"])
    losses = []
    for source in (tmp_path / "run" / "checkpoint.pt", tmp_path / "sharded"):
        resumed = Trainer(tiny_config(tmp_path / source.name / "resumed", text_file, steps=3, checkpoint_every=2,
                                      optimizer=name), quiet=True, resume_from=source)
        losses.append(resumed.train().losses)
        resumed.close()
    assert len(losses[0]) == 1 and losses[0] == losses[1]


def test_verify(run: Path, converted: tuple[Path, Path]) -> None:
    single = invoke("checkpoint", "verify", str(run / "checkpoint.pt"))
    assert single.exit_code == 0 and "is a single-file checkpoint of step 2" in single.stdout
    sharded = invoke("checkpoint", "verify", str(converted[0]))
    assert sharded.exit_code == 0
    assert "is a sharded checkpoint of step 2, written by 1 rank(s); 3 files" in sharded.stdout


def test_bad_sources_and_targets_are_one_line(run: Path, converted: tuple[Path, Path], tmp_path: Path) -> None:
    sharded, back = converted
    new = tmp_path / "new"
    assert _one_line_error(invoke("checkpoint", "convert", str(tmp_path / "missing"), str(new))).startswith(
        f"error: No checkpoint at {tmp_path / 'missing'}")
    assert _one_line_error(invoke("checkpoint", "convert", str(sharded), str(back))) == (
        f"error: Invalid TARGET: {back} already exists (convert writes a new file or folder, never over one)")
    text = tmp_path / "notes.txt"
    text.write_text("not a checkpoint\n")
    assert "is damaged: not a readable archive" in _one_line_error(invoke("checkpoint", "convert", str(text), str(new)))
    foreign = tmp_path / "weights.pt"
    torch.save({"weight": torch.ones(2)}, foreign)  # a torch file, not a training checkpoint
    assert _one_line_error(invoke("checkpoint", "convert", str(foreign), str(new))) == (
        f"error: {foreign} is not an optimlab training checkpoint (optimlab.train.checkpoint/1)")
    half = tmp_path / "half"
    half.mkdir()
    (half / ".metadata").write_bytes(b"\0" * 8)  # a DCP folder of another program, or an interrupted write
    assert f"has no {MANIFEST_NAME}" in _one_line_error(invoke("checkpoint", "verify", str(half)))
    assert not new.exists()


def test_a_sharded_checkpoint_resumes_without_fsdp_as_its_single_file(run: Path, converted: tuple[Path, Path],
                                                                       tmp_path: Path) -> None:
    # the trainer reads either layout: the sharded copy continues the run exactly like the file it came from
    for name, source in (("from-file", run / "checkpoint.pt"), ("from-sharded", converted[0])):
        result = invoke("train", "--out", str(tmp_path / name), "--resume-from", str(source), "-q")
        assert result.exit_code == 0, result.output
    models = [load_checkpoint(tmp_path / name / "checkpoint.pt")["model"] for name in ("from-file", "from-sharded")]
    assert _same(*models)


def test_a_sharded_checkpoint_cannot_resume_under_zero(converted: tuple[Path, Path], tmp_path: Path) -> None:
    line = _one_line_error(invoke("train", "--out", str(tmp_path / "other"), "--resume-from", str(converted[0]),
                                  "--zero", "--nproc-per-node", "2", "--batch-size", "2", "--master-port", "0"))
    assert line == (f"error: Invalid zero: {converted[0]} is a sharded checkpoint, which --zero cannot load; resume "
                    "it with --fsdp or without --zero, or convert it with `optimlab checkpoint convert`")
    assert not (tmp_path / "other").exists()


def test_a_damaged_sharded_checkpoint_is_refused_by_convert(converted: tuple[Path, Path], tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    import shutil

    shutil.copytree(converted[0], copy)
    shard = copy / "__0_0.distcp"
    data = bytearray(shard.read_bytes())
    data[-10] ^= 0xFF
    shard.write_bytes(bytes(data))
    assert _one_line_error(invoke("checkpoint", "convert", str(copy), str(tmp_path / "x.pt"))) == (
        f"error: Checkpoint file {shard.resolve()} is damaged: it fails its CRC-32 checksum")
    assert not (tmp_path / "x.pt").exists()
