"""The training loop for the character-level GPT, single-process or data-parallel.

Read top to bottom, :class:`Trainer` does this:

1. **Setup** (``__init__``): refuse the options a run cannot take (:mod:`optimlab.train.checks`) and to
   overwrite an existing checkpoint unless resuming; load the text
   (the standard library's sources or ``--data``), build the vocabulary and the train/val split; build
   the model from ``seed``; split its parameters into weight-decay groups (:func:`optimlab.param_groups`);
   build the optimizer by registry name (sharded with ``ZeroRedundancyOptimizer`` under ``--zero``),
   the LR schedule, the gradient clipper, the non-finite-step guard, the GradScaler (fp16) and the
   optimizer-state monitor; load a checkpoint when resuming (after checking that it fits this model);
   wrap the model in ``DistributedDataParallel`` when there are several processes, or, under ``--fsdp``,
   shard it with FSDP2 before the optimizer is built (:mod:`optimlab.train.fsdp`). Every check that can
   fail runs before the first file is written.
2. **Loop** (:meth:`Trainer.train`): each optimizer step takes ``accum`` micro-batches from the sharded
   epoch stream (:class:`optimlab.train.data.EpochBatches`) and hands them to the step policy
   (:class:`optimlab.train.step.StepPolicy`): back-propagate loss/accum through each (gradients of
   non-final micro-batches are not all-reduced: ``no_sync``), unscale, clip, step the optimizer through
   the guard (or the GradScaler), step the schedule unless the step was skipped, and average the loss
   over ranks for logging.
3. **Every N steps**: log (console progress bar, ``metrics.csv``, TensorBoard), evaluate on fixed
   validation windows sharded across ranks, and checkpoint atomically (rank 0 writes; with ZeRO the
   optimizer state is consolidated first).
4. **End** (of each call of :meth:`Trainer.train`, also after ``stop_at`` or a resume): final evaluation and
   checkpoint, ``summary.json``, ``loss.png`` (train/validation loss and the LR, from ``metrics.csv``), and at
   the end of the run a sample of generated text (``sample.txt``).

Exact resume: the checkpoint holds every piece of state the loop reads (model, optimizer, schedule,
clipper, guard, scaler, RNG states of every rank, data position, step), evaluation does not consume
random numbers, and batches are addressed by (epoch, batch), so N steps + resume + N steps reproduces
2N steps bit for bit on CPU in float32.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import sys
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel

from optimlab.clip import make_clipper
from optimlab.guard import NonFiniteGuard
from optimlab.io import atomic_write_text, ensure_writable
from optimlab.monitor import CSVSink, OptimizerMonitor, TensorBoardSink
from optimlab.optim.groups import param_groups
from optimlab.optim.modes import eval_weights
from optimlab.optim.registry import create_optimizer, get_spec
from optimlab.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from optimlab.progress import progress
from optimlab.schedules import create_scheduler, needs_metric, step_scheduler
from optimlab.schedules._base import set_group_value
from optimlab.train.checkpoint import (
    LATEST_NAME,
    CheckpointError,
    CheckpointFiles,
    capture_rng_state,
    check_compatible,
    nonfinite_tensors,
    restore_rng_state,
    short_list,
)
from optimlab.train.dcp_checkpoint import (
    SHARDED_KEY,
    ShardedCheckpointFiles,
    intact_previous,
    latest_checkpoint,
    load_sharded,
    read_training_checkpoint,
)
from optimlab.train.checks import check_run_options, takes_one_group
from optimlab.train.config import TrainConfig, resume_config
from optimlab.train.data import (
    CharCorpus,
    CharVocab,
    EpochBatches,
    WindowDataset,
    build_corpus,
    read_text_file,
    stdlib_corpus,
)
from optimlab.train.distributed import DistContext, all_gather_objects, all_reduce_sum, pick_device
from optimlab.train.fsdp import local_state, one_rank_group, shard_model, shard_optimizer_state
from optimlab.train.model import GPT, GPTConfig
from optimlab.train.plots import plot_training
from optimlab.train.step import StepPolicy

__all__ = ["Trainer", "TrainResult", "RunPlan", "prepare_run", "read_resume_checkpoint", "stored_config", "CHECKPOINT_NAME", "METRICS_NAME",
           "SUMMARY_NAME"]

CHECKPOINT_NAME = LATEST_NAME
METRICS_NAME = "metrics.csv"
SUMMARY_NAME = "summary.json"
PLOT_NAME = "loss.png"
MONITOR_NAME = "monitor.csv"
_CSV_FIELDS = ("step", "epoch", "train_loss", "val_loss", "lr", "grad_norm", "clipped", "tokens_per_s", "elapsed_s")
_EMA_FIELD = "ema_val_loss"  # a column of metrics.csv with --ema


@dataclass
class RunPlan:
    """What :func:`prepare_run` found: the configuration to run (the stored one, changed as allowed, when
    resuming), the corpus, the model's shape, the checkpoint to resume (or ``None``) and where it came from."""

    config: TrainConfig
    corpus: CharCorpus
    model_config: GPTConfig
    checkpoint: dict[str, Any] | None
    checkpoint_path: Path | None
    changes: dict[str, tuple[Any, Any]]
    train_windows: WindowDataset
    val_windows: WindowDataset
    batches: EpochBatches


