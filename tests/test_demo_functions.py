"""``optimlab demo functions``: the runs follow the optimizers exactly, the bookkeeping (converged /
settled steps, stopping) is right, the files and the table are written, and at full length the
demo shows what it claims (momentum reaches the Rosenbrock minimum in 1000 steps, plain SGD does not)."""

from __future__ import annotations

import re

import pytest
import torch
from typer.testing import CliRunner

from optimlab.bench.problems import get_problem
from optimlab.cli import app
from optimlab.demos.functions import (
    NONCONVEX_OPTIMIZERS,
    ROSENBROCK_OPTIMIZERS,
    PointRun,
    optimize_point,
    results_markdown,
    results_rows,
    run_functions_demo,
    write_functions_demo,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _torch_sgd_momentum_path(problem, lr: float, steps: int) -> list[list[float]]:
    """The same run with torch.optim.SGD, as an independent reference."""
    x = torch.nn.Parameter(problem.start_tensor())
    optimizer = torch.optim.SGD([x], lr=lr, momentum=0.9, nesterov=True)
    points = [x.detach().tolist()]
    for _ in range(steps):
        optimizer.zero_grad()
        problem(x).backward()
        optimizer.step()
        points.append(x.detach().tolist())
    return points


def test_optimize_point_follows_the_optimizer_exactly() -> None:
    problem = get_problem("rosenbrock", start=(-1.0, 1.0))
    run = optimize_point(problem, "nesterov", "sgd-nesterov", {"lr": 1.5e-3}, max_steps=40, tolerance=1e-6)
    assert run.steps == 40 and len(run.points) == 41
    assert run.points == _torch_sgd_momentum_path(problem, 1.5e-3, 40)
    assert run.losses == [problem(torch.tensor(point, dtype=torch.float64)).item() for point in run.points]
    assert run.optimizer == "sgd-nesterov(momentum=0.9, nesterov=True, lr=0.0015)"


def test_optimize_point_stops_at_the_tolerance() -> None:
    problem = get_problem("rosenbrock", start=(1.0, 1.0))  # starts at the minimum
    run = optimize_point(problem, "sgd", "sgd", {"lr": 1e-3}, max_steps=100, tolerance=1e-6)
    assert run.steps == 0 and run.converged_at == 0
    problem = get_problem("quadratic")
    run = optimize_point(problem, "sgd", "sgd", {"lr": 0.015}, max_steps=2000, tolerance=1e-3)
    assert run.converged_at == run.steps < 2000
    assert run.losses[-1] < 1e-3 <= run.losses[-2]


def test_converged_and_settled_steps() -> None:
    run = PointRun("x", "sgd()", min_value=1.0, tolerance=0.1, losses=[5.0, 3.0, 1.5, 1.2, 1.19, 1.18])
    assert run.converged_at is None
    assert run.settled_at == 3  # from step 3 on the loss stays within 0.1 of 1.18
    assert run.final_gap == pytest.approx(0.18)
    run.losses.append(1.05)
    assert run.converged_at == 6


def test_run_write_and_table(tmp_path) -> None:
    demo = run_functions_demo(max_steps=30)
    assert [run.label for run in demo.rosenbrock_runs] == list(ROSENBROCK_OPTIMIZERS)
    assert [run.label for run in demo.nonconvex_runs] == list(NONCONVEX_OPTIMIZERS)
    assert demo.rosenbrock_runs[0].points[0] == [-1.0, 1.0]
    starts = {tuple(run.points[0]) for run in demo.nonconvex_runs}
    assert starts == {demo.nonconvex.start}  # the same random start for all four
    rows = results_rows(demo)
    assert len(rows) == 7 and all(row["steps"] == 30 for row in rows)
    paths = write_functions_demo(demo, tmp_path / "out")
    for key in ("rosenbrock", "nonconvex"):
        assert paths[key].read_bytes().startswith(PNG_SIGNATURE)
    assert paths["table"].read_text() == results_markdown(rows)
    write_functions_demo(demo, tmp_path / "out")  # overwriting leaves no temporary files behind
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["functions.md", "nonconvex.png", "rosenbrock.png"]


def test_cli_writes_files_and_prints_the_table(tmp_path) -> None:
    result = CliRunner().invoke(app, ["demo", "functions", "--out", str(tmp_path), "--steps", "20", "--quiet"])
    assert result.exit_code == 0, result.output
    for name in ("rosenbrock.png", "nonconvex.png", "functions.md"):
        assert (tmp_path / name).is_file()
    assert len(re.findall(r"rosenbrock +│", result.output)) == 3
    assert len(re.findall(r"nonconvex-10d +│", result.output)) == 4
    assert "adamw(lr=0.05, weight_decay=0.01)" in result.output


def test_cli_rejects_bad_steps(tmp_path) -> None:
    result = CliRunner().invoke(app, ["demo", "functions", "--out", str(tmp_path), "--steps", "0"])
    assert result.exit_code == 2
    assert "Invalid --steps: 0 (accepted range: >= 1)" in result.output


@pytest.mark.slow
def test_full_demo_shows_momentum_beating_sgd_on_rosenbrock(tmp_path) -> None:
    demo = run_functions_demo()
    sgd, momentum, nesterov = demo.rosenbrock_runs
    assert momentum.converged_at is not None and momentum.converged_at < 1000 and momentum.losses[-1] < 1e-6
    assert sgd.converged_at is None and sgd.steps == 1000 and sgd.final_gap > 1e-2
    assert nesterov.final_gap < sgd.final_gap
    for run in demo.nonconvex_runs:
        assert run.final_gap < run.losses[0] - run.min_value  # every optimizer made progress
        assert run.settled_at < 1000
