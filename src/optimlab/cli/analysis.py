"""``optimlab lr-find``, ``optimlab landscape`` and ``optimlab hessian`` on the bench's tasks."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import typer
from rich.console import Console
from rich.table import Table

from optimlab.cli.app import app, check_writable, fail

_TASK = typer.Option("digits-mlp", "--task", "-t", help="Bench task name (see `optimlab tasks`) or your own: "
                     "PATH.py:NAME / package.module:NAME.")
_OPTIMIZER = typer.Option("adamw", "--optimizer", help="Optimizer registry name (see `optimlab optimizers`).")
_SEED = typer.Option(0, help="Seed of the task (initial weights, batch order) and of the random directions/probes.")
_QUIET = typer.Option(False, "--quiet", "-q", help="No progress output.")
_CHECKPOINT = typer.Option(None, "--checkpoint", help="A torch.save'd state_dict (or a dict with a 'model' entry).")
_TRAIN_STEPS = typer.Option(300, help="Without --checkpoint: train this many steps first (0 = analyse the init).")
_LR = typer.Option(None, "--lr", help="Learning rate of the short training. \\[default: the optimizer's default]")
_BATCHES = typer.Option(4, "--batches", help="How many fixed training batches the analysis evaluates on.")


def _task_instance(task: str, seed: int) -> tuple[Any, Any]:
    from optimlab.bench.tasks import TaskLoadError, get_task

    try:
        spec = get_task(task)
    except (KeyError, TaskLoadError) as err:
        raise fail(str(err.args[0])) from None
    return spec, spec.build(seed)


def _loss_fn(instance: Any):
    """The analysis' ``loss_fn(model, batch)`` over a task's ``loss(batch)`` (which closes over its model)."""
    return lambda _model, batch: instance.loss(batch)


def _optimizer(model: torch.nn.Module, name: str, lr: float | None) -> torch.optim.Optimizer:
    from optimlab.optim.registry import create_optimizer

    try:
        return create_optimizer(model, name, lr=lr)
    except (KeyError, TypeError, ValueError) as err:
        raise fail(str(err.args[0] if err.args else err)) from None


def _prepare(instance: Any, checkpoint: Path | None, train_steps: int, optimizer_name: str, lr: float | None,
             quiet: bool) -> tuple[dict[str, torch.Tensor], torch.optim.Optimizer]:
    """Load ``checkpoint`` or train ``train_steps``; return the initial parameters and the optimizer."""
    from optimlab.analysis._params import training_step
    from optimlab.progress import progress

    model = instance.model
    initial = {name: p.detach().clone() for name, p in model.named_parameters()}
    optimizer = _optimizer(model, optimizer_name, lr)
    if checkpoint is not None:
        if not checkpoint.is_file():
            raise fail(f"no checkpoint at {checkpoint}")
        payload = torch.load(checkpoint, map_location="cpu", weights_only=True)
        state = payload.get("model", payload) if isinstance(payload, dict) else payload
        try:
            model.load_state_dict(state)
        except (RuntimeError, TypeError, AttributeError) as err:
            raise fail(f"checkpoint {checkpoint} does not fit the task's model: {err}") from None
        return initial, optimizer
    _check_train_steps(train_steps)
    model.train()
    with progress("train", total=train_steps, quiet=quiet) as bar:
        for _ in range(train_steps):
            loss = training_step(model, optimizer, _loss_fn(instance), next(instance.batches))
            bar.advance(loss=loss)
    return initial, optimizer


def _check_train_steps(train_steps: int) -> None:
    if train_steps < 0:
        raise fail(f"Invalid --train-steps: {train_steps} (accepted range: >= 0)")


def _momentum(optimizer: torch.optim.Optimizer, given: float | None) -> float:
    """``given``, else the first param group's heavy-ball ``momentum`` (0 when it has none)."""
    return float(optimizer.param_groups[0].get("momentum", 0.0)) if given is None else given


def _fixed_batches(instance: Any, count: int) -> list[Any]:
    if count < 1:
        raise fail(f"Invalid --batches: {count} (accepted range: >= 1)")
    return [next(instance.batches) for _ in range(count)]


def _print_rows(title: str, rows: list[tuple[str, str]]) -> None:
    table = Table(title=title)
    table.add_column("quantity")
    table.add_column("value")
    for key, value in rows:
        table.add_row(key, value)
    Console().print(table)


def _sibling(path: Path, suffix: str) -> Path:
    return path.with_name(f"{path.stem}_{suffix}{path.suffix or '.png'}")


