"""``optimlab train`` (one process, or data-parallel with ``--nproc-per-node``) and ``optimlab demo ddp``.

``python -m optimlab.train`` runs the same command without the launcher; torchrun starts it that way:
``torchrun --nproc-per-node 2 -m optimlab.train --quick``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import typer
from rich.console import Console
from rich.table import Table

from optimlab.cli.app import app, demo_app, fail
from optimlab.guard import NonFiniteGradientError
from optimlab.io import ensure_writable, os_error_text
from optimlab.train.checkpoint import CheckpointError, load_checkpoint
from optimlab.train.checks import check_run_options
from optimlab.train.config import TrainConfig
from optimlab.train.distributed import (
    LaunchError,
    check_launch_options,
    end_worker,
    exit_with_launcher,
    init_distributed,
    launch,
    shutdown,
)
from optimlab.train.trainer import (
    CHECKPOINT_NAME,
    SUMMARY_NAME,
    Trainer,
    prepare_run,
    read_resume_checkpoint,
    stored_config,
)

__all__ = ["train_command", "demo_ddp_command", "worker_main"]

_USER_ERRORS = (ValueError, TypeError, KeyError, FileNotFoundError, FileExistsError, CheckpointError)


def _message(error: Exception) -> str:
    return error.args[0] if isinstance(error, KeyError) and error.args else str(error)


def _build_config(base: TrainConfig, overrides: dict[str, Any]) -> TrainConfig:
    return dataclasses.replace(base, **{k: v for k, v in overrides.items() if v is not None})


def train_command(
    out: str = typer.Option(None, "--out", "-o", help="Output folder (checkpoint.pt, metrics.csv, tb/, sample.txt). "
                            "\\[default: runs/train]"),
    quick: bool = typer.Option(False, "--quick", help="A small model for a few hundred steps (~1 min on 2 cores)."),
    config_file: Path = typer.Option(None, "--config", help="Start from a config.json written by a previous run."),
    resume: bool = typer.Option(False, "--resume", help="Continue the stored run exactly from OUT/checkpoint.pt "
                                "(its settings; options given with it must be ones a resume may change)."),
    resume_from: Path = typer.Option(None, "--resume-from", help="Resume from this checkpoint file instead "
                                     "(e.g. OUT/checkpoint.step500.pt when the latest is damaged)."),
    keep_checkpoints: int = typer.Option(None, help="Checkpoints kept: checkpoint.pt and the K-1 before it. "
                                         "\\[default: 2]"),
    stop_at: int = typer.Option(None, "--stop-at", help="Stop after this step (checkpointed), to --resume later, "
                                "e.g. in a time-limited job slot."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Start afresh even if OUT holds a checkpoint."),
    data: str = typer.Option(None, "--data", help="A UTF-8 text file. \\[default: the Python stdlib's sources]"),
    corpus_chars: int = typer.Option(None, help="Characters of the stdlib corpus. \\[default: 2000000]"),
    block_size: int = typer.Option(None, help="Context length. \\[default: 128]"),
    n_layer: int = typer.Option(None, help="Transformer blocks. \\[default: 4]"),
    n_head: int = typer.Option(None, help="Attention heads. \\[default: 4]"),
    n_embd: int = typer.Option(None, help="Model width. \\[default: 128]"),
    dropout: float = typer.Option(None, help="Dropout probability. \\[default: 0]"),
    batch_size: int = typer.Option(None, help="Sequences per micro-batch per process. \\[default: 32]"),
    accum: int = typer.Option(None, help="Gradient-accumulation micro-batches per step. \\[default: 1]"),
    steps: int = typer.Option(None, help="Optimizer steps. \\[default: 2000]"),
    optimizer: str = typer.Option(None, help="Optimizer name (see `optimlab optimizers`). \\[default: adamw]"),
    lr: float = typer.Option(None, help="Peak learning rate. \\[default: 1e-3]"),
    weight_decay: float = typer.Option(None, help="Weight decay on weight matrices. \\[default: 0.1]"),
    layer_decay: float = typer.Option(None, help="Layer-wise LR decay factor in (0, 1]. \\[default: off]"),
    schedule: str = typer.Option(None, help="LR schedule name, or 'none'. \\[default: warmup-cosine]"),
    clip: str = typer.Option(None, help="Clipping spec: none, norm:C, value:C, adaptive:P, autoclip:P, agc:C. "
                             "\\[default: norm:1.0]"),
    skip_nonfinite: bool = typer.Option(None, "--skip-nonfinite/--no-skip-nonfinite",
                                        help="Skip steps with inf/NaN gradients. \\[default: on]"),
    check_update: bool = typer.Option(None, "--check-update/--no-check-update",
                                      help="Also roll back and skip steps whose update overflows (with "
                                      "--skip-nonfinite; copies parameters and state every step). \\[default: off]"),
    precision: str = typer.Option(None, help="fp32, bf16 (CPU/GPU autocast) or fp16 (GPU, GradScaler). "
                                  "\\[default: fp32]"),
    compile: bool = typer.Option(None, "--compile/--no-compile", help="torch.compile the model. \\[default: off]"),
    device: str = typer.Option(None, help="auto, cpu or cuda. \\[default: auto]"),
    zero: bool = typer.Option(None, "--zero/--no-zero", help="Shard optimizer state (ZeroRedundancyOptimizer)."),
    fsdp: bool = typer.Option(None, "--fsdp/--no-fsdp", help="Shard parameters, gradients and optimizer state "
                              "with FSDP2 (fully_shard per block and at the root); not with --zero."),
    seed: int = typer.Option(None, help="Seed of init, data order and dropout. \\[default: 0]"),
    log_every: int = typer.Option(None, help="Log every N steps. \\[default: 50]"),
    eval_every: int = typer.Option(None, help="Validate every N steps. \\[default: 250]"),
    eval_batches: int = typer.Option(None, help="Validation micro-batches per evaluation. \\[default: 8]"),
    checkpoint_every: int = typer.Option(None, help="Checkpoint every N steps. \\[default: 500]"),
    monitor_every: int = typer.Option(None, help="Optimizer-state monitor interval. \\[default: 50]"),
    sample_chars: int = typer.Option(None, help="Characters of generated text at the end. \\[default: 300]"),
    tensorboard: bool = typer.Option(None, "--tensorboard/--no-tensorboard", help="Log to OUT/tb. \\[default: on]"),
    dist_timeout: float = typer.Option(None, help="Seconds before a collective gives up on a dead peer. "
                                       "\\[default: 60]"),
    ema: float = typer.Option(None, "--ema", metavar="DECAY", help="Also keep an exponential moving average of "
                              "the weights with this decay (e.g. 0.999), evaluated (ema_val_loss) and checkpointed. "
                              "\\[default: off]"),
    nproc_per_node: int = typer.Option(1, help="Data-parallel processes on this machine (gloo on CPU, NCCL on GPU)."),
    master_addr: str = typer.Option("127.0.0.1", help="Rendezvous address for --nproc-per-node."),
    master_port: int = typer.Option(29500, help="Rendezvous port for --nproc-per-node (0: pick a free one)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar or console lines."),
) -> None:
    """Train a character-level GPT; exact --resume; data-parallel with --nproc-per-node N (DDP, --zero, --fsdp)."""
    overrides = dict(out_dir=out, data=data, corpus_chars=corpus_chars, block_size=block_size, n_layer=n_layer,
                     n_head=n_head, n_embd=n_embd, dropout=dropout, batch_size=batch_size, accum=accum, steps=steps,
                     optimizer=optimizer, lr=lr, weight_decay=weight_decay, layer_decay=layer_decay,
                     schedule=schedule, clip=clip, skip_nonfinite=skip_nonfinite, check_update=check_update,
                     precision=precision, compile=compile, device=device, zero=zero, fsdp=fsdp, seed=seed, log_every=log_every,
                     eval_every=eval_every, eval_batches=eval_batches, checkpoint_every=checkpoint_every,
                     monitor_every=monitor_every, sample_chars=sample_chars, tensorboard=tensorboard,
                     dist_timeout_s=dist_timeout, keep_checkpoints=keep_checkpoints, ema=ema)
    resume = resume or resume_from is not None
    with _one_line_errors():
        if stop_at is not None and stop_at < 1:
            raise ValueError(f"Invalid --stop-at: {stop_at} (accepted range: >= 1)")
        check_launch_options(nproc_per_node, master_port)
        loaded = None  # the checkpoint to resume, read once here and handed on
        if config_file is not None:
            base = TrainConfig.load(config_file)
        elif resume:  # continue the stored run; the options given change it where a resume may (or are refused)
            loaded = read_resume_checkpoint(out or TrainConfig.out_dir, resume_from)
            base = stored_config(out or TrainConfig.out_dir, loaded[1])
        else:
            base = TrainConfig.quick() if quick else TrainConfig()
        config = _build_config(base, overrides)
        world_size = nproc_per_node if nproc_per_node > 1 else int(os.environ.get("WORLD_SIZE", "1"))
        check_run_options(config, world_size=world_size)  # before --out is created or workers are started
        if nproc_per_node > 1:
            _launch(config, nproc_per_node, master_addr, master_port, resume=resume, overwrite=overwrite,
                    quiet=quiet, stop_at=stop_at, resume_from=resume_from, loaded=loaded)
        else:
            _run_worker(config, resume=resume, overwrite=overwrite, quiet=quiet, stop_at=stop_at,
                        resume_from=resume_from, loaded=loaded)


@contextlib.contextmanager
def _one_line_errors() -> Iterator[None]:
    """Turn the errors a user can act on into one ``error: ...`` line: exit code 2 for bad input, a checkpoint
    or folder that cannot be written or read; 1 for a failed worker or a diverging run."""
    try:
        yield
    except LaunchError as error:
        if error.worker_exit_code == 2:  # the worker printed its own one-line error (e.g. a full disk)
            raise typer.Exit(2) from None
        raise fail(str(error), code=1) from None
    except NonFiniteGradientError as error:
        raise fail(str(error), code=1) from None
    except _USER_ERRORS as error:
        raise fail(_message(error)) from None
    except OSError as error:  # e.g. a full disk while writing metrics.csv
        where = f" {error.filename}" if error.filename else ""
        raise fail(f"cannot write{where}: {os_error_text(error)}") from None


def _launch(config: TrainConfig, nproc_per_node: int, master_addr: str, master_port: int, *, resume: bool,
            overwrite: bool, quiet: bool, stop_at: int | None = None, resume_from: Path | None = None,
            loaded: tuple[Path, dict[str, Any]] | None = None) -> None:
    """Check the run, write its config for the workers, and start them."""
    if "WORLD_SIZE" in os.environ:
        raise ValueError("Invalid --nproc-per-node: already running under a launcher (torchrun); "
                         "drop --nproc-per-node")
    plan = prepare_run(config, resume=resume, overwrite=overwrite, world_size=nproc_per_node, resume_from=resume_from,
                       loaded=loaded)
    config_path = Path(config.out_dir) / "config.json"
    plan.config.save(config_path)
    flags = [flag for flag, on in (("--resume", resume), ("--overwrite", overwrite), ("--quiet", quiet)) if on]
    if stop_at is not None:
        flags += ["--stop-at", str(stop_at)]
    if resume_from is not None:
        flags += ["--resume-from", str(resume_from)]
    launch(["--config", str(config_path), *flags], nproc_per_node, master_addr=master_addr, master_port=master_port)


def _run_worker(config: TrainConfig, *, resume: bool, overwrite: bool, quiet: bool,
                stop_at: int | None = None, resume_from: Path | None = None,
                loaded: tuple[Path, dict[str, Any]] | None = None) -> None:
    """Train in this process (alone, or as one rank of a job described by the environment)."""
    context = init_distributed(config.device, config.dist_timeout_s)
    finished = False
    try:
        trainer = Trainer(config, context, resume=resume, overwrite=overwrite, quiet=quiet, resume_from=resume_from,
                          loaded=loaded)
        try:
            trainer.train(stop_at=stop_at)
        finally:
            trainer.close()
        finished = True
    finally:
        shutdown(context, finished=finished, process_ends=finished and context.is_distributed)
    if context.is_main and not quiet:
        _print_summary(Path(config.out_dir))
    if context.is_distributed:
        end_worker(0)  # the group is left undestroyed (shutdown): end before the interpreter tears it down


def _print_summary(out_dir: Path) -> None:
    summary = json.loads((out_dir / SUMMARY_NAME).read_text())
    typer.echo(f"done: {summary['step']} steps, val loss {summary['val_loss']:.4f}, "
               f"{summary['tokens_per_s']:.0f} tokens/s on {summary['world_size']} process(es); "
               f"outputs in {out_dir}")


app.command("train")(train_command)


def worker_main() -> None:
    """``python -m optimlab.train``: the ``train`` command, as torchrun starts each worker. Under a launcher
    (``WORLD_SIZE`` set) the worker ends when its launcher dies, instead of training on as an orphan."""
    if "WORLD_SIZE" in os.environ:
        exit_with_launcher()
    typer.run(train_command)


@demo_app.command("ddp")
def demo_ddp_command(
    out: Path = typer.Option(Path("optimlab-out/ddp"), "--out", "-o", help="Output folder (one sub-folder per run)."),
    steps: int = typer.Option(40, help="Optimizer steps of each run."),
    batch_size: int = typer.Option(8, help="Sequences per step per process in the 2-process run."),
    master_port: int = typer.Option(0, help="Rendezvous port (0: pick a free one)."),
) -> None:
    """The seed's DistributedTrainer, on CPU: 2 gloo processes (batch B each) vs 1 process (batch 2B).

    Both runs see the same global batches, so they must end with the same weights; the table shows the
    largest parameter difference, the validation losses and the throughputs."""
    runs = {"1 process, batch 2B": (1, 2 * batch_size), "2 processes (DDP), batch B": (2, batch_size)}
    with _one_line_errors():
        check_launch_options(2, master_port)
        base = TrainConfig.quick(steps=steps, eval_every=steps, log_every=max(1, steps // 4), checkpoint_every=steps,
                                 sample_chars=0, tensorboard=False, device="cpu", schedule="warmup-cosine")
        configs = {label: dataclasses.replace(base, out_dir=str(out / f"nproc{nproc}"), batch_size=batch)
                   for label, (nproc, batch) in runs.items()}
        for label, config in configs.items():
            check_run_options(config, world_size=runs[label][0])
        ensure_writable(out, "--out")
        for label, config in configs.items():
            nproc = runs[label][0]
            typer.echo(f"== {label}")
            if nproc == 1:
                _run_worker(config, resume=False, overwrite=True, quiet=True)
            else:
                _launch(config, nproc, "127.0.0.1", master_port, resume=False, overwrite=True, quiet=True)
    models = [load_checkpoint(out / f"nproc{n}" / CHECKPOINT_NAME)["model"] for n, _ in runs.values()]
    max_diff = max(float((models[0][k].float() - models[1][k].float()).abs().max()) for k in models[0])
    table = Table(title=f"DDP demo: {steps} steps, same global batch")
    for column in ("run", "val loss", "tokens/s"):
        table.add_column(column)
    for label, (nproc, _) in runs.items():
        summary = json.loads((out / f"nproc{nproc}" / SUMMARY_NAME).read_text())
        table.add_row(label, f"{summary['val_loss']:.5f}", f"{summary['tokens_per_s']:.0f}")
    Console().print(table)
    typer.echo(f"max |parameter difference| between the runs: {max_diff:.2e} (float32 reduction order only)")
    typer.echo("throughput: processes on one machine share its cores, so DDP is not expected to be faster here "
               "(docs/train.md: when data-parallel pays)")
    if not max_diff < 1e-4 or not torch.isfinite(torch.tensor(max_diff)):
        raise fail(f"the 1-process and 2-process runs disagree (max difference {max_diff:.2e})", code=1)
