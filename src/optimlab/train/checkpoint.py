"""Training checkpoints: one file, written atomically, with everything needed to resume exactly.

A checkpoint is a dict saved with :func:`optimlab.io.atomic_torch_save` (temporary file, fsync, rename),
so a crash or SIGKILL during the write leaves the previous checkpoint intact. It holds the model,
optimizer, scheduler, clipper, guard and GradScaler states, the random-number generator states of
every rank (torch, CUDA, NumPy, Python), the data-loader position (epoch, batch within the epoch), the
step, the model config, the vocabulary and the run's settings.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from optimlab.io import atomic_torch_save

__all__ = ["FORMAT", "CheckpointError", "save_checkpoint", "load_checkpoint", "capture_rng_state",
           "restore_rng_state", "check_compatible"]

FORMAT = "optimlab.train.checkpoint/1"
_REQUIRED = ("format", "step", "model_config", "vocab", "model", "optimizer")


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable, or does not fit the run that wants to load it."""


def save_checkpoint(path: str | Path, payload: dict[str, Any]) -> None:
    """Write ``payload`` (plus the format tag) to ``path`` atomically."""
    atomic_torch_save({"format": FORMAT, **payload}, path)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint onto the CPU; raise :class:`CheckpointError` if it is missing or not one of ours."""
    file = Path(path)
    if not file.is_file():
        raise CheckpointError(f"No checkpoint to resume from at {file}")
    try:
        payload = torch.load(file, map_location="cpu", weights_only=False)
    except Exception as err:  # torch raises several types for a damaged file
        raise CheckpointError(f"Cannot read checkpoint {file}: {err}") from err
    if not isinstance(payload, dict) or payload.get("format") != FORMAT or any(k not in payload for k in _REQUIRED):
        raise CheckpointError(f"{file} is not an optimlab training checkpoint ({FORMAT})")
    return payload


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
