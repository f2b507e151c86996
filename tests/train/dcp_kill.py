"""A sharded-checkpoint write killed with SIGKILL at one point (test_dcp_checkpoint.py forks a process to run it).

``main(DIR, POINT)`` (or ``python dcp_kill.py DIR POINT``): the process saves a small model as
``DIR/checkpoint.dcp`` at step 1, trains a step, then saves step 2 and kills itself (SIGKILL) at POINT: ``write``
(the shards written, no manifest yet), ``rename`` (the temporary folder complete, not yet renamed) or ``flip``
(the version renamed, the link not yet flipped). Before that it writes ``DIR/step1.pt``: the parameters saved at
step 1."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import torch

from optimlab.train import dcp_checkpoint


def _die(*args: object, **kwargs: object) -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _dying(function, target: str):  # noqa: ANN001, ANN202
    """``function``, except that a call whose destination is named ``target`` kills the process instead."""
    def call(source, destination, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        if Path(destination).name == target:
            _die()
        return function(source, destination, *args, **kwargs)
    return call


def main(folder: Path, point: str) -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    for step in (1, 2):
        model(torch.randn(4, 6)).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        if step == 1:
            dcp_checkpoint.save_sharded(folder / "checkpoint.dcp", model, optimizer, {"step": 1})
            torch.save(model.state_dict(), folder / "step1.pt")
    if point == "write":
        dcp_checkpoint._file_record = _die
    elif point == "rename":
        os.rename = _dying(os.rename, "checkpoint.step2.dcp")
    elif point == "flip":
        os.replace = _dying(os.replace, "checkpoint.dcp")
    dcp_checkpoint.save_sharded(folder / "checkpoint.dcp", model, optimizer, {"step": 2})
    raise SystemExit(f"not killed at {point}")


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2])