def prepare_run(config: TrainConfig, *, resume: bool = False, overwrite: bool = False, world_size: int = 1,
                rank: int = 0, resume_from: str | Path | None = None,
                loaded: tuple[Path, dict[str, Any]] | None = None,
                device: torch.device | str | None = None) -> RunPlan:
    """Every check that can reject a run, done before anything is written.

    First the options (:func:`optimlab.train.checks.check_run_options`, for ``world_size`` processes on
    ``device``, default the one ``config.device`` picks); then refuses to start over an existing checkpoint
    unless ``resume`` or ``overwrite``; reads the text (a missing ``--data`` file or a corpus shorter than the
    block size raise); when resuming, loads and verifies the checkpoint (``resume_from``, default
    ``out_dir/checkpoint.pt``; a damaged one names the intact previous checkpoint to resume from), checks that
    it was written for this model and vocabulary and that ``config`` differs from the stored run only where a
    resume may change it (:func:`optimlab.train.config.resume_config`); builds this rank's batch stream (too
    large a batch for the corpus raises); finally proves that ``out_dir`` is writable, creating it. ``loaded``
    is the ``(path, payload)`` of the checkpoint to resume when the caller has read it already
    (:func:`read_resume_checkpoint`), so it is read once. The launcher runs it once before starting the workers.
    """
    check_run_options(config, world_size=world_size, device=device)
    latest = latest_checkpoint(config.out_dir)
    if resume_from is not None:
        resume = True
    if latest.exists() and not (resume or overwrite):
        raise FileExistsError(f"{latest} already exists: pass --resume to continue that run, "
                              "--overwrite to start afresh over it, or another --out folder")
    text = read_text_file(config.data) if config.data else stdlib_corpus(config.corpus_chars)
    corpus = build_corpus(text, config.block_size, config.val_fraction)
    train_windows = WindowDataset(corpus.train, config.block_size)
    batches = EpochBatches(train_windows, config.batch_size, world_size=world_size, rank=rank, seed=config.seed)
    model_config = GPTConfig(vocab_size=len(corpus.vocab), block_size=config.block_size, n_layer=config.n_layer,
                             n_head=config.n_head, n_embd=config.n_embd, dropout=config.dropout)
    if loaded is not None:
        checkpoint_path, checkpoint = loaded
    else:
        checkpoint_path = Path(resume_from) if resume_from is not None else latest if resume else None
        checkpoint = _load_for_resume(checkpoint_path) if checkpoint_path is not None else None
    changes: dict[str, tuple[Any, Any]] = {}
    if checkpoint is not None and SHARDED_KEY in checkpoint and config.zero:
        raise ValueError(f"Invalid zero: {checkpoint_path} is a sharded checkpoint, which --zero cannot load; resume "
                         "it with --fsdp or without --zero, or convert it with `optimlab checkpoint convert`")
    if checkpoint is not None:
        check_compatible(checkpoint, model_config.to_dict(), corpus.vocab.chars, checkpoint_path)
        stored = TrainConfig.from_dict({**checkpoint["train_config"], "out_dir": config.out_dir})
        config, changes = resume_config(stored, config, step=checkpoint["step"],
                                        global_batch=checkpoint["global_batch"], world_size=world_size)
    ensure_writable(config.out_dir, "--out")
    return RunPlan(config=config, corpus=corpus, model_config=model_config, checkpoint=checkpoint,
                   checkpoint_path=checkpoint_path, changes=changes, train_windows=train_windows,
                   val_windows=WindowDataset(corpus.val, config.block_size), batches=batches)


def read_resume_checkpoint(out_dir: str | Path, resume_from: str | Path | None = None) -> tuple[Path, dict[str, Any]]:
    """``(path, payload)`` of the checkpoint a resume of ``out_dir`` would load (``resume_from``, default the run's
    latest: ``checkpoint.pt``, or ``checkpoint.dcp`` under ``--fsdp``), verified; hand it to :func:`prepare_run` (``loaded``) to read it only once."""
    path = Path(resume_from) if resume_from is not None else latest_checkpoint(out_dir)
    return path, _load_for_resume(path)


