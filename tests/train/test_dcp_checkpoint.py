"""Sharded checkpoints (``optimlab.train.dcp_checkpoint``): exact resume, resharding, atomic writes, verified reads.

Tolerances:

* resume on the same number of ranks: **bit for bit** (losses and every parameter): DCP stores each shard's
  bytes, and the continued steps run the same kernels on the same shards.
* resume on another number of ranks (2 -> 1, 1 -> 2): the loaded model and optimizer state equal the saved ones
  **bit for bit** (DCP reassembles the global tensors from the other number of shards; without this check a lost
  Adafactor state would pass, its losses after 3 steps moving by 4e-7 only), and the continued losses equal within
  **1e-5 relative**. What differs is float32 reduction order afterwards: one process takes the mean over 8
  sequences where two ranks average two means of 4, and FSDP2's reduce-scatter averages two half-batch gradients.
  Over 3 steps that moved the losses (about 3.19) by at most 1.2e-6 (3.7e-7 relative, 5 float32 ulps); 1e-5
  leaves room for the optimizer's amplification of a last-bit gradient difference (Adam divides by sqrt(v)).
"""

from __future__ import annotations

import errno
import os
import shutil
import signal
from pathlib import Path

import dcp_kill
import pytest
import torch
from dcp_worker import SAVE_AT, STEPS, single_from_sharded, single_process
from train_helpers import run_two_ranks

from optimlab.train.checkpoint import CheckpointError, CheckpointWriteError, load_checkpoint, save_checkpoint
from optimlab.train.dcp_checkpoint import (
    MANIFEST_NAME,
    SHARDED_KEY,
    ShardedCheckpointFiles,
    checkpoint_layout,
    intact_previous,
    latest_checkpoint,
    load_sharded,
    read_training_checkpoint,
    save_sharded,
    verify_sharded,
)

HERE = Path(__file__).resolve().parent
OPTIMIZERS = ("muon", "adafactor")  # muon: Newton-Schulz owners and AdamW state; adafactor: factored moments
RESHARD_RTOL = 1e-5


def _small() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))
    return model, torch.optim.AdamW(model.parameters(), lr=0.1)


def _step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, seed: int) -> None:
    inputs = torch.randn(4, 6, generator=torch.Generator().manual_seed(seed))
    model(inputs).square().mean().backward()
    optimizer.step()
    optimizer.zero_grad()


def _trained(steps: int = 2) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    model, optimizer = _small()
    for seed in range(steps):
        _step(model, optimizer, seed)
    return model, optimizer


def _differences(first: object, second: object, where: str = "") -> list[str]:
    """Where two states differ (keys, values; tensors bit for bit), through nested dicts and lists."""
    if isinstance(first, dict) and isinstance(second, dict):
        if first.keys() != second.keys():
            return [f"{where} keys {sorted(map(str, first.keys() ^ second.keys()))}"]
        return [found for key in first for found in _differences(first[key], second[key], f"{where}.{key}")]
    if isinstance(first, list) and isinstance(second, list) and len(first) == len(second):
        return [found for i, pair in enumerate(zip(first, second)) for found in _differences(*pair, f"{where}[{i}]")]
    if isinstance(first, torch.Tensor) and isinstance(second, torch.Tensor):
        return [] if torch.equal(first, second) else [where]
    return [] if type(first) is type(second) and first == second else [where]


def _equal_states(first: dict, second: dict) -> bool:
    return not _differences(first, second)


# ---------------------------------------------------------------- 1. exact resume and resharding (2 gloo ranks)


