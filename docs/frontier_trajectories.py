"""Trajectories of the frontier optimizers on two 2-D test functions (the pictures of docs/frontier_optimizers.md).

The point (x, y) is one parameter of shape (1, 2), a 1 x 2 matrix, so SOAP and Shampoo precondition it
(a 1 x 1 and a 2 x 2 factor) instead of falling back to Adam as they would for a vector. Each optimizer runs
300 steps from the problem's start point at one hand-picked learning rate (listed in the legend; the
lr-free ones at lr 1.0); SAM is around SGD with momentum 0.9. Writes ``docs/frontier/trajectories.png`` (all
of them) and, for each algorithm page, ``docs/frontier/<name>-trajectory.png`` (that optimizer against AdamW;
for the lr-free ones a third panel with their step-size estimate d per step).

    OMP_NUM_THREADS=1 python docs/frontier_trajectories.py      # a few seconds
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from optimlab.bench.problems import get_problem  # noqa: E402
from optimlab.io import atomic_savefig  # noqa: E402
from optimlab.optim import ADOPT, SAM, SOAP, AdamW, DAdaptAdam, Prodigy, Shampoo  # noqa: E402

STEPS = 300
OPTIMIZERS: dict[str, tuple[Callable, dict]] = {
    "AdamW": (lambda p, lr: AdamW(p, lr=lr, weight_decay=0.0), {"rosenbrock": 0.05, "quadratic": 0.05}),
    "AdamW cautious": (lambda p, lr: AdamW(p, lr=lr, weight_decay=0.0, cautious=True),
                       {"rosenbrock": 0.05, "quadratic": 0.05}),
    "ADOPT": (lambda p, lr: ADOPT(p, lr=lr), {"rosenbrock": 0.05, "quadratic": 0.05}),
    "SOAP": (lambda p, lr: SOAP(p, lr=lr, weight_decay=0.0, precondition_frequency=5),
             {"rosenbrock": 0.05, "quadratic": 0.05}),
    "Shampoo": (lambda p, lr: Shampoo(p, lr=lr, precondition_frequency=5, start_preconditioning_step=5, epsilon=1e-6),
                {"rosenbrock": 0.05, "quadratic": 0.05}),
    "Prodigy": (lambda p, lr: Prodigy(p, lr=lr), {"rosenbrock": 1.0, "quadratic": 1.0}),
    "DAdaptAdam": (lambda p, lr: DAdaptAdam(p, lr=lr), {"rosenbrock": 1.0, "quadratic": 1.0}),
    "SAM (SGD-momentum)": (lambda p, lr: SAM(p, "sgd-momentum", rho=0.05, lr=lr),
                           {"rosenbrock": 2e-4, "quadratic": 0.01}),
}


PAGES = {"AdamW cautious": "cautious", "ADOPT": "adopt", "SOAP": "soap", "Shampoo": "shampoo", "Prodigy": "prodigy",
         "DAdaptAdam": "dadapt-adam", "SAM (SGD-momentum)": "sam"}
"""optimizer -> the name of its page's figure (``frontier/<name>-trajectory.png``), drawn against AdamW."""


def trajectory(name: str, problem) -> tuple[np.ndarray, float, list[float]]:
    """The path of ``name`` on ``problem``, its final value and (lr-free ones) its d after each step."""
    make, lrs = OPTIMIZERS[name]
    point = torch.tensor([problem.start], dtype=torch.float64, requires_grad=True)
    optimizer = make([point], lrs[problem.name])
    path = [point.detach().clone().numpy()[0]]
    estimates = []

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = problem(point[0])
        loss.backward()
        return loss

    for _ in range(STEPS):
        optimizer.step(closure)
        path.append(point.detach().clone().numpy()[0])
        if hasattr(optimizer, "d"):
            estimates.append(float(optimizer.d))
    return np.array(path), float(problem(point[0].detach())), estimates


def draw(axis, problem, names: list[str], runs: dict) -> None:
    """The problem's contours, the start, the minima and the paths of ``names``."""
    (x_low, x_high), (y_low, y_high) = problem.bounds
    xs, ys = np.meshgrid(np.linspace(x_low, x_high, 300), np.linspace(y_low, y_high, 300))
    values = problem(torch.tensor(np.stack([xs, ys], axis=-1))).numpy()
    axis.contour(xs, ys, np.log10(values - problem.min_value + 1e-3), levels=25, cmap="Greys", linewidths=0.6)
    for name in names:
        path, final, _ = runs[problem.name, name]
        lr = OPTIMIZERS[name][1][problem.name]
        style = {"color": "0.45", "ls": "--"} if len(names) == 2 and name == "AdamW" else {}
        axis.plot(path[:, 0], path[:, 1], lw=1.3, label=f"{name} (lr {lr:g}): f={final:.2e}", **style)
    axis.plot(*problem.start, "ko")
    for minimum in problem.minima:
        axis.plot(*minimum, "r*", ms=12)
    axis.set_xlim(x_low, x_high)
    axis.set_ylim(y_low, y_high)
    axis.set_title(f"{problem.name}: {STEPS} steps, parameter as a 1x2 matrix")
    axis.legend(fontsize=7, loc="lower right" if problem.name == "rosenbrock" else "upper left")


def main() -> None:
    problems = [get_problem("rosenbrock"), get_problem("quadratic", condition_number=100.0)]
    runs = {(problem.name, name): trajectory(name, problem) for problem in problems for name in OPTIMIZERS}
    folder = Path(__file__).resolve().parent / "frontier"
    figure, axes = plt.subplots(1, 2, figsize=(14, 6))
    for axis, problem in zip(axes, problems):
        draw(axis, problem, list(OPTIMIZERS), runs)
    figure.tight_layout()
    atomic_savefig(figure, folder / "trajectories.png", dpi=110)
    plt.close(figure)
    for name, page in PAGES.items():
        lr_free = bool(runs[problems[0].name, name][2])
        figure, axes = plt.subplots(1, 3 if lr_free else 2, figsize=(17 if lr_free else 12, 5))
        for axis, problem in zip(axes, problems):
            draw(axis, problem, ["AdamW", name], runs)
        if lr_free:
            for problem in problems:
                axes[2].plot(range(1, STEPS + 1), runs[problem.name, name][2], label=problem.name)
            axes[2].set_yscale("log")
            axes[2].set_xlabel("step")
            axes[2].set_title(f"{name}: step-size estimate d (lr 1.0)")
            axes[2].legend(fontsize=8)
        figure.tight_layout()
        atomic_savefig(figure, folder / f"{page}-trajectory.png", dpi=90)
        plt.close(figure)
    print(folder)


if __name__ == "__main__":
    main()