def stored_config(out_dir: str | Path, saved: dict[str, Any]) -> TrainConfig:
    """The configuration stored in ``saved`` (a checkpoint of :func:`read_resume_checkpoint`), in ``out_dir``: what
    ``optimlab train --resume`` continues, flags given on resume aside."""
    return TrainConfig.from_dict({**saved["train_config"], "out_dir": str(out_dir)})


def _load_for_resume(path: Path) -> dict[str, Any]:
    """Read the checkpoint to resume, in either layout (a single file, or a sharded folder whose model and
    optimizer state :func:`~optimlab.train.dcp_checkpoint.load_sharded` reads later); when it is damaged, the
    error names the newest intact previous one of the same layout."""
    try:
        return read_training_checkpoint(path)
    except CheckpointError as error:
        if not path.exists():
            raise
        found = intact_previous(path)
        if found is None:
            raise
        step, previous = found
        raise CheckpointError(f"{error}; the previous checkpoint {previous.name} (step {step}) passes its "
                              f"checksums: resume from it with --resume-from {previous}") from None


@dataclass
class TrainResult:
    """What a call to :meth:`Trainer.train` did.

    Attributes:
        step: the step reached.
        losses: the training loss (mean over ranks and micro-batches) of every step run by this call.
        val_losses: ``(step, validation loss)`` of every evaluation in this call.
        tokens_per_s: training throughput over this call (all ranks, excluding evaluation/checkpoints).
        sample: generated text (empty unless the run finished and ``sample_chars`` > 0).
    """

    step: int
    losses: list[float] = field(default_factory=list)
    val_losses: list[tuple[int, float]] = field(default_factory=list)
    tokens_per_s: float = 0.0
    sample: str = ""