@pytest.fixture(scope="module")
def scenarios(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("dcp")
    single = {name: single_process(root / name, name) for name in OPTIMIZERS}  # before the job, which loads it
    run_two_ranks(HERE / "dcp_worker.py", str(root), ",".join(OPTIMIZERS), timeout=300)
    return {name: {"single": single[name], "sharded": torch.load(root / name / "sharded.pt", weights_only=False),
                   "from_sharded": single_from_sharded(root / name, name), "root": root / name}
            for name in OPTIMIZERS}


@pytest.mark.slow
@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_sharded_resume_on_the_same_ranks_is_bit_for_bit(scenarios: dict, optimizer: str) -> None:
    run = scenarios[optimizer]["sharded"]
    assert run["resumed"] == run["losses"][SAVE_AT:] and len(run["resumed"]) == STEPS - SAVE_AT
    assert run["parameters"].keys() == run["resumed_parameters"].keys()
    for name, value in run["parameters"].items():
        assert torch.equal(value, run["resumed_parameters"][name]), name
    assert run["extra"]["step"] == SAVE_AT and run["extra"]["position"] == {"epoch": 1, "batch": 7 + SAVE_AT}
    assert isinstance(run["extra"]["rng"], torch.Tensor)
    assert Path(run["written"]).name == f"checkpoint.step{SAVE_AT}.dcp"


@pytest.mark.slow
@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_resume_on_another_number_of_ranks_reshards(scenarios: dict, optimizer: str) -> None:
    scenario = scenarios[optimizer]
    sharded = scenario["sharded"]["losses"]
    (single, single_saved), sharded_saved = scenario["single"], scenario["sharded"]["saved"]
    from_sharded, extra, loaded_state = scenario["from_sharded"]  # 2 ranks -> 1 unsharded process
    from_single = scenario["sharded"]["from_single"]  # 1 unsharded process -> 2 ranks
    assert extra["step"] == SAVE_AT
    # the states load exactly, whole tensors reassembled from the other number of shards...
    assert _differences(loaded_state, sharded_saved) == []
    assert _differences(scenario["sharded"]["loaded_from_single"], single_saved) == []
    # ... and the runs continue to float32 reduction order
    torch.testing.assert_close(torch.tensor(from_sharded), torch.tensor(sharded[SAVE_AT:]), rtol=RESHARD_RTOL, atol=0)
    torch.testing.assert_close(torch.tensor(from_single), torch.tensor(single[SAVE_AT:]), rtol=RESHARD_RTOL, atol=0)
    payload = read_training_checkpoint(scenario["root"] / "sharded" / "checkpoint.dcp")
    assert payload["step"] == SAVE_AT and payload[SHARDED_KEY] == str(Path(scenario["sharded"]["written"]))
    assert verify_sharded(scenario["root"] / "sharded" / "checkpoint.dcp")["world_size"] == 2


# ---------------------------------------------------------------- 2. versions, atomic writes


def test_versions_link_and_keep(tmp_path: Path) -> None:
    model, optimizer = _trained(1)
    files = ShardedCheckpointFiles(tmp_path, keep=2)
    for step in (1, 2, 3):
        written = files.save(model, optimizer, {"step": step})
        assert written == tmp_path / f"checkpoint.step{step}.dcp"
        assert os.readlink(files.latest) == written.name
    assert [step for step, _ in files.versions()] == [3, 2]  # keep=2: step 1 went after the flip to step 3
    assert [step for step, _ in files.previous()] == [2]
    again = files.save(model, optimizer, {"step": 3})  # the same step once more: a new folder, then the flip
    assert again.name == "checkpoint.step3.r1.dcp" and files.current() == again.resolve()
    assert [path.name for _, path in files.versions()] == ["checkpoint.step3.r1.dcp", "checkpoint.step3.dcp"]
    files.remove_all()
    assert not files.latest.is_symlink() and files.versions() == []


def test_save_and_load_round_trip_in_one_process(tmp_path: Path) -> None:
    model, optimizer = _trained(2)
    save_sharded(tmp_path / "checkpoint.dcp", model, optimizer, {"step": 2, "rng": torch.get_rng_state()})
    other, other_optimizer = _small()
    extra = load_sharded(tmp_path / "checkpoint.dcp", other, other_optimizer)
    assert extra["step"] == 2 and torch.equal(extra["rng"], torch.get_rng_state())
    assert _equal_states(model.state_dict(), other.state_dict())
    assert _equal_states(optimizer.state_dict(), other_optimizer.state_dict())
    _step(model, optimizer, 9)
    _step(other, other_optimizer, 9)  # and the next step is the same
    assert _equal_states(model.state_dict(), other.state_dict())


@pytest.mark.parametrize("name", ["sgd", "sgd-momentum", "lion", "schedule-free-adamw", "muon", "adafactor", "lamb",
                                  "adamw-int8"])
def test_every_kind_of_optimizer_state_continues_bit_for_bit(tmp_path: Path, name: str) -> None:
    """Stateless SGD (torch's template step with lr 0 creates no state), group-level state (schedule-free's weight
    sum), Muon's two sub-rules, factored and quantised state: saved, loaded into a fresh copy, the next steps equal."""
    from optimlab.optim.registry import create_optimizer

    def build() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))
        return model, create_optimizer(model, name, lr=0.01)

    model, optimizer = build()
    for seed in range(2):
        _step(model, optimizer, seed)
    save_sharded(tmp_path / "checkpoint.dcp", model, optimizer, {"step": 2})
    other, other_optimizer = build()
    _step(other, other_optimizer, 7)  # another state than the checkpoint's
    load_sharded(tmp_path / "checkpoint.dcp", other, other_optimizer)
    assert _differences(other_optimizer.state_dict(), optimizer.state_dict()) == []
    for seed in (2, 3):
        _step(model, optimizer, seed)
        _step(other, other_optimizer, seed)
    assert _differences(other.state_dict(), model.state_dict()) == []