@app.command("lr-find")
def lr_find_command(
    task: str = _TASK,
    optimizer: str = _OPTIMIZER,
    start_lr: float = typer.Option(1e-7, help="First learning rate."),
    end_lr: float = typer.Option(10.0, help="Last learning rate."),
    num_iter: int = typer.Option(100, help="Steps of the sweep."),
    mode: str = typer.Option("exp", help="LR growth: 'exp' or 'linear'."),
    diverge_factor: float = typer.Option(4.0, help="Stop once the smoothed loss exceeds this multiple of the best."),
    seed: int = _SEED,
    output: Path = typer.Option(Path("lr_find.png"), "--output", "-o", help="PNG to write."),
    quiet: bool = _QUIET,
) -> None:
    """LR range test (Smith 2015): sweep the LR, plot loss vs LR, print the suggested LRs."""
    from optimlab.analysis.lr_find import lr_find, plot_lr_find

    spec, instance = _task_instance(task, seed)
    opt = _optimizer(instance.model, optimizer, None)
    check_writable(output.parent, "--output")
    try:
        result = lr_find(instance.model, opt, _loss_fn(instance), instance.batches, start_lr=start_lr, end_lr=end_lr,
                         num_iter=num_iter, mode=mode, diverge_factor=diverge_factor, quiet=quiet)
    except ValueError as err:
        raise fail(str(err)) from None
    path = plot_lr_find(result, output, title=f"LR range test: {spec.name}, {optimizer}")
    steepest = result.steepest_lr
    _print_rows(f"lr-find: {spec.name}, {optimizer}", [
        ("suggested LR (steepest descent)", f"{steepest:.4g}" if steepest is not None else "— (curve too short)"),
        ("min-loss LR / 10", f"{result.min_loss_lr / 10:.4g}"),
        ("min-loss LR", f"{result.min_loss_lr:.4g}"),
        ("smoothed loss: first / min", f"{result.smoothed_losses[0]:.4g} / {min(result.smoothed_losses):.4g}"),
        ("steps run", f"{len(result.lrs)} of {num_iter}" + (" (stopped at divergence)" if result.diverged else "")),
    ])
    typer.echo(f"suggested lr: {result.suggested_lr:.4g}")
    typer.echo(f"wrote {path}")