class Trainer:
    """Trains a :class:`~optimlab.train.model.GPT` as described by a :class:`TrainConfig` (see the module docstring).

    Args:
        config: the run's settings.
        context: this process's place in a data-parallel job (default: one process on ``config.device``).
        resume: continue from ``out_dir/checkpoint.pt`` (it must exist and fit the model).
        overwrite: allow starting afresh over an existing checkpoint in ``out_dir``.
        quiet: no progress bar and no console lines.
        resume_from: resume from this checkpoint file instead of ``out_dir/checkpoint.pt``.
        loaded: ``(path, payload)`` of the checkpoint to resume, already read (:func:`read_resume_checkpoint`).
    """

    def __init__(self, config: TrainConfig, context: DistContext | None = None, *, resume: bool = False,
                 overwrite: bool = False, quiet: bool = False, resume_from: str | Path | None = None,
                 loaded: tuple[Path, dict[str, Any]] | None = None) -> None:
        self.context = context or DistContext(device=pick_device(config.device))
        self.quiet = quiet or not self.context.is_main
        device = self.context.device

        # Data and model shape; the checkpoint to resume from, checked against them; the configuration to run.
        plan = prepare_run(config, resume=resume, overwrite=overwrite, world_size=self.context.world_size,
                           rank=self.context.rank, resume_from=resume_from, loaded=loaded, device=device)
        self.config = config = plan.config
        self.out_dir = Path(config.out_dir)
        self.files = CheckpointFiles(self.out_dir, config.keep_checkpoints)
        self.sharded_files = ShardedCheckpointFiles(self.out_dir, config.keep_checkpoints)  # --fsdp's checkpoints
        self.checkpoint_path = self.files.latest
        self.vocab: CharVocab = plan.corpus.vocab
        self.model_config = plan.model_config
        self.train_windows, self.val_windows, self.batches = plan.train_windows, plan.val_windows, plan.batches
        saved = plan.checkpoint

        # Model: identical initial weights on every rank (DDP also broadcasts rank 0's). Under FSDP2 the model is
        # sharded before the optimizer is built on its shards (DTensors); the whole weights of a single-file
        # checkpoint are loaded before sharding, a sharded checkpoint after (by DCP, into the shards).
        torch.manual_seed(config.seed)
        self.model = GPT(self.model_config).to(device)
        self._own_group = False
        if config.fsdp:
            self._own_group = one_rank_group(device)
            if saved is not None and SHARDED_KEY not in saved:
                self.model.load_state_dict(saved["model"])
            shard_model(self.model, list(self.model.blocks), config.precision)

        # Optimization: param groups, optimizer (maybe sharded), schedule, clipper, guard, scaler.
        self.optimizer = _build_optimizer(_param_groups(self.model, config), config, note=self._print)
        self.scheduler = _build_scheduler(config, self.optimizer)
        self.clipper = make_clipper(config.clip, self.model.parameters())
        self.scaler = torch.amp.GradScaler("cuda") if config.precision == "fp16" else None
        self.guard = (NonFiniteGuard(self.optimizer, scaler=self.scaler, check_update=config.check_update)
                      if config.skip_nonfinite else None)
        self.policy = StepPolicy(self.optimizer, self.clipper, accum=config.accum, guard=self.guard,
                                 scaler=self.scaler, scheduler=self.scheduler)
        self.ema = (AveragedModel(self.model, multi_avg_fn=get_ema_multi_avg_fn(config.ema))
                    if config.ema is not None else None)

        # Position in the run; restored from the checkpoint when resuming.
        self.step = 0
        self.epoch = 0
        self.batch_in_epoch = 0
        self.tokens_seen = 0
        torch.manual_seed(config.seed + 1 + self.context.rank)  # dropout noise differs between ranks
        self.resumes: list[dict[str, Any]] = []
        self._latest_step: int | None = None  # the step of OUT/checkpoint.pt when it belongs to this run
        if saved is not None:
            self._restore(saved, rebuild_schedule="steps" in plan.changes)
            self.resumes = [*saved.get("resumes", []), {
                "step": self.step, "checkpoint": str(plan.checkpoint_path),
                "changes": {name: list(values) for name, values in plan.changes.items()}}]
            if plan.checkpoint_path is not None and plan.checkpoint_path.resolve() == self.files.latest.resolve():
                self._latest_step = self.step
            self._print(_resume_line(plan.checkpoint_path, self.step, config.steps, plan.changes))

        self.ddp_model: torch.nn.Module = self.model
        if self.context.is_distributed and not config.fsdp:
            device_ids = [device.index] if device.type == "cuda" else None
            self.ddp_model = DistributedDataParallel(self.model, device_ids=device_ids)
        self.forward_model = torch.compile(self.ddp_model) if config.compile else self.ddp_model
        self._started = time.perf_counter()
        self._writer: Any = None
        self._metrics: Any = None
        self.monitor: OptimizerMonitor | None = None
        if self.context.is_main:
            self._open_outputs(saved)
        elif config.fsdp:  # the monitor all-reduces its norms over the shards: every rank takes part, rank 0 writes
            self.monitor = OptimizerMonitor(self.optimizer, every=config.monitor_every)
            if saved is not None and saved.get("monitor") is not None:
                self.monitor.load_state_dict(saved["monitor"])

    # ------------------------------------------------------------------ the loop

    def train(self, stop_at: int | None = None) -> TrainResult:
        """Train until ``config.steps`` (or until ``stop_at``, e.g. to split a run in two), then evaluate,
        checkpoint and, at the end of the run, sample text. Returns what this call did."""
        config = self.config
        if stop_at is not None and stop_at < 1:
            raise ValueError(f"Invalid stop_at: {stop_at} (accepted range: >= 1, or None)")
        last = config.steps if stop_at is None else min(stop_at, config.steps)
        result = TrainResult(step=self.step)
        if self.step == 0:
            first = self._validation_row(0)
            result.val_losses.append((0, first["val_loss"]))
            self._log(first)
        tokens_per_step = config.batch_size * config.block_size * config.accum * self.context.world_size
        train_seconds = 0.0
        window_start, window_steps = time.perf_counter(), 0
        with progress("train", total=last, quiet=self.quiet, unit="step") as bar:
            bar.advance(self.step)
            while self.step < last:
                began = time.perf_counter()
                loss, grad_norm, clipped = self._train_step()
                train_seconds += time.perf_counter() - began
                self.step += 1
                self.tokens_seen += tokens_per_step
                result.losses.append(loss)
                window_steps += 1
                row: dict[str, Any] = {}
                if self.step % config.log_every == 0 or self.step == last:
                    now = time.perf_counter()
                    rate = window_steps * tokens_per_step / max(now - window_start, 1e-9)
                    window_start, window_steps = now, 0
                    row.update(train_loss=loss, grad_norm=grad_norm, clipped=int(clipped), tokens_per_s=rate,
                               lr=float(self.optimizer.param_groups[-1]["lr"]))
                if self.step % config.eval_every == 0 or self.step == last:
                    row.update(self._validation_row(self.step))
                    result.val_losses.append((self.step, row["val_loss"]))
                    window_start = time.perf_counter()
                if row:
                    self._log(row)
                bar.advance(1, loss=loss, lr=float(self.optimizer.param_groups[-1]["lr"]))
                if self.step % config.checkpoint_every == 0 or self.step == last:
                    self.save()
                    window_start = time.perf_counter()
        result.step = self.step
        result.tokens_per_s = len(result.losses) * tokens_per_step / train_seconds if train_seconds else 0.0
        if self.context.is_main:
            summary = {"step": self.step, "train_loss": result.losses[-1] if result.losses else None,
                       "val_loss": result.val_losses[-1][1] if result.val_losses else None,
                       "tokens_per_s": result.tokens_per_s, "world_size": self.context.world_size,
                       "tokens_seen": self.tokens_seen, "resumes": self.resumes}
            atomic_write_text(self.out_dir / SUMMARY_NAME, json.dumps(summary, indent=2) + "\n")
        if self.step == config.steps and config.sample_chars > 0 and (self.context.is_main or config.fsdp):
            prompt = "\n" if "\n" in self.vocab.chars else self.vocab.chars[0]  # a --data text may have no newline
            result.sample = self.sample(config.sample_chars, prompt)  # FSDP2: every rank runs the (same) forwards
            if self.context.is_main:
                atomic_write_text(self.out_dir / "sample.txt", result.sample + "\n")
                self._print(f"--- sample after {self.step} steps ---\n{result.sample}\n---")
        if self.context.is_main:
            self._metrics.flush()
            if self._writer is not None:
                self._writer.flush()
            plot_training(self.out_dir / METRICS_NAME, self.out_dir / PLOT_NAME,
                          title=f"{self.config.optimizer}, {self.config.schedule} schedule")
        return result

    def _micro_batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The next ``accum`` micro-batches of this rank, advancing the (epoch, batch) position."""
        for _ in range(self.config.accum):
            if self.batch_in_epoch >= self.batches.batches_per_epoch:
                self.epoch, self.batch_in_epoch = self.epoch + 1, 0
            inputs, targets = self.train_windows.batch(self.batches.indices(self.epoch, self.batch_in_epoch))
            self.batch_in_epoch += 1
            yield inputs.to(self.context.device), targets.to(self.context.device)

    def _train_step(self) -> tuple[float, float, bool]:
        """One optimizer step over ``accum`` micro-batches (:class:`~optimlab.train.step.StepPolicy`); returns
        (mean loss over ranks, grad norm, clipped)."""
        self.forward_model.train()
        # FSDP2 reduce-scatters every micro-batch's gradients into the sharded ones (no no_sync: keeping whole
        # gradients between micro-batches would give up the sharding of the gradients)
        no_sync = self.ddp_model.no_sync if self.context.is_distributed and not self.config.fsdp else None
        outcome = self.policy.step(self._micro_batches(), self._loss, no_sync=no_sync,
                                   reduce_mean=self._mean_over_ranks)
        if self.ema is not None and not outcome.skipped:
            self.ema.update_parameters(self.model)
        return outcome.loss, outcome.grad_norm, outcome.clipped

    def _loss(self, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        with self._autocast():
            _, loss = self.forward_model(*batch)
        return loss

    def _mean_over_ranks(self, value: torch.Tensor) -> torch.Tensor:
        return all_reduce_sum(value, self.context) / self.context.world_size

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.config.precision)
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.context.device.type, dtype=dtype)

    # ------------------------------------------------------------------ evaluation and sampling

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module | None = None) -> float:
        """Mean validation loss of ``model`` (default: the trained model, with a schedule-free optimizer's
        evaluation weights) over the first ``eval_batches`` global batches of validation windows (fixed, so
        evaluations compare, also across world sizes), sharded across ranks and all-reduced; consumes no
        random numbers."""
        config = self.config
        count = min(len(self.val_windows), config.eval_batches * config.batch_size * self.context.world_size)
        mine = list(range(self.context.rank, count, self.context.world_size))
        most = math.ceil(count / self.context.world_size) if config.fsdp else len(mine)
        chunks = math.ceil(most / config.batch_size)  # FSDP2 all-gathers in each forward: every rank runs as many
        # (rank 0's count); a rank with no windows left runs one and weighs it 0
        totals = torch.zeros(2, dtype=torch.float64, device=self.context.device)
        model = self.model if model is None else model
        model.eval()
        weights = eval_weights(self.optimizer) if model is self.model else contextlib.nullcontext()
        with weights:  # schedule-free optimizers: the averaged weights
            for start in range(0, chunks * config.batch_size, config.batch_size):
                chunk = mine[start:start + config.batch_size]
                inputs, targets = self.val_windows.batch(chunk or [0])
                with self._autocast():
                    _, loss = model(inputs.to(self.context.device), targets.to(self.context.device))
                windows = torch.tensor(float(len(chunk)), dtype=torch.float64, device=self.context.device)
                totals += torch.stack([loss.double() * len(chunk), windows])
        model.train()
        totals = all_reduce_sum(totals, self.context)
        return float(totals[0] / totals[1])

    @torch.no_grad()
    def sample(self, length: int, prompt: str = "\n", *, temperature: float = 0.8, top_k: int | None = 20,
               seed: int = 0) -> str:
        """``length`` characters generated after ``prompt`` (its characters must be in the vocabulary)."""
        generator = torch.Generator(device=self.context.device).manual_seed(seed)
        start = self.vocab.encode(prompt).unsqueeze(0).to(self.context.device)
        self.model.eval()
        with eval_weights(self.optimizer):
            ids = self.model.generate(start, length, temperature=temperature, top_k=top_k, generator=generator)
        self.model.train()
        return self.vocab.decode(ids[0, start.shape[1]:])

    # ------------------------------------------------------------------ checkpoints

    def save(self) -> None:
        """Write ``out_dir/checkpoint.pt`` atomically (rank 0), keeping the previous ``keep_checkpoints - 1``; under
        ``--fsdp`` the sharded ``out_dir/checkpoint.dcp`` instead (:mod:`optimlab.train.dcp_checkpoint`: each rank
        writes its shards, rank 0 the rest; atomic, the previous versions kept likewise).

        Every rank must call it: the parameters and optimizer state are first checked for NaN/inf on every
        rank (a non-finite checkpoint is never written: :class:`CheckpointError` names the tensors and the
        step, and the last good checkpoint stays), the optimizer state is consolidated from the ZeRO shards,
        and the RNG states of all ranks are gathered."""
        self._check_finite()
        if self.config.zero:
            self.optimizer.consolidate_state_dict(to=0)
        rng_states = all_gather_objects(capture_rng_state(), self.context)
        if not (self.context.is_main or self.config.fsdp):
            return
        payload = {
            "step": self.step,
            "epoch": self.epoch,
            "batch_in_epoch": self.batch_in_epoch,
            "tokens_seen": self.tokens_seen,
            "world_size": self.context.world_size,
            "global_batch": self.config.batch_size * self.context.world_size,
            "model_config": self.model_config.to_dict(),
            "train_config": self.config.to_dict(),
            "vocab": self.vocab.chars,
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "clipper": self.clipper.state_dict(),
            "guard": self.guard.state_dict() if self.guard is not None else None,
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "rng": rng_states,
            "monitor": self.monitor.state_dict() if self.monitor is not None else None,
            "resumes": self.resumes,
            "ema": self.ema.state_dict() if self.ema is not None else None,
        }
        if self.config.fsdp:  # each rank writes its shards (torch.distributed.checkpoint); rank 0 the rest
            self.sharded_files.save(self.model, self.optimizer, payload)
        else:
            self.files.save({**payload, "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict()},
                            self._latest_step)
        self._latest_step = self.step

    def _check_finite(self) -> None:
        """Raise :class:`CheckpointError` on every rank when any rank's parameters or optimizer state hold NaN/inf."""
        local = self.optimizer.optim if self.config.zero else self.optimizer  # ZeRO: this rank's shard
        names = None
        if not self.config.zero:
            by_id = {id(p): name for name, p in self.model.named_parameters()}
            names = [by_id.get(id(p), "?") for group in local.param_groups for p in group["params"]]
        bad = nonfinite_tensors(local_state(self.model.state_dict()), local_state(local.state_dict()), names)
        total = int(all_reduce_sum(torch.tensor([float(len(bad))], device=self.context.device), self.context).item())
        if total == 0:
            return
        kept = (f"the last good checkpoint (step {self._latest_step}) is kept in {self.out_dir}"
                if self._latest_step is not None else "no checkpoint of this run was written before")
        found = short_list(bad) if bad else "another rank's optimizer state"
        raise CheckpointError(f"not writing the checkpoint of step {self.step}: non-finite values in {found}; "
                              f"{kept}")

    def _restore(self, saved: dict[str, Any], rebuild_schedule: bool = False) -> None:
        if SHARDED_KEY in saved:  # into the model and optimizer as they are sharded now (DCP reshards)
            load_sharded(saved[SHARDED_KEY], self.model, self.optimizer)
        else:
            if not self.config.fsdp:  # under FSDP2 the whole weights were loaded before sharding
                self.model.load_state_dict(saved["model"])
            self.optimizer.load_state_dict(saved["optimizer"])
            if self.config.fsdp:
                shard_optimizer_state(self.optimizer)
        for name in ("guard", "scaler"):
            component = getattr(self, name)
            if component is not None and saved.get(name) is not None:
                component.load_state_dict(saved[name])
        if self.scheduler is not None and saved.get("scheduler") is not None:
            if rebuild_schedule and not needs_metric(self.scheduler):
                self._rebuild_scheduler(int(saved["scheduler"]["last_epoch"]))
            else:
                self.scheduler.load_state_dict(saved["scheduler"])
        self.clipper.load_state_dict(saved["clipper"])
        if self.ema is not None:
            self.ema.load_state_dict(saved["ema"])
        self.step, self.epoch = saved["step"], saved["epoch"]
        self.batch_in_epoch, self.tokens_seen = saved["batch_in_epoch"], saved["tokens_seen"]
        # Batch b of an epoch is the same windows for any split of a global batch over ranks, so the position
        # carries over to another world size / per-rank batch when the global batch divides the windows used.
        global_batch = self.config.batch_size * self.context.world_size
        windows_used = self.batch_in_epoch * saved["global_batch"]
        if windows_used % global_batch == 0:
            self.batch_in_epoch = windows_used // global_batch
        else:
            self.epoch, self.batch_in_epoch = self.epoch + 1, 0
        rng_states = saved["rng"]
        if self.context.rank < len(rng_states):
            restore_rng_state(rng_states[self.context.rank])

    def _rebuild_scheduler(self, scheduled_steps: int) -> None:
        """The schedule for the new ``config.steps``, advanced to where the stored one was (``scheduled_steps``
        optimizer steps taken): a resume that changes the run's length continues on the new schedule."""
        for group in self.optimizer.param_groups:
            set_group_value(group, "lr", group["initial_lr"])
        self.scheduler = self.policy.scheduler = _build_scheduler(self.config, self.optimizer)
        with warnings.catch_warnings():  # "scheduler.step() before optimizer.step()": replaying, not training
            warnings.simplefilter("ignore", UserWarning)
            for _ in range(scheduled_steps):
                step_scheduler(self.scheduler)

    # ------------------------------------------------------------------ outputs (rank 0 only)

    def _open_outputs(self, saved: dict[str, Any] | None) -> None:
        """Config, metrics CSV, TensorBoard writer and the optimizer-state monitor with its sinks.
        When resuming, rows logged after the checkpoint by the interrupted run are dropped."""
        self.out_dir.mkdir(parents=True, exist_ok=True)
        stale = self.files.clean_temporaries() + self.sharded_files.clean_temporaries()  # of writes that were killed
        if stale:
            self._print(f"removed {len(stale)} temporary file(s) of an interrupted checkpoint write")
        if saved is None:
            self.files.remove_all()  # --overwrite: the old run's checkpoints go
            self.sharded_files.remove_all()
        self.config.save(self.out_dir / "config.json")
        metrics = self.out_dir / METRICS_NAME
        monitor_csv = self.out_dir / MONITOR_NAME
        if saved is None:
            atomic_write_text(metrics, ",".join(self._csv_fields) + "\n")
            monitor_csv.unlink(missing_ok=True)
        else:
            for path in (metrics, monitor_csv):
                _truncate_csv(path, self.step)
        self._metrics = metrics.open("a", newline="")
        self._csv = csv.DictWriter(self._metrics, fieldnames=self._csv_fields)
        sinks: list[Any] = [CSVSink(monitor_csv, append=monitor_csv.exists())]
        if self.config.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(str(self.out_dir / "tb"), purge_step=self.step + 1 if saved else None)
            sinks.append(TensorBoardSink(writer=self._writer))
        local = self.optimizer.optim if self.config.zero else self.optimizer  # ZeRO: this rank's shard
        self.monitor = OptimizerMonitor(local, every=self.config.monitor_every, sinks=sinks)
        if saved is not None and saved.get("monitor") is not None:
            self.monitor.load_state_dict(saved["monitor"])

    @property
    def _csv_fields(self) -> tuple[str, ...]:
        return _CSV_FIELDS + ((_EMA_FIELD,) if self.ema is not None else ())

    def close(self) -> None:
        """Detach the monitor, close the log files (rank 0) and leave the one-rank process group that ``--fsdp``
        in a single process created."""
        if self.monitor is not None:
            self.monitor.remove()
            self.monitor = None
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if self._metrics is not None:
            self._metrics.close()
            self._metrics = None
        if self._own_group:
            torch.distributed.destroy_process_group()
            self._own_group = False

    def _validation_row(self, step: int) -> dict[str, float]:
        """``val_loss`` (and ``ema_val_loss``, the EMA weights', with ``--ema``), printed."""
        row = {"val_loss": self.evaluate()}
        if self.ema is not None:
            row[_EMA_FIELD] = self.evaluate(self.ema.module)
        self._print(f"step {step}: val loss {row['val_loss']:.4f}"
                    + (f" (EMA weights {row[_EMA_FIELD]:.4f})" if self.ema is not None else ""))
        return row

    def _log(self, values: dict[str, Any]) -> None:
        """One row of metrics.csv, TensorBoard scalars, and a console line for the training metrics (rank 0)."""
        if not self.context.is_main:
            return
        row = {"step": self.step, "epoch": self.epoch,
               "elapsed_s": f"{time.perf_counter() - self._started:.3f}", **values}
        self._csv.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
        self._metrics.flush()
        if self._writer is not None:
            for key, value in values.items():
                self._writer.add_scalar(f"train/{key}", float(value), self.step)
        if "train_loss" in values:
            monitor = self.monitor.summary() if self.monitor is not None else {}
            extra = "".join(f" | {label} {monitor[key]:.3g}" for key, label in
                            (("update_norm/total", "update norm"), ("state_bytes", "state bytes")) if key in monitor)
            self._print(f"step {self.step} | loss {values['train_loss']:.4f} | lr {values['lr']:.3g} | "
                        f"grad norm {values['grad_norm']:.3g} | {values['tokens_per_s']:.0f} tok/s{extra}")

    def _print(self, message: str) -> None:
        if not self.quiet:
            print(message, file=sys.stdout, flush=True)


