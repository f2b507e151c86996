"""Training checkpoints: written atomically, verified on load, the last K kept.

A checkpoint is a dict saved with :func:`optimlab.io.atomic_torch_save` (temporary file, fsync, rename),
so a crash or SIGKILL during the write leaves the previous checkpoint intact. It holds the model,
optimizer, scheduler, clipper, guard and GradScaler states, the random-number generator states of
every rank (torch, CUDA, NumPy, Python), the data-loader position (epoch, batch within the epoch), the
step, the model config, the vocabulary and the run's settings.

Integrity: ``torch.save`` writes a zip archive whose every record (the pickled structure, and one record
per tensor storage) carries a CRC-32 checksum; :func:`load_checkpoint` verifies all of them before
unpickling (:func:`verify_checkpoint`), so one flipped bit anywhere in the file is a one-line
:class:`CheckpointError` instead of silently wrong weights. A checkpoint whose parameters or optimizer
state hold NaN/inf is neither written (:func:`nonfinite_tensors`, checked by the trainer) nor loaded.

:class:`CheckpointFiles` keeps the last K checkpoints of a run folder: ``checkpoint.pt`` (the latest) and
``checkpoint.step<N>.pt`` for the K-1 before it (hard links of what ``checkpoint.pt`` was, so keeping
costs no copy), and removes the temporaries a killed write left behind.
"""

from __future__ import annotations

import contextlib
import errno
import os
import random
import re
import shutil
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.serialization import config as serialization_config

from optimlab.io import atomic_torch_save, os_error_text
from optimlab.optim._dtensor import local

__all__ = ["FORMAT", "LATEST_NAME", "CheckpointError", "CheckpointWriteError", "CheckpointFiles", "save_checkpoint",
           "load_checkpoint", "verify_checkpoint", "nonfinite_tensors", "capture_rng_state", "restore_rng_state",
           "check_compatible", "short_list"]

FORMAT = "optimlab.train.checkpoint/1"
LATEST_NAME = "checkpoint.pt"
_REQUIRED = ("format", "step", "model_config", "vocab", "model", "optimizer")
_PREVIOUS = re.compile(r"^checkpoint\.step(\d+)\.pt$")


class CheckpointError(ValueError):
    """A checkpoint that is missing, damaged, not finite, or does not fit the run that wants to load it."""


class CheckpointWriteError(CheckpointError):
    """A checkpoint that could not be written (full disk, read-only folder); the previous one is intact."""


def save_checkpoint(path: str | Path, payload: dict[str, Any]) -> None:
    """Write ``payload`` (plus the format tag) to ``path`` atomically, with the CRC-32 of every record (even where
    ``torch.utils.serialization.config.save.compute_crc32`` was turned off: :func:`verify_checkpoint` needs them)."""
    options = serialization_config.save
    computed = options.compute_crc32
    options.compute_crc32 = True
    try:
        atomic_torch_save({"format": FORMAT, **payload}, path)
    finally:
        options.compute_crc32 = computed


