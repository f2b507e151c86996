"""`optimlab lr-find | landscape | hessian`: each writes its PNG(s) and prints its numbers."""

from __future__ import annotations

import re

import pytest
import torch
from typer.testing import CliRunner

from optimlab.cli import app

PNG = b"\x89PNG\r\n\x1a\n"


def _run(*args: str) -> str:
    result = CliRunner().invoke(app, list(args))
    assert result.exit_code == 0, result.output
    return result.output


def _number(pattern: str, text: str) -> float:
    match = re.search(pattern, text)
    assert match, (pattern, text)
    return float(match.group(1))


@pytest.mark.parametrize("optimizer", ["sgd", "sam-sgd"])  # sam-sgd: step(closure) on the same batch
def test_lr_find_on_quadratic_suggests_a_stable_sgd_lr(tmp_path, optimizer):
    out = tmp_path / "lr.png"
    text = _run("lr-find", "--task", "quadratic", "--optimizer", optimizer, "--start-lr", "1e-5", "--end-lr", "1",
                "--num-iter", "80", "-q", "-o", str(out))
    assert out.read_bytes()[:8] == PNG
    # the quadratic task's Hessian has eigenvalues 1 .. 100: plain SGD is stable below 2/100
    assert 1e-4 < _number(r"suggested lr: ([0-9.e+-]+)", text) < 0.02
    assert "stopped at divergence" in text


@pytest.mark.slow
def test_lr_find_on_digits_mlp(tmp_path):
    out = tmp_path / "lr.png"
    text = _run("lr-find", "--task", "digits-mlp", "--optimizer", "adamw", "--num-iter", "60", "-q", "-o", str(out))
    assert out.read_bytes()[:8] == PNG
    assert 1e-5 < _number(r"suggested lr: ([0-9.e+-]+)", text) < 1.0


def test_landscape_writes_three_pngs_and_prints_the_center_loss(tmp_path):
    out = tmp_path / "land.png"
    text = _run("landscape", "--task", "digits-logreg", "--train-steps", "20", "--resolution", "5", "--batches", "1",
                "--probe", "weight", "-q", "-o", str(out))
    for path in (out, tmp_path / "land_surface.png", tmp_path / "land_interp.png"):
        assert path.read_bytes()[:8] == PNG, path
    assert "loss at the parameters (0, 0)" in text and "probe weight" in text


def test_hessian_at_a_checkpointed_saddle_of_rosenbrock(tmp_path):
    # Rosenbrock's Hessian at (0, 1) is diag(-398, 200): a saddle
    checkpoint = tmp_path / "point.pt"
    torch.save({"model": {"x": torch.tensor([0.0, 1.0], dtype=torch.float64)}}, checkpoint)
    out = tmp_path / "h.png"
    text = _run("hessian", "--task", "rosenbrock", "--checkpoint", str(checkpoint), "--optimizer", "sgd", "--lr",
                "0.001", "--k", "1", "--probes", "4", "--slq-runs", "1", "--slq-steps", "2", "--batches", "1", "-q",
                "-o", str(out))
    assert out.read_bytes()[:8] == PNG
    assert "sign pattern: saddle" in text
    assert _number(r"top-1 eigenvalues: ([0-9.e+-]+)", text) == pytest.approx(200.0, rel=1e-9)
    assert _number(r"smallest eigenvalue: ([0-9.e+-]+)", text) == pytest.approx(-398.0, rel=1e-9)
    assert _number(r"stability bound \(2\+2β\)/λmax: ([0-9.e+-]+)", text) == pytest.approx(0.01, rel=1e-5)
    verdicts = [line for line in text.splitlines() if "bound" in line]  # one sentence, about the lr
    assert verdicts == ["  stability bound (2+2β)/λmax: 0.01; lr 0.001 is below it (0.1 x the bound): stable"]


def test_hessian_on_trained_digits_logreg(tmp_path):
    out = tmp_path / "h.png"
    text = _run("hessian", "--task", "digits-logreg", "--train-steps", "30", "--k", "2", "--probes", "4",
                "--max-iter", "30", "--slq-runs", "1", "--slq-steps", "10", "--batches", "1", "-q", "-o", str(out))
    assert out.read_bytes()[:8] == PNG
    # softmax regression is convex: no negative curvature beyond rounding
    assert re.search(r"sign pattern: positive-(semi)?definite", text), text
    assert "trace (Hutchinson, 4 probes)" in text


def test_hessian_tracks_sharpness_with_the_optimizers_momentum(tmp_path):
    out = tmp_path / "h.png"
    text = _run("hessian", "--task", "quadratic", "--optimizer", "sgd-momentum", "--lr", "0.01", "--train-steps", "4",
                "--track-every", "2", "--k", "1", "--probes", "2", "--slq-runs", "1", "--slq-steps", "2", "-q",
                "-o", str(out))
    assert (tmp_path / "h_sharpness.png").read_bytes()[:8] == PNG and out.read_bytes()[:8] == PNG
    rows = [line.split() for line in text.splitlines() if re.fullmatch(r"\d+  \S+  \S+  \S+", line)]
    assert [int(r[0]) for r in rows] == [0, 2, 4]
    # the quadratic task's Hessian is constant with top eigenvalue 100; the bound uses momentum 0.9
    assert all(float(r[2]) == pytest.approx(100.0, rel=1e-3) for r in rows)
    assert all(float(r[3]) == pytest.approx(3.8 / 0.01, rel=1e-9) for r in rows)
    assert "momentum 0.9" in text and "note:" not in text


def test_landscape_and_sharpness_train_with_a_closure_optimizer(tmp_path):
    """SAM needs step(closure): the short training before the analysis and --track-every's training give one."""
    out = tmp_path / "land.png"
    text = _run("landscape", "--task", "digits-logreg", "--optimizer", "sam-sgd", "--train-steps", "3",
                "--resolution", "3", "--batches", "1", "-q", "-o", str(out))
    assert out.read_bytes()[:8] == PNG and "loss at the parameters (0, 0)" in text
    out = tmp_path / "h.png"
    text = _run("hessian", "--task", "quadratic", "--optimizer", "sam-sgd", "--lr", "0.01", "--train-steps", "2",
                "--track-every", "1", "--k", "1", "--probes", "2", "--slq-runs", "1", "--slq-steps", "2", "-q",
                "-o", str(out))
    rows = [line.split() for line in text.splitlines() if re.fullmatch(r"\d+  \S+  \S+  \S+", line)]
    assert [int(r[0]) for r in rows] == [0, 1, 2]
    assert all(float(r[2]) == pytest.approx(100.0, rel=1e-3) for r in rows)
    assert all(float(r[3]) == pytest.approx(3.8 / 0.01, rel=1e-9) for r in rows)  # sam-sgd's momentum 0.9
    assert float(rows[-1][1]) < float(rows[0][1])  # trained (6.705 -> 5.69 in two oscillating SAM steps)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["lr-find", "--task", "digits-mlpp"], "Unknown task"),
        (["lr-find", "--optimizer", "adamx"], "Unknown optimizer"),
        (["lr-find", "--start-lr", "0"], "start_lr"),
        (["landscape", "--resolution", "1"], "--resolution"),
        (["hessian", "--checkpoint", "/nonexistent/x.pt"], "no checkpoint"),
        (["hessian", "--checkpoint", "/nonexistent/x.pt", "--track-every", "5"], "--track-every"),
    ],
)
def test_bad_input_exits_with_a_clear_message(args, message, tmp_path):
    result = CliRunner().invoke(app, [*args, "-o", str(tmp_path / "x.png")])
    assert result.exit_code == 2 and message in result.output, result.output