def _resume_line(path: Path | None, step: int, steps: int, changes: dict[str, tuple[Any, Any]]) -> str:
    """``resuming from <checkpoint> (step N of M); changed: steps 40 -> 80 (schedule rebuilt), ...``."""
    line = f"resuming from {path} (step {step} of {steps})"
    if changes:
        line += "; changed: " + ", ".join(
            f"{name} {old} -> {new}" + (" (schedule rebuilt)" if name == "steps" else "")
            for name, (old, new) in changes.items())
    return line


def _truncate_csv(path: Path, step: int) -> None:
    """Keep the header and the rows of ``path`` whose ``step`` is <= ``step`` (atomically)."""
    if not path.exists():
        return
    with path.open(newline="") as handle:
        rows = list(csv.reader(handle))
    if not rows:
        return
    step_column = rows[0].index("step")
    kept = [rows[0]] + [r for r in rows[1:] if r and float(r[step_column]) <= step]
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerows(kept)
    atomic_write_text(path, buffer.getvalue())


def _param_groups(model: torch.nn.Module, config: TrainConfig) -> list[dict[str, Any]]:
    """The optimizer's param groups: no decay on biases, norms and embeddings, and layer-wise LR decay
    (:func:`optimlab.param_groups`); every parameter in one group for an optimizer that takes a single one
    (L-BFGS, :func:`~optimlab.train.checks.takes_one_group`: it takes no weight decay, so the split would carry
    nothing, and ``layer_decay`` was refused for it up front)."""
    if takes_one_group(get_spec(config.optimizer).resolve()):
        return [{"params": list(model.parameters())}]
    return param_groups(model, config.weight_decay, layer_decay=config.layer_decay, lr=config.lr)