@pytest.mark.parametrize("point", ["write", "rename", "flip"])
def test_a_write_killed_at_any_point_keeps_the_last_good_checkpoint(tmp_path: Path, point: str) -> None:
    child = os.fork()  # a copy of this process saves and is SIGKILLed at the point (dcp_kill.py)
    if child == 0:
        try:
            dcp_kill.main(tmp_path, point)
        finally:
            os._exit(3)  # not killed: the test fails below
    _, status = os.waitpid(child, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, status
    files = ShardedCheckpointFiles(tmp_path)
    assert os.readlink(files.latest) == "checkpoint.step1.dcp"
    model, optimizer = _small()
    assert load_sharded(files.latest, model, optimizer) == {"step": 1}
    assert _equal_states(model.state_dict(), torch.load(tmp_path / "step1.pt"))
    (leftover,) = list(tmp_path.glob(".checkpoint.dcp.*.tmp"))
    if point == "flip":  # the new link, not yet renamed over the old
        assert leftover.is_symlink() and os.readlink(leftover) == "checkpoint.step2.dcp"
    elif point == "rename":  # the finished folder, not yet renamed
        assert verify_sharded(leftover)["step"] == 2
    else:  # the shards, no manifest yet
        assert list(leftover.glob("*.distcp")) and not (leftover / MANIFEST_NAME).exists()
    assert files.clean_temporaries() == [leftover]
    assert not list(tmp_path.glob(".checkpoint.dcp.*"))
    if point == "flip":  # the new version was complete: it is kept as a previous one, intact
        assert [(step, verify_sharded(path)["step"]) for step, path in files.previous()] == [(2, 2)]


def test_a_full_disk_is_one_line_and_keeps_the_last_good_checkpoint(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    model, optimizer = _trained(1)
    files = ShardedCheckpointFiles(tmp_path)
    files.save(model, optimizer, {"step": 1})

    def full(descriptor: int) -> None:  # DCP fsyncs every file it writes
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(CheckpointWriteError) as caught:
        files.save(model, optimizer, {"step": 2})
    monkeypatch.undo()
    assert str(caught.value) == (f"cannot write checkpoint to {tmp_path}: rank 0: no space left on device; the "
                                 "previous checkpoint checkpoint.step1.dcp is intact")
    assert os.readlink(files.latest) == "checkpoint.step1.dcp" and [s for s, _ in files.versions()] == [1]
    assert not list(tmp_path.glob(".checkpoint.dcp.*"))  # the temporary folder is gone
    assert load_sharded(files.latest, *_small()) == {"step": 1}


def test_extra_must_name_its_step(tmp_path: Path) -> None:
    model, optimizer = _trained(1)
    with pytest.raises(ValueError, match=r"Invalid extra\['step'\]: None"):
        save_sharded(tmp_path / "checkpoint.dcp", model, optimizer, {"rng": 1})
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- 3. verified on read


@pytest.fixture
def saved(tmp_path: Path) -> Path:
    model, optimizer = _trained(2)
    return save_sharded(tmp_path / "checkpoint.dcp", model, optimizer, {"step": 2})


def _load_error(path: Path) -> str:
    model, optimizer = _small()
    with pytest.raises(CheckpointError) as caught:
        load_sharded(path, model, optimizer)
    message = str(caught.value)
    assert "\n" not in message
    return message


def test_a_flipped_byte_is_refused_naming_the_file(saved: Path) -> None:
    shard = saved / "__0_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))
    assert _load_error(saved.parent / "checkpoint.dcp") == (
        f"Checkpoint file {shard} is damaged: it fails its CRC-32 checksum")


def test_a_truncated_or_missing_file_is_refused(saved: Path) -> None:
    metadata = saved / ".metadata"
    whole = metadata.read_bytes()
    metadata.write_bytes(whole[:100])
    assert _load_error(saved) == (f"Checkpoint file {metadata} is damaged: 100 bytes, the manifest says {len(whole)} "
                                  "(truncated or overwritten)")
    metadata.write_bytes(whole)
    (saved / "extra.pt").unlink()
    assert _load_error(saved) == f"Checkpoint {saved} is incomplete: {saved / 'extra.pt'} is missing"


def test_a_folder_without_manifest_is_refused(saved: Path) -> None:
    (saved / MANIFEST_NAME).unlink()
    assert _load_error(saved) == (f"{saved} is not a complete optimlab sharded checkpoint: it has no {MANIFEST_NAME} "
                                  "(its write was interrupted, or another program wrote it)")


def test_another_layout_is_one_line(saved: Path, tmp_path: Path) -> None:
    single = tmp_path / "checkpoint.pt"
    save_checkpoint(single, {"step": 1})
    assert _load_error(single).startswith(f"{single} is a single-file checkpoint, not a sharded")
    assert checkpoint_layout(single) == "single" and checkpoint_layout(saved) == "sharded"
    with pytest.raises(CheckpointError, match=r"is a folder \(a sharded checkpoint\?\), not a single-file"):
        load_checkpoint(saved)
    assert _load_error(tmp_path / "nothing") == f"No sharded checkpoint at {tmp_path / 'nothing'}"


def test_nonfinite_state_is_refused_on_load(tmp_path: Path) -> None:
    model, optimizer = _trained(1)
    with torch.no_grad():
        model[0].weight[1, 2] = float("nan")
    save_sharded(tmp_path / "checkpoint.dcp", model, optimizer, {"step": 1})
    message = _load_error(tmp_path / "checkpoint.dcp")
    assert message.endswith("(step 1) holds non-finite values in model.0.weight"), message


def test_a_checkpoint_of_another_model_is_refused(saved: Path) -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3))
    with pytest.raises(CheckpointError, match="does not fit this model and optimizer"):
        load_sharded(saved, model, torch.optim.AdamW(model.parameters()))


