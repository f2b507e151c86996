"""``optimlab train --ema DECAY``: an EMA of the weights (optimlab.optim.swa_utils.AveragedModel) updated after
every optimizer step, evaluated (``ema_val_loss``) and checkpointed, with an exact resume."""

from __future__ import annotations

import csv
import dataclasses
from pathlib import Path

import pytest
import torch
from train_helpers import invoke, tiny_config

from optimlab.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from optimlab.train.checkpoint import load_checkpoint
from optimlab.train.model import GPT, GPTConfig
from optimlab.train.trainer import CHECKPOINT_NAME, METRICS_NAME, Trainer

DECAY = 0.8


def _run(config, stop_at: int | None = None, resume: bool = False) -> Trainer:
    trainer = Trainer(config, quiet=True, resume=resume)
    try:
        trainer.train(stop_at=stop_at)
    finally:
        trainer.close()
    return trainer


def _rows(out_dir: Path) -> list[dict[str, str]]:
    with (out_dir / METRICS_NAME).open(newline="") as handle:
        return [{k: v for k, v in row.items() if k not in ("tokens_per_s", "elapsed_s")}
                for row in csv.DictReader(handle)]


def test_ema_is_updated_each_step_evaluated_and_checkpointed(tmp_path: Path, text_file: Path) -> None:
    """The EMA equals an AveragedModel fed the model after each step (replayed from a twin run that records
    the weights); its validation loss is logged and equals evaluating the checkpointed EMA weights."""
    config = tiny_config(tmp_path / "ema", text_file, steps=6, eval_every=3, ema=DECAY)
    trainer = Trainer(config, quiet=True)
    snapshots = []
    original = trainer.policy.step

    def recording_step(*args, **kwargs):
        outcome = original(*args, **kwargs)
        snapshots.append({k: v.detach().clone() for k, v in trainer.model.state_dict().items()})
        return outcome

    trainer.policy.step = recording_step
    try:
        trainer.train()
    finally:
        trainer.close()
    expected = AveragedModel(GPT(trainer.model_config), multi_avg_fn=get_ema_multi_avg_fn(DECAY))
    replay = GPT(trainer.model_config)
    for snapshot in snapshots:
        replay.load_state_dict(snapshot)
        expected.update_parameters(replay)
    saved = load_checkpoint(tmp_path / "ema" / CHECKPOINT_NAME)["ema"]
    assert int(saved["n_averaged"]) == 6
    for key, value in expected.state_dict().items():
        assert torch.equal(saved[key], value), key
    rows = [r for r in _rows(tmp_path / "ema") if r["ema_val_loss"]]
    assert [r["step"] for r in rows] == ["0", "3", "6"]
    assert rows[0]["ema_val_loss"] == rows[0]["val_loss"]  # step 0: the EMA is the initial model
    assert rows[-1]["ema_val_loss"] != rows[-1]["val_loss"]
    assert float(rows[-1]["ema_val_loss"]) == pytest.approx(trainer.evaluate(trainer.ema.module), rel=1e-5)


def test_resume_with_ema_is_bitwise_exact(tmp_path: Path, text_file: Path) -> None:
    settings = dict(steps=8, log_every=2, eval_every=2, checkpoint_every=4, ema=DECAY, dropout=0.1)
    full = _run(tiny_config(tmp_path / "full", text_file, **settings))
    _run(tiny_config(tmp_path / "split", text_file, **settings), stop_at=4)
    resumed = _run(tiny_config(tmp_path / "split", text_file, **settings), resume=True)
    for (key, value), other in zip(full.ema.state_dict().items(), resumed.ema.state_dict().values()):
        assert torch.equal(value, other), key
    assert _rows(tmp_path / "split") == _rows(tmp_path / "full")


def test_without_ema_nothing_changes(tmp_path: Path, text_file: Path) -> None:
    trainer = _run(tiny_config(tmp_path / "plain", text_file, steps=3))
    assert trainer.ema is None
    assert load_checkpoint(tmp_path / "plain" / CHECKPOINT_NAME)["ema"] is None
    assert "ema_val_loss" not in _rows(tmp_path / "plain")[0]


@pytest.mark.parametrize("value", ["0", "1", "1.5", "-0.1"])
def test_bad_decay_is_one_line_and_exit_2(tmp_path: Path, text_file: Path, value: str) -> None:
    result = invoke("train", "--out", str(tmp_path / "bad"), "--data", str(text_file), "--ema", value, "-q")
    assert result.exit_code == 2
    assert f"Invalid ema: {float(value)} (accepted range: (0, 1)" in result.output
    assert not (tmp_path / "bad").exists()


def test_resume_cannot_change_the_decay(tmp_path: Path, text_file: Path) -> None:
    config = tiny_config(tmp_path / "run", text_file, steps=4, ema=DECAY)
    _run(config, stop_at=2)
    with pytest.raises(ValueError, match="ema: checkpoint 0.8, this run 0.9"):
        Trainer(dataclasses.replace(config, ema=0.9), quiet=True, resume=True)
