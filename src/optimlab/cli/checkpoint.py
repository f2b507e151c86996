"""``optimlab checkpoint convert|verify``: training checkpoints between the sharded and the single-file layout.

A run trained under ``--fsdp`` writes sharded checkpoints (a folder per version, ``checkpoint.dcp`` linking the
latest: :mod:`optimlab.train.dcp_checkpoint`); every other run writes one file (``checkpoint.pt``:
:mod:`optimlab.train.checkpoint`). ``convert`` turns either into the other, so a model trained sharded can be
evaluated or resumed in one process, and a single-file run resumed sharded.
"""

from __future__ import annotations

from pathlib import Path

import typer

from optimlab.cli.app import app, check_writable, fail
from optimlab.train.checkpoint import CheckpointError, load_checkpoint
from optimlab.train.dcp_checkpoint import (
    checkpoint_layout,
    sharded_to_single,
    single_to_sharded,
    verify_sharded,
)

__all__ = ["convert_command", "verify_command"]

checkpoint_app = typer.Typer(help="Training checkpoints: convert between sharded and single-file, verify.",
                             no_args_is_help=True)
app.add_typer(checkpoint_app, name="checkpoint")


def _layout(source: Path) -> str:
    """``"sharded"`` or ``"single"``; exit 2 with one line for a missing path or a folder without a manifest."""
    try:
        layout = checkpoint_layout(source)
    except CheckpointError as error:
        raise fail(str(error)) from None
    if layout == "missing":
        raise fail(f"No checkpoint at {source} (expected a checkpoint file, or a sharded checkpoint folder such as "
                   "RUN/checkpoint.dcp)")
    return layout


@checkpoint_app.command("convert")
def convert_command(
    source: Path = typer.Argument(..., help="A sharded checkpoint (folder, e.g. RUN/checkpoint.dcp) or a single "
                                  "checkpoint file (e.g. RUN/checkpoint.pt)."),
    target: Path = typer.Argument(..., help="Where to write the other layout (must not exist): a file for a "
                                  "sharded SOURCE, a folder for a single-file SOURCE."),
) -> None:
    """Convert a training checkpoint between the sharded layout (--fsdp) and the single file; every checksum of
    SOURCE is verified first."""
    layout = _layout(source)
    if target.exists() or target.is_symlink():
        raise fail(f"Invalid TARGET: {target} already exists (convert writes a new file or folder, never over one)")
    check_writable(target.parent, "TARGET")
    try:
        if layout == "sharded":
            payload = sharded_to_single(source, target)
            typer.echo(f"converted {source} (sharded, step {payload['step']} of a run on "
                       f"{payload.get('world_size', '?')} rank(s)) -> {target} (single file)")
        else:
            single_to_sharded(source, target)
            typer.echo(f"converted {source} (single file) -> {target} (sharded; resume it on any number of ranks "
                       f"with --resume-from {target})")
    except (CheckpointError, FileExistsError) as error:
        raise fail(str(error)) from None


@checkpoint_app.command("verify")
def verify_command(
    path: Path = typer.Argument(..., help="A checkpoint file, or a sharded checkpoint folder (or its link)."),
) -> None:
    """Check every checksum of a checkpoint (and that it is an optimlab training checkpoint); one line either way,
    exit code 2 when it is damaged, incomplete or foreign."""
    layout = _layout(path)
    try:
        if layout == "sharded":
            manifest = verify_sharded(path)
            typer.echo(f"ok: {path} is a sharded checkpoint of step {manifest['step']}, written by "
                       f"{manifest['world_size']} rank(s); {len(manifest['files'])} files pass their checksums")
        else:
            payload = load_checkpoint(path)
            typer.echo(f"ok: {path} is a single-file checkpoint of step {payload['step']}; every record passes its "
                       "checksum")
    except CheckpointError as error:
        raise fail(str(error)) from None