def test_entries_the_model_lacks_are_refused_not_dropped(tmp_path: Path) -> None:
    model, optimizer = _trained(1)
    model.add_module("extra", torch.nn.Linear(2, 2))
    save_sharded(tmp_path / "checkpoint.dcp", model, optimizer, {"step": 1})
    assert _load_error(tmp_path / "checkpoint.dcp").endswith(
        "does not fit this model and optimizer: the checkpoint holds model.extra.weight, model.extra.bias, which this "
        "model and optimizer lack")


def test_group_settings_the_template_lacks_are_loaded(tmp_path: Path) -> None:
    """An LR schedule adds ``initial_lr`` to the param groups; a fresh optimizer has none, and still gets it."""
    model, optimizer = _trained(1)
    torch.optim.lr_scheduler.StepLR(optimizer, 5)
    save_sharded(tmp_path / "checkpoint.dcp", model, optimizer, {"step": 1})
    other, other_optimizer = _small()
    load_sharded(tmp_path / "checkpoint.dcp", other, other_optimizer)
    assert other_optimizer.param_groups[0]["initial_lr"] == 0.1
    assert _equal_states(optimizer.state_dict(), other_optimizer.state_dict())


def test_copying_the_run_folder_keeps_the_link(saved: Path, tmp_path: Path) -> None:
    moved = tmp_path / "moved"
    shutil.copytree(saved.parent, moved, symlinks=True)
    shutil.rmtree(saved.parent / saved.name)
    assert verify_sharded(moved / "checkpoint.dcp")["step"] == 2


# ---------------------------------------------------------------- 4. either layout, for the trainer


def test_latest_checkpoint_is_the_one_written_last(saved: Path) -> None:
    run = saved.parent
    assert latest_checkpoint(run) == run / "checkpoint.dcp"
    save_checkpoint(run / "checkpoint.pt", {"step": 3})
    assert latest_checkpoint(run) == run / "checkpoint.pt"
    os.utime(run / "checkpoint.pt", ns=(1, 1))  # written before the link was flipped
    assert latest_checkpoint(run) == run / "checkpoint.dcp"
    assert latest_checkpoint(run / "empty") == run / "empty" / "checkpoint.pt"


def test_read_training_checkpoint_of_either_layout(saved: Path) -> None:
    payload = read_training_checkpoint(saved.parent / "checkpoint.dcp")
    assert payload == {"step": 2, SHARDED_KEY: str(saved)}
    single = saved.parent / "single.pt"
    save_checkpoint(single, {"step": 5, "model_config": {}, "vocab": [], "model": {}, "optimizer": {}})
    assert read_training_checkpoint(single)["step"] == 5


def test_a_damaged_checkpoint_names_the_newest_intact_previous(tmp_path: Path) -> None:
    model, optimizer = _trained(1)
    files = ShardedCheckpointFiles(tmp_path, keep=3)
    for step in (1, 2, 3):
        files.save(model, optimizer, {"step": step})
    (tmp_path / "checkpoint.step2.dcp" / "extra.pt").write_bytes(b"x")
    (tmp_path / "checkpoint.step3.dcp" / "extra.pt").write_bytes(b"x")
    assert intact_previous(files.latest) == (1, tmp_path / "checkpoint.step1.dcp")
    (tmp_path / "checkpoint.step1.dcp" / MANIFEST_NAME).unlink()
    assert intact_previous(files.latest) is None