def _build_optimizer(groups: list[dict[str, Any]], config: TrainConfig,
                     note: Any = print) -> torch.optim.Optimizer:
    """The optimizer by registry name; under ``zero`` the same class sharded by ZeroRedundancyOptimizer.
    ``weight_decay`` is passed only to an optimizer that takes it (Rprop does not: ``note`` says it is not
    applied, unless it is 0)."""
    spec = get_spec(config.optimizer)
    accepted = spec.accepted_kwargs()
    takes_decay = accepted is None or "weight_decay" in accepted
    decay = {"weight_decay": config.weight_decay} if takes_decay else {}
    if not takes_decay and config.weight_decay:
        note(f"note: {config.optimizer} takes no weight decay; --weight-decay {config.weight_decay:g} is not applied")
    if not config.zero:
        return create_optimizer(groups, config.optimizer, lr=config.lr, **decay)
    with warnings.catch_warnings():  # torch.distributed.optim's TorchScript helpers warn on import (torch >= 2.9);
        warnings.simplefilter("ignore", DeprecationWarning)  # imported here as it takes seconds
        from torch.distributed.optim import ZeroRedundancyOptimizer

    options = {**spec.preset, "lr": config.lr, **decay}
    return ZeroRedundancyOptimizer(groups, optimizer_class=spec.resolve(), **options)


def _build_scheduler(config: TrainConfig, optimizer: torch.optim.Optimizer) -> Any:
    """The LR schedule by name, stepped once per optimizer step; ``None`` for ``"none"``."""
    if config.schedule == "none":
        return None
    return create_scheduler(config.schedule, optimizer, total_steps=config.steps)