def verify_checkpoint(path: str | Path) -> None:
    """Check every record of the checkpoint archive against its stored CRC-32; raise :class:`CheckpointError`
    (one line, naming the file and the damaged record) if any differs or the archive is unreadable."""
    file = Path(path)
    try:
        with zipfile.ZipFile(file) as archive:
            damaged = archive.testzip()
    except (zipfile.BadZipFile, EOFError, ValueError, NotImplementedError, zipfile.LargeZipFile) as err:
        raise CheckpointError(f"Checkpoint {file} is damaged: not a readable archive ({err})") from None
    except OSError as err:
        raise CheckpointError(f"Cannot read checkpoint {file}: {os_error_text(err)}") from None
    if damaged is not None:
        raise CheckpointError(f"Checkpoint {file} is damaged: its record {damaged.split('/', 1)[-1]!r} fails "
                              "its CRC-32 checksum")


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Verify (:func:`verify_checkpoint`) and read a checkpoint onto the CPU; raise :class:`CheckpointError` if it
    is missing, damaged, not one of ours, or holds non-finite parameters or optimizer state."""
    file = Path(path)
    if file.is_dir():
        raise CheckpointError(f"{file} is a folder (a sharded checkpoint?), not a single-file checkpoint: convert it "
                              f"with `optimlab checkpoint convert {file} FILE.pt`, or resume it with --fsdp")
    if not file.is_file():
        raise CheckpointError(f"No checkpoint to resume from at {file}")
    verify_checkpoint(file)
    try:
        payload = torch.load(file, map_location="cpu", weights_only=False)
    except Exception as err:  # torch raises several types for a damaged file
        raise CheckpointError(f"Cannot read checkpoint {file}: {err}") from err
    if not isinstance(payload, dict) or payload.get("format") != FORMAT or any(k not in payload for k in _REQUIRED):
        raise CheckpointError(f"{file} is not an optimlab training checkpoint ({FORMAT})")
    bad = nonfinite_tensors(payload["model"], payload["optimizer"])
    if bad:
        raise CheckpointError(f"Checkpoint {file} (step {payload['step']}) holds non-finite values in "
                              f"{short_list(bad)}")
    return payload


def nonfinite_tensors(model_state: dict[str, Any], optimizer_state: dict[str, Any],
                      param_names: list[str] | None = None) -> list[str]:
    """The names of the floating-point tensors holding NaN or inf: ``model.<name>`` for ``model_state`` entries,
    ``optimizer.<key> of <param>`` for the per-parameter optimizer state (``param_names[i]`` names the i-th
    parameter of the optimizer's state dict when given). Of sharded (DTensor) values only this rank's shard is
    checked: agree across ranks by reducing the count."""
    bad = [f"model.{name}" for name, value in model_state.items() if _nonfinite(value)]
    for index, state in optimizer_state.get("state", {}).items():
        where = param_names[index] if param_names is not None and isinstance(index, int) and index < len(
            param_names) else f"parameter {index}"
        bad.extend(f"optimizer.{key} of {where}" for key, value in state.items() if _nonfinite(value))
    return bad


def _nonfinite(value: Any) -> bool:
    """Whether a floating-point tensor holds NaN/inf; of a sharded DTensor, this rank's shard (no collective)."""
    if not isinstance(value, torch.Tensor) or not value.is_floating_point():
        return False
    return not bool(torch.isfinite(local(value)).all())


def short_list(names: list[str], limit: int = 4) -> str:
    """The first ``limit`` names, comma-separated, and how many more there are."""
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


class CheckpointFiles:
    """The checkpoints of one run folder: ``checkpoint.pt`` and up to ``keep - 1`` previous ones.

    :meth:`save` first hard-links the current ``checkpoint.pt`` (of step ``latest_step``) to
    ``checkpoint.step<N>.pt``, then writes the new one atomically, then deletes the oldest previous files
    beyond ``keep - 1``. A failed write raises :class:`CheckpointWriteError` naming the folder and the cause,
    and leaves every existing checkpoint intact.
    """

    def __init__(self, folder: str | Path, keep: int = 2) -> None:
        if not isinstance(keep, int) or keep < 1:
            raise ValueError(f"Invalid keep_checkpoints: {keep!r} (accepted range: an integer >= 1)")
        self.folder = Path(folder)
        self.keep = keep
        self.latest = self.folder / LATEST_NAME

    def previous(self) -> list[tuple[int, Path]]:
        """``(step, path)`` of the kept previous checkpoints, newest first."""
        if not self.folder.is_dir():
            return []
        found = [(int(m.group(1)), self.folder / m.group(0)) for m in map(_PREVIOUS.match, os.listdir(self.folder))
                 if m]
        return sorted(found, reverse=True)

    def save(self, payload: dict[str, Any], latest_step: int | None) -> None:
        """Write ``payload`` as the latest checkpoint, keeping the one it replaces (step ``latest_step``; ``None``
        when ``checkpoint.pt`` does not belong to this run's history) as a previous one."""
        try:
            if self.keep > 1 and latest_step is not None and self.latest.is_file():
                kept = self.folder / f"checkpoint.step{latest_step}.pt"
                if kept.exists():
                    kept.unlink()
                _link_or_copy(self.latest, kept)
            save_checkpoint(self.latest, payload)
        except OSError as err:
            intact = (f"the previous checkpoint (step {latest_step}) is intact" if latest_step is not None
                      else "no checkpoint was written")
            raise CheckpointWriteError(f"cannot write checkpoint to {self.folder}: {os_error_text(err)}; "
                                       f"{intact}") from None
        for _, path in self.previous()[self.keep - 1:]:
            path.unlink(missing_ok=True)

    def remove_all(self) -> None:
        """Delete ``checkpoint.pt`` and the previous checkpoints (a run started afresh with ``--overwrite``)."""
        for path in [self.latest, *(p for _, p in self.previous())]:
            path.unlink(missing_ok=True)

    def clean_temporaries(self) -> list[Path]:
        """Delete the temporary files of checkpoint writes that were killed (``.checkpoint*.pt.*.tmp``);
        returns them. Call only while no other process writes checkpoints to this folder."""
        removed = []
        for path in self.folder.glob(".checkpoint*.pt.*.tmp") if self.folder.is_dir() else []:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
                removed.append(path)
        return removed


def _link_or_copy(source: Path, target: Path) -> None:
    try:
        os.link(source, target)
    except OSError as err:
        if err.errno not in (errno.EPERM, errno.EXDEV, errno.ENOTSUP, errno.EMLINK):
            raise
        shutil.copyfile(source, target)  # a filesystem without hard links


def check_compatible(payload: dict[str, Any], model_config: dict[str, Any], vocab: list[str], path: str | Path) -> None:
    """Raise :class:`CheckpointError` naming each model-config field (and the vocabulary) that differs."""
    saved = payload["model_config"]
    differences = [f"{key}: checkpoint {saved.get(key)!r}, this run {value!r}"
                   for key, value in model_config.items() if saved.get(key) != value]
    if payload["vocab"] != vocab:
        differences.append(f"vocabulary: checkpoint {len(payload['vocab'])} characters, this run {len(vocab)} "
                           "(a different --data or corpus size)")
    if differences:
        raise CheckpointError(f"Checkpoint {path} was written for another model: " + "; ".join(differences)
                              + " (use the same settings, or a new --out folder)")


def capture_rng_state() -> dict[str, Any]:
    """The torch (and CUDA), NumPy and Python random states of this process."""
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(),
                             "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Restore states captured by :func:`capture_rng_state`."""
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