@app.command("landscape")
def landscape_command(
    task: str = _TASK,
    checkpoint: Path = _CHECKPOINT,
    train_steps: int = _TRAIN_STEPS,
    optimizer: str = _OPTIMIZER,
    lr: float = _LR,
    resolution: int = typer.Option(21, help="Grid points per axis of the 2-D slice."),
    span: float = typer.Option(1.0, help="The grid covers [-span, span] along each direction."),
    normalization: str = typer.Option("filter", help="Direction normalization: filter (Li et al. 2018), layer, none."),
    batches: int = _BATCHES,
    probe: list[str] = typer.Option(None, "--probe", help="Also probe this parameter with Gaussian noise (repeatable)."),
    probe_scale: float = typer.Option(0.01, help="Noise standard deviation of --probe."),
    probe_samples: int = typer.Option(10, help="Noise draws of --probe."),
    seed: int = _SEED,
    output: Path = typer.Option(Path("landscape.png"), "--output", "-o", help="Contour PNG; _surface and _interp beside it."),
    quiet: bool = _QUIET,
) -> None:
    """Loss landscape around the trained parameters: 2-D contour + surface, and init→trained interpolation."""
    from optimlab.analysis.landscape import (
        interpolate,
        perturbation_probe,
        plot_contour,
        plot_slice_1d,
        plot_surface,
        random_direction,
        slice_2d,
    )

    if resolution < 2:
        raise fail(f"Invalid --resolution: {resolution} (accepted range: >= 2)")
    if not span > 0:
        raise fail(f"Invalid --span: {span} (accepted range: > 0)")
    spec, instance = _task_instance(task, seed)
    data = _fixed_batches(instance, batches)
    check_writable(output.parent, "--output")
    initial, _ = _prepare(instance, checkpoint, train_steps, optimizer, lr, quiet)
    model, loss_fn = instance.model, _loss_fn(instance)
    if spec.family == "function" and normalization == "filter":
        normalization = "none"  # a single 1-D coordinate vector has no filters: plain Gaussian directions
    generator = torch.Generator().manual_seed(seed)
    try:
        direction_x = random_direction(model, normalization, generator=generator)
        direction_y = random_direction(model, normalization, generator=generator)
        for name in probe or []:
            stats = perturbation_probe(model, loss_fn, data, name, probe_scale, probe_samples, generator)
            _print_rows(f"probe {name} (σ = {probe_scale:g}, {probe_samples} draws)", [
                ("loss without noise", f"{stats.base_loss:.6g}"),
                ("mean ± std", f"{stats.mean:.6g} ± {stats.std:.3g}"),
                ("min / max", f"{stats.min:.6g} / {stats.max:.6g}"),
            ])
    except ValueError as err:
        raise fail(str(err)) from None
    grid = np.linspace(-span, span, resolution if resolution % 2 else resolution + 1)  # odd: the grid holds 0
    plane = slice_2d(model, loss_fn, data, direction_x, direction_y, grid, grid, quiet=quiet)
    alphas = np.linspace(-0.25, 1.25, 31)
    trained = {name: p.detach().clone() for name, p in model.named_parameters()}
    line = interpolate(model, loss_fn, data, initial, trained, alphas, quiet=quiet)
    where = f"{spec.name}, {normalization}-normalized directions"
    paths = [
        plot_contour(plane, output, title=f"Loss landscape: {where}"),
        plot_surface(plane, _sibling(output, "surface"), title=f"Loss surface: {where}"),
        plot_slice_1d({"initial → final parameters": line}, _sibling(output, "interp"), marks=(0.0, 1.0),
                      title=f"Linear interpolation: {spec.name}", log_y=bool(np.all(line.losses > 0))),
    ]
    center = plane.losses[len(grid) // 2, len(grid) // 2]
    _print_rows(f"landscape: {spec.name}", [
        ("loss at the parameters (0, 0)", f"{center:.6g}"),
        ("grid min / max", f"{plane.losses.min():.6g} / {plane.losses.max():.6g}"),
        ("interpolation: loss at init / midpoint / final",
         " / ".join(f"{line.losses[i]:.6g}" for i in (5, 15, 25))),
    ])
    for path in paths:
        typer.echo(f"wrote {path}")


@app.command("hessian")
def hessian_command(
    task: str = _TASK,
    checkpoint: Path = _CHECKPOINT,
    train_steps: int = _TRAIN_STEPS,
    optimizer: str = _OPTIMIZER,
    lr: float = _LR,
    k: int = typer.Option(5, "--k", help="How many top eigenvalues to report."),
    probes: int = typer.Option(100, help="Rademacher probes of Hutchinson's trace estimate."),
    max_iter: int = typer.Option(300, help="Lanczos steps at most."),
    tol: float = typer.Option(1e-4, help="Lanczos stops when every reported Ritz residual is below tol x max|λ|."),
    slq_runs: int = typer.Option(4, help="Random starts of the stochastic Lanczos quadrature density."),
    slq_steps: int = typer.Option(60, help="Lanczos steps per SLQ run."),
    momentum: float = typer.Option(None, help="Heavy-ball momentum of the bound (2+2β)/λmax. "
                                   "\\[default: the optimizer's]"),
    track_every: int = typer.Option(0, help="Record λmax every N training steps (edge of stability); "
                                    "writes <output>_sharpness.png. Needs training, not --checkpoint."),
    batches: int = _BATCHES,
    seed: int = _SEED,
    output: Path = typer.Option(Path("hessian.png"), "--output", "-o", help="Eigenvalue-density PNG to write."),
    quiet: bool = _QUIET,
) -> None:
    """Hessian at the trained parameters: top-k eigenvalues, λmin, trace ± SE, sign pattern, 2/λmax vs the LR."""
    from optimlab.analysis.hessian import HessianOperator, analyze_curvature, plot_spectrum, spectral_density
    from optimlab.analysis.sharpness import plot_sharpness, track_sharpness

    spec, instance = _task_instance(task, seed)
    data, loss_fn = _fixed_batches(instance, batches), _loss_fn(instance)
    generator = torch.Generator().manual_seed(seed)
    check_writable(output.parent, "--output")
    paths = []
    if track_every:
        if checkpoint is not None:
            raise fail("--track-every trains the model, so it cannot start from --checkpoint")
        _check_train_steps(train_steps)
        opt = _optimizer(instance.model, optimizer, lr)
        beta = _momentum(opt, momentum)
        try:
            trace = track_sharpness(instance.model, opt, loss_fn, instance.batches, data, steps=train_steps,
                                    every=track_every, momentum=beta, tol=1e-3, generator=generator, quiet=quiet)
        except ValueError as err:
            raise fail(str(err)) from None
        paths.append(plot_sharpness(trace, _sibling(output, "sharpness"),
                                    title=f"Sharpness during training: {spec.name}, {optimizer}"))
        typer.echo("λmax limit = (2+2β)/lr: gradient descent at this lr is stable while λmax stays below it")
        typer.echo("step  loss  λmax  λmax-limit")
        for row in zip(trace.steps, trace.losses, trace.sharpness, trace.stability_bounds()):
            typer.echo(f"{row[0]}  {row[1]:.5g}  {row[2]:.5g}  {row[3]:.5g}")
    else:
        _, opt = _prepare(instance, checkpoint, train_steps, optimizer, lr, quiet)
        beta = _momentum(opt, momentum)
    lr_in_use = float(opt.param_groups[0]["lr"])
    try:
        report = analyze_curvature(instance.model, loss_fn, data, k=k, lr=lr_in_use, momentum=beta,
                                   num_probes=probes, max_iter=max_iter, tol=tol, generator=generator)
        operator = HessianOperator(instance.model, loss_fn, data)
        density = spectral_density(operator, operator.dim, num_runs=slq_runs, num_steps=slq_steps,
                                   dtype=operator.dtype, generator=generator)
    except ValueError as err:
        raise fail(str(err)) from None
    paths.insert(0, plot_spectrum(density, output, report=report,
                                  title=f"Hessian eigenvalue density (SLQ): {spec.name}"))
    typer.echo(f"hessian: {spec.name}, {operator.dim} parameters, {batches} batches, optimizer {optimizer} "
               f"(lr {lr_in_use:g})")
    for text in report.lines():
        typer.echo(f"  {text}")
    if not optimizer.lower().removeprefix("torch.").startswith("sgd"):
        typer.echo("  note: the bound is gradient descent's; adaptive optimizers precondition the Hessian "
                   "(Cohen et al. 2022), so compare with care")
    for path in paths:
        typer.echo(f"wrote {path}")
