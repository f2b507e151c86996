"""The trainer under FSDP2 (``optimlab train --fsdp``): 2 gloo processes against one process (fsdp_worker.py),
clipping, the guard and the monitor on shards, the refusals, one process.

Tolerances of "2 processes with batch B under FSDP2 = 1 process with batch 2B" (issue 16, test 1), after
:data:`FSDP_STEPS` steps of the tiny GPT (losses ~4.4, parameters of magnitude < 1):

* **losses 2e-6, parameters 2e-6** (float32 reduction order). The two runs add the same numbers in another
  order: each rank's loss and gradient are means over 4 sequences, averaged by the reduce-scatter, instead of
  one mean over 8; clipping's global norm is a sum of the shards' squares. Each step's gradients thus differ
  in their last bits (~1e-7 relative); a logged loss of 4.4 has an ulp of 4.8e-7. Measured: losses 4.8e-7
  (one ulp), parameters 4.5e-7 (adamw), 6e-8 (lamb), 4e-9 (sgd-momentum, adafactor), 0 (lion).
* **muon: losses 1e-4, parameters 1e-3.** Muon's Newton–Schulz iteration runs in bfloat16 (its default
  ``ns_dtype``): a last-bit difference of the momentum moves some entries across a bf16 rounding boundary
  (2^-9 relative), and five bf16 iterations carry that into the update. Measured 2.2e-5 / 2.6e-4 (against a
  step of lr = 3e-3); the same runs with a float32 Newton–Schulz deviate by 4.8e-7 / 6.7e-8, i.e. the
  difference is bf16 rounding, not the sharding (the owner-rank Newton–Schulz itself is bit for bit:
  tests/optim/test_fsdp.py).
* **int8-state adamw: losses 1e-5, parameters 1e-4.** Its shards store exactly what one process stores
  (tests/optim/test_fsdp.py), but a last-bit difference of a moment can move it across an int8 rounding
  boundary (one code is 1/127 of its 256-value block's largest entry), which changes that coordinate's update
  by up to ~lr·1e-2; the margin allows a few such flips. Measured 4.8e-7 / 4.6e-7 (none in these 6 steps).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from train_helpers import FSDP_OPTIMIZERS, FSDP_STEPS, FSDP_STOP, invoke, run_two_ranks, tiny_config

from optimlab.train import trainer as trainer_module
from optimlab.train.checkpoint import load_checkpoint
from optimlab.train.dcp_checkpoint import SHARDED_LATEST_NAME, sharded_to_single
from optimlab.train.trainer import CHECKPOINT_NAME, Trainer

HERE = Path(__file__).resolve().parent
TOLERANCES = {"muon": (1e-4, 1e-3), "adamw-int8": (1e-5, 1e-4)}  # (losses, parameters); see the docstring
REDUCTION_ORDER = (2e-6, 2e-6)


def _train(config, **options) -> list[float]:
    trainer = Trainer(config, quiet=True, **options)
    try:
        return trainer.train().losses
    finally:
        trainer.close()


@pytest.fixture(scope="module")
def fsdp_runs(tmp_path_factory: pytest.TempPathFactory, text_file: Path) -> Path:
    """One-process references (batch 8, no FSDP) in ROOT/single-<name>, then the 2-process FSDP2 job (batch 4
    per rank) of fsdp_worker.py."""
    root = tmp_path_factory.mktemp("fsdp")
    small = root / "small.txt"  # 1500 characters: 9 validation windows of 16
    small.write_text(text_file.read_text(encoding="utf-8")[:1500], encoding="utf-8")
    _train(tiny_config(root / "single-small-eval", small, batch_size=8, steps=1))
    losses = _train(tiny_config(root / "single-adamw-accum2", text_file, batch_size=8, accum=2, steps=FSDP_STOP))
    (root / "single-adamw-accum2" / "losses.json").write_text(json.dumps(losses))
    for name in FSDP_OPTIMIZERS:
        losses = _train(tiny_config(root / f"single-{name}", text_file, batch_size=8, steps=FSDP_STEPS, optimizer=name,
                                    checkpoint_every=FSDP_STOP))
        (root / f"single-{name}" / "losses.json").write_text(json.dumps(losses))
    run_two_ranks(HERE / "fsdp_worker.py", str(root), str(text_file))
    return root


def _checkpoint(folder: Path) -> dict:
    """The run's latest checkpoint; a sharded one (``--fsdp``) read whole (``optimlab checkpoint convert``'s way)."""
    if (folder / SHARDED_LATEST_NAME).exists():
        return sharded_to_single(folder / SHARDED_LATEST_NAME, folder / "whole.pt")
    return load_checkpoint(folder / CHECKPOINT_NAME)


def _largest_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


@pytest.mark.slow
@pytest.mark.parametrize("name", FSDP_OPTIMIZERS)
def test_fsdp_two_processes_equal_one_process_with_twice_the_batch(fsdp_runs: Path, name: str) -> None:
    losses = [json.loads((fsdp_runs / folder / "losses.json").read_text()) for folder in (name, f"single-{name}")]
    sharded, single = _checkpoint(fsdp_runs / name), _checkpoint(fsdp_runs / f"single-{name}")
    assert len(losses[0]) == len(losses[1]) == FSDP_STEPS == sharded["step"] and sharded["world_size"] == 2
    loss_tolerance, parameter_tolerance = TOLERANCES.get(name, REDUCTION_ORDER)
    assert max(abs(a - b) for a, b in zip(*losses)) <= loss_tolerance, losses
    assert _largest_difference(sharded["model"], single["model"]) <= parameter_tolerance


@pytest.mark.slow
def test_fsdp_gradient_accumulation_equals_one_process(fsdp_runs: Path) -> None:
    # 2 micro-batches a step: each one's gradients reduce-scattered into the sharded gradients (no no_sync)
    losses = [json.loads((fsdp_runs / name / "losses.json").read_text()) for name in ("adamw-accum2",
                                                                                   "single-adamw-accum2")]
    assert len(losses[0]) == len(losses[1]) == FSDP_STOP
    assert max(abs(a - b) for a, b in zip(*losses)) <= REDUCTION_ORDER[0]
    sharded, single = _checkpoint(fsdp_runs / "adamw-accum2"), _checkpoint(fsdp_runs / "single-adamw-accum2")
    assert _largest_difference(sharded["model"], single["model"]) <= REDUCTION_ORDER[1]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["adamw", "adafactor"])
def test_fsdp_resume_continues_bit_for_bit(fsdp_runs: Path, name: str) -> None:
    # stopped at step 3 and resumed on 2 ranks (adafactor: replicated row/column state) = the run in one go
    resumed, straight = _checkpoint(fsdp_runs / f"{name}-resumed"), _checkpoint(fsdp_runs / name)
    assert resumed["step"] == straight["step"] == FSDP_STEPS and len(resumed["resumes"]) == 1
    assert _largest_difference(resumed["model"], straight["model"]) == 0.0
    for index, state in straight["optimizer"]["state"].items():
        for key, value in state.items():
            assert torch.equal(resumed["optimizer"]["state"][index][key], value), (index, key)


@pytest.mark.slow
def test_fsdp_evaluation_runs_the_same_forwards_on_every_rank(fsdp_runs: Path) -> None:
    # 9 validation windows: rank 0 evaluates 5 (2 batches of 4), rank 1 only 4, yet both must run the same
    # forwards (FSDP2 all-gathers in each; one rank short would hang the other); the padding forward weighs 0
    losses = [json.loads((fsdp_runs / name / "summary.json").read_text())["val_loss"] for name in
              ("small-eval", "single-small-eval")]
    assert losses[0] == pytest.approx(losses[1], abs=REDUCTION_ORDER[0])


@pytest.mark.slow
def test_single_file_checkpoint_resumes_under_fsdp(fsdp_runs: Path) -> None:
    # single-adamw's step-3 checkpoint continued on 2 ranks under FSDP2 = single-adamw's own steps 4-6
    resumed, single = _checkpoint(fsdp_runs / "adamw-from-single"), _checkpoint(fsdp_runs / "single-adamw")
    assert resumed["step"] == FSDP_STEPS and resumed["resumes"][0]["step"] == FSDP_STOP
    assert _largest_difference(resumed["model"], single["model"]) <= REDUCTION_ORDER[1]


@pytest.mark.slow
def test_sharded_checkpoint_resumes_in_one_process(fsdp_runs: Path, tmp_path: Path, text_file: Path) -> None:
    # the 2-rank FSDP2 run's sharded step-3 checkpoint continued in one process without FSDP (resharded by DCP)
    config = tiny_config(tmp_path, text_file, batch_size=8, steps=FSDP_STEPS)
    losses = _train(config, resume_from=fsdp_runs / "adamw" / f"checkpoint.step{FSDP_STOP}.dcp")
    single = json.loads((fsdp_runs / "single-adamw" / "losses.json").read_text())
    assert max(abs(a - b) for a, b in zip(losses, single[FSDP_STOP:])) <= REDUCTION_ORDER[0]
    assert _largest_difference(_checkpoint(tmp_path)["model"], _checkpoint(fsdp_runs / "single-adamw")["model"]) <= (
        REDUCTION_ORDER[1])


@pytest.fixture(scope="module")
def agreement(fsdp_runs: Path) -> list[dict]:
    return [json.loads((fsdp_runs / f"agreement-rank{rank}.json").read_text()) for rank in (0, 1)]


@pytest.mark.slow
def test_clipping_norm_is_global_and_agreed_by_all_ranks(agreement: list[dict]) -> None:
    # [unsharded norm, sharded norm] on each rank: the shards' squares all-reduced give the whole gradient's norm
    assert agreement[0]["norm"][1] == agreement[1]["norm"][1]
    for rank in agreement:
        assert rank["norm"][1] == pytest.approx(rank["norm"][0], rel=1e-6)
        assert rank["clipped_grad_deviation"] < 1e-7  # gradients of magnitude ~0.1 after clipping to norm 1
        assert rank["value_clip"][1][1] is True and rank["value_clip"][1][0] == pytest.approx(rank["value_clip"][0][0],
                                                                                              rel=1e-6)


@pytest.mark.slow
def test_an_inf_in_one_ranks_shard_skips_the_step_on_every_rank(agreement: list[dict]) -> None:
    for rank in agreement:
        assert rank["skipped"] is True and rank["unchanged_after_skip"] is True
        # check_update: an update that overflows in rank 1's shard only is rolled back on both ranks
        assert rank["rolled_back"] is True and rank["unchanged_after_rollback"] is True


@pytest.mark.slow
def test_monitor_records_the_whole_tensors_figures(agreement: list[dict]) -> None:
    for rank in agreement:
        unsharded, sharded = rank["monitor"]
        assert sharded.keys() == unsharded.keys() and "eff_lr_mean/group0" in sharded
        for key, value in unsharded.items():
            assert sharded[key] == pytest.approx(value, rel=1e-6), key
    assert agreement[0]["monitor"][1] == agreement[1]["monitor"][1]


@pytest.mark.parametrize("name", ["adamw", "schedule-free-adamw"])
def test_fsdp_in_one_process_equals_the_unsharded_run(tmp_path: Path, text_file: Path, name: str) -> None:
    # --fsdp without --nproc-per-node: a one-rank process group, every parameter a DTensor of one shard; the
    # same losses, validation losses (schedule-free: on its evaluation weights) and generated text
    runs = {}
    for fsdp in (False, True):
        trainer = Trainer(tiny_config(tmp_path / f"fsdp{fsdp}", text_file, steps=4, fsdp=fsdp, optimizer=name,
                                      sample_chars=10), quiet=True)
        try:
            result = trainer.train()
        finally:
            trainer.close()
        runs[fsdp] = (result.losses, result.val_losses, result.sample)
    assert runs[True] == runs[False] and len(runs[True][2]) == 10
    models = [_checkpoint(tmp_path / f"fsdp{fsdp}")["model"] for fsdp in (False, True)]
    assert _largest_difference(*models) == 0.0
    assert not torch.distributed.is_initialized()  # the trainer left the group it created


@pytest.mark.parametrize(("options", "message"), [
    (["--zero"], "error: Invalid fsdp: --fsdp and --zero are mutually exclusive"),
    (["--ema", "0.99"], "error: Invalid ema: --ema is not supported with --fsdp"),
    (["--clip", "agc:0.01"], "error: Invalid clip: 'agc:0.01' is not supported with --fsdp"),
    (["--optimizer", "prodigy", "--nproc-per-node", "2"],
     "error: Invalid optimizer: 'prodigy' with --fsdp: Prodigy cannot update sharded (DTensor) parameters"),
])
def test_bad_fsdp_combinations_are_one_line_errors_before_any_work(tmp_path: Path, text_file: Path,
                                                                 options: list[str], message: str) -> None:
    out = tmp_path / "run"
    result = invoke("train", "--out", str(out), "--data", str(text_file), "--fsdp", *options)
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith(message) and result.stderr.count("\n") == 1, result.stderr
    assert not out.exists()


def test_optimizer_without_weight_decay_trains(tmp_path: Path, text_file: Path) -> None:
    result = invoke("train", "--out", str(tmp_path), "--data", str(text_file), "--block-size", "16", "--n-layer", "1",
                    "--n-embd", "8", "--n-head", "1", "--steps", "2", "--sample-chars", "0", "--no-tensorboard",
                    "--device", "cpu", "--optimizer", "rprop")
    assert result.exit_code == 0, result.output
    assert "note: rprop takes no weight decay; --weight-decay 0.1 is not applied" in result.stdout
    assert _checkpoint(tmp_path)["step"] == 2


def test_resume_reads_the_checkpoint_once(tmp_path: Path, text_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    args = ["train", "--out", str(tmp_path), "--data", str(text_file), "--block-size", "16", "--n-layer", "1",
            "--n-embd", "8", "--n-head", "1", "--steps", "2", "--sample-chars", "0", "--no-tensorboard", "--device",
            "cpu", "-q"]
    assert invoke(*args, "--stop-at", "1").exit_code == 0
    reads = []
    read = trainer_module.read_training_checkpoint
    monkeypatch.setattr(trainer_module, "read_training_checkpoint", lambda path: reads.append(path) or read(path))
    assert invoke("train", "--out", str(tmp_path), "--resume", "-q").exit_code == 0
    assert reads == [tmp_path / CHECKPOINT_NAME]
    assert _checkpoint(tmp_path)["step"] == 2


def test_fsdp_shards_each_block_with_bf16_compute(tmp_path: Path, text_file: Path) -> None:
    # one process (a one-rank group): FSDP2's sharding and policies apply all the same
    trainer = Trainer(tiny_config(tmp_path, text_file, n_layer=3, fsdp=True, precision="bf16"), quiet=True)
    try:
        seen = []
        hooks = [block.attn.c_attn.register_forward_hook(lambda module, args, out: seen.append(module.weight.dtype))
                 for block in trainer.model.blocks]
        inputs, targets = next(trainer._micro_batches())
        trainer.model(inputs, targets)
        for hook in hooks:
            hook.remove()
        assert seen == [torch.bfloat16] * 3  # parameters gathered and used in bf16 (MixedPrecisionPolicy)
        blocks = trainer.model.blocks
        # after the forward every block but the last is resharded; the last keeps its gathered parameters
        assert [type(block.attn.c_attn.weight).__name__ for block in blocks] == ["DTensor", "DTensor", "Parameter"]
        assert all(p.dtype == torch.float32 for p in trainer.optimizer.param_groups[0]["params"])  # float32 shards
    finally:
        trainer.close()
