r"""The seed's two opening experiments on test functions (``optimlab demo functions``).

(a) Rosenbrock from :math:`(-1, 1)`: SGD, SGD with heavy-ball momentum and SGD with Nesterov momentum,
    all at the same learning rate, up to 1000 steps, stopping once the loss is below :math:`10^{-6}`.
    Figure: the three paths over log-spaced contours (:func:`optimlab.bench.plots.trajectories_plot`).

(b) The 10-D nonconvex sum :math:`\sum_i (x_i - i)^2 + 0.1\sum_i \sin^2(10x_i) + 0.01\sum_i x_i^4` from one
    seeded random start: SGD, SGD with momentum, Adam and AdamW. Its global minimum is not 0 (the
    quartic term makes it about 59.09), so convergence is measured on the optimality gap
    :math:`f(x) - f^*`: "converged" means gap :math:`< 10^{-3}`. The sine ripples create many local
    minima, so the figure also shows when each run *settled* (its loss stayed within
    :math:`10^{-3}` of its final value). Figure: gap curves (log scale), final coordinates next to
    the global minimiser, steps to converge / settle.

Every optimizer is built by name through :func:`optimlab.optim.create_optimizer`, so the demo is also
an example of the API.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from optimlab.bench.plots import trajectories_plot  # noqa: E402
from optimlab.bench.problems import Problem, get_problem  # noqa: E402
from optimlab.io import atomic_savefig, atomic_write_text  # noqa: E402
from optimlab.optim import create_optimizer, get_spec  # noqa: E402

__all__ = [
    "NONCONVEX_OPTIMIZERS",
    "ROSENBROCK_OPTIMIZERS",
    "FunctionsDemo",
    "PointRun",
    "optimize_point",
    "plot_nonconvex",
    "results_markdown",
    "results_rows",
    "run_functions_demo",
    "write_functions_demo",
]

ROSENBROCK_START = (-1.0, 1.0)
ROSENBROCK_TOLERANCE = 1e-6
NONCONVEX_TOLERANCE = 1e-3

#: label -> (registry name, keyword arguments). One learning rate for all three, below 2 / λ_max(∇²f(1, 1)) ≈ 0.002.
ROSENBROCK_OPTIMIZERS: dict[str, tuple[str, dict[str, Any]]] = {
    "SGD": ("sgd", {"lr": 1.5e-3}),
    "SGD + momentum 0.9": ("sgd-momentum", {"lr": 1.5e-3}),
    "SGD + Nesterov 0.9": ("sgd-nesterov", {"lr": 1.5e-3}),
}

#: label -> (registry name, keyword arguments) for the 10-D nonconvex sum.
NONCONVEX_OPTIMIZERS: dict[str, tuple[str, dict[str, Any]]] = {
    "SGD": ("sgd", {"lr": 0.02}),
    "SGD + momentum 0.9": ("sgd-momentum", {"lr": 0.01}),
    "Adam": ("adam", {"lr": 0.05}),
    "AdamW": ("adamw", {"lr": 0.05, "weight_decay": 0.01}),
}


@dataclass
class PointRun:
    """One optimizer on one test function.

    Attributes:
        label: display name.
        optimizer: registry name and keyword arguments, as text.
        losses: :math:`f(x_t)` for :math:`t = 0, 1, \\dots` (the last entry is the final point's loss).
        points: the iterates :math:`x_t`.
        min_value: :math:`f^*`, the problem's global minimum value.
        tolerance: the gap below which the run counts as converged (and stops).
    """

    label: str
    optimizer: str
    min_value: float
    tolerance: float
    losses: list[float] = field(default_factory=list)
    points: list[list[float]] = field(default_factory=list)

    @property
    def steps(self) -> int:
        """Optimizer steps taken."""
        return len(self.losses) - 1

    @property
    def final_gap(self) -> float:
        r"""Final optimality gap :math:`f(x_T) - f^*`."""
        return self.losses[-1] - self.min_value

    @property
    def converged_at(self) -> int | None:
        """The first step whose gap is below :attr:`tolerance`, or ``None``."""
        return next((t for t, loss in enumerate(self.losses) if loss - self.min_value < self.tolerance), None)

    @property
    def settled_at(self) -> int:
        """The first step after which the loss stays within :attr:`tolerance` of its final value."""
        final = self.losses[-1]
        far = [t for t, loss in enumerate(self.losses) if abs(loss - final) >= self.tolerance]
        return far[-1] + 1 if far else 0


def optimize_point(problem: Problem, label: str, name: str, kwargs: dict[str, Any], *, max_steps: int,
                   tolerance: float, start: torch.Tensor | None = None) -> PointRun:
    """Minimise ``problem`` from ``start`` (default: its start point) with the registry optimizer
    ``name``; stop after ``max_steps`` steps or once :math:`f(x) - f^* <` ``tolerance``."""
    x = torch.nn.Parameter((problem.start_tensor() if start is None else start).clone())
    optimizer = create_optimizer([x], name, **kwargs)
    settings = ", ".join(f"{key}={value:g}" if isinstance(value, float) else f"{key}={value}"
                         for key, value in {**get_spec(name).preset, **kwargs}.items())
    run = PointRun(label, f"{name}({settings})", problem.min_value, tolerance)
    for step in range(max_steps + 1):
        optimizer.zero_grad()
        loss = problem(x)
        run.losses.append(loss.item())
        run.points.append(x.detach().tolist())
        if step == max_steps or run.losses[-1] - problem.min_value < tolerance:
            break
        loss.backward()
        optimizer.step()
    return run


@dataclass
class FunctionsDemo:
    """Both experiments' runs and problems."""

    rosenbrock: Problem
    rosenbrock_runs: list[PointRun]
    nonconvex: Problem
    nonconvex_runs: list[PointRun]


def run_functions_demo(*, max_steps: int = 1000, seed: int = 0,
                       on_run: Callable[[PointRun], None] | None = None) -> FunctionsDemo:
    """Run experiments (a) and (b) (module docstring); ``seed`` draws the nonconvex start point and
    ``on_run`` is called after each run (progress reporting)."""
    if max_steps < 1:
        raise ValueError(f"Invalid max_steps: {max_steps} (accepted range: >= 1)")
    rosenbrock = get_problem("rosenbrock", start=ROSENBROCK_START)
    nonconvex = get_problem("nonconvex-10d", seed=seed)
    demo = FunctionsDemo(rosenbrock, [], nonconvex, [])
    experiments = [
        (rosenbrock, ROSENBROCK_OPTIMIZERS, ROSENBROCK_TOLERANCE, demo.rosenbrock_runs),
        (nonconvex, NONCONVEX_OPTIMIZERS, NONCONVEX_TOLERANCE, demo.nonconvex_runs),
    ]
    for problem, optimizers, tolerance, runs in experiments:
        for label, (name, kwargs) in optimizers.items():
            runs.append(optimize_point(problem, label, name, kwargs, max_steps=max_steps, tolerance=tolerance))
            if on_run is not None:
                on_run(runs[-1])
    return demo


def plot_nonconvex(problem: Problem, runs: list[PointRun], path: str | Path) -> Path:
    """Three panels: gap curves (log y), final coordinates vs the global minimiser, steps to converge / settle."""
    fig, (curves, coordinates, steps) = plt.subplots(1, 3, figsize=(17, 4.8))
    for index, run in enumerate(runs):
        gaps = np.clip(np.asarray(run.losses) - run.min_value, 1e-12, None)
        curves.plot(np.arange(len(gaps)), gaps, color=f"C{index}", lw=1.5, label=f"{run.label} ({run.optimizer})")
    curves.axhline(NONCONVEX_TOLERANCE, color="gray", ls="--", lw=1, label=f"converged: gap < {NONCONVEX_TOLERANCE:g}")
    curves.set_yscale("log")
    curves.set_xlabel("step")
    curves.set_ylabel(r"optimality gap $f(x_t) - f^*$")
    curves.set_title(f"loss curves ($f^*$ = {problem.min_value:.4f})")
    curves.grid(alpha=0.3, which="both")
    curves.legend(fontsize=7)

    dim = problem.dim
    width = 0.8 / (len(runs) + 1)
    for index, run in enumerate(runs):
        coordinates.bar(np.arange(dim) - 0.4 + width * (index + 0.5), run.points[-1], width=width,
                        color=f"C{index}", label=run.label)
    coordinates.bar(np.arange(dim) - 0.4 + width * (len(runs) + 0.5), problem.minima[0], width=width,
                    color="black", alpha=0.6, label="global minimiser")
    coordinates.plot(np.arange(dim), np.arange(dim), "x", color="tab:red", label="arange(10)")
    coordinates.set_xticks(np.arange(dim), [f"x{i}" for i in range(dim)])
    coordinates.set_xlabel("coordinate")
    coordinates.set_ylabel("final value")
    coordinates.set_title("final parameters vs target")
    coordinates.grid(alpha=0.3, axis="y")
    coordinates.legend(fontsize=7, ncol=2)

    positions = np.arange(len(runs))
    max_steps = max(run.steps for run in runs)
    converged = [run.converged_at for run in runs]
    settled = [run.settled_at for run in runs]
    steps.bar(positions - 0.2, [c if c is not None else 0 for c in converged], width=0.4, color="tab:green",
              label=f"converged (gap < {NONCONVEX_TOLERANCE:g})")
    steps.bar(positions + 0.2, settled, width=0.4, color="tab:gray",
              label=f"settled (within {NONCONVEX_TOLERANCE:g} of own final loss)")
    for x, run, step in zip(positions, runs, converged):
        text = f"{step}" if step is not None else f"not reached\ngap {run.final_gap:.2g}"
        steps.text(x - 0.2, (step or 0) + 0.02 * max_steps, text, ha="center", va="bottom", fontsize=7)
    for x, step in zip(positions, settled):
        steps.text(x + 0.2, step + 0.02 * max_steps, str(step), ha="center", va="bottom", fontsize=7)
    steps.set_xticks(positions, [run.label for run in runs], rotation=15, ha="right")
    steps.set_ylim(0, max_steps * 1.3)
    steps.set_xlabel("optimizer")
    steps.set_ylabel("steps")
    steps.set_title(f"steps to convergence (of {max_steps} max)")
    steps.legend(fontsize=7, loc="upper left")

    fig.suptitle(f"10-D nonconvex sum: {problem.description}", fontsize=11)
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    try:
        return atomic_savefig(fig, path)
    finally:
        plt.close(fig)


def results_rows(demo: FunctionsDemo) -> list[dict[str, Any]]:
    """One row per run: experiment, optimizer, steps, converged step (or None), settled step, final loss and gap,
    distance to the nearest global minimiser."""
    rows = []
    for experiment, problem, runs in (("rosenbrock", demo.rosenbrock, demo.rosenbrock_runs),
                                      ("nonconvex-10d", demo.nonconvex, demo.nonconvex_runs)):
        for run in runs:
            rows.append({
                "experiment": experiment,
                "optimizer": run.label,
                "settings": run.optimizer,
                "steps": run.steps,
                "converged_at": run.converged_at,
                "settled_at": run.settled_at,
                "final_loss": run.losses[-1],
                "final_gap": run.final_gap,
                "distance": problem.distance_to_minimum(torch.tensor(run.points[-1])),
            })
    return rows


def results_markdown(rows: list[dict[str, Any]]) -> str:
    """The results table as Markdown."""
    header = "| experiment | optimizer | settings | steps | converged at | settled at | final loss | final gap | distance to min |"
    lines = [header, "|" + "---|" * 9]
    for row in rows:
        converged = "not reached" if row["converged_at"] is None else str(row["converged_at"])
        lines.append(f"| {row['experiment']} | {row['optimizer']} | {row['settings']} | {row['steps']} | {converged} "
                     f"| {row['settled_at']} | {row['final_loss']:.6g} | {row['final_gap']:.3g} | {row['distance']:.3g} |")
    return "\n".join(lines) + "\n"


def write_functions_demo(demo: FunctionsDemo, out_dir: str | Path) -> dict[str, Path]:
    """Write ``rosenbrock.png``, ``nonconvex.png`` and ``functions.md`` (the table) into ``out_dir``, atomically."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    trajectories = {f"{run.label}, lr {ROSENBROCK_OPTIMIZERS[run.label][1]['lr']:g}": run.points
                    for run in demo.rosenbrock_runs}
    paths = {
        "rosenbrock": trajectories_plot(
            demo.rosenbrock, trajectories, out / "rosenbrock.png",
            f"Rosenbrock from {ROSENBROCK_START}: up to {max(r.steps for r in demo.rosenbrock_runs)} steps, "
            f"stop at loss < {ROSENBROCK_TOLERANCE:g}",
        ),
        "nonconvex": plot_nonconvex(demo.nonconvex, demo.nonconvex_runs, out / "nonconvex.png"),
        "table": out / "functions.md",
    }
    atomic_write_text(paths["table"], results_markdown(results_rows(demo)))
    return paths
