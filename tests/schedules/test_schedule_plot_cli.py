"""`optimlab schedule plot` / `optimlab demo schedules`: a non-empty PNG, and printed statistics that match lr_at."""

from __future__ import annotations

import re

import pytest
import torch
from typer.testing import CliRunner

from optimlab.cli import app
from optimlab.schedules import create_scheduler
from optimlab.schedules.plot import SEED_FIGURE

LINE = re.compile(r"^(?P<label>.+?)\s+initial=(?P<initial>\S+)\s+final=(?P<final>\S+)\s+max=(?P<max>\S+)\s+"
                  r"min=(?P<min>\S+)$")


def _printed_stats(output: str) -> dict[str, dict[str, float]]:
    stats = {}
    for line in output.splitlines():
        match = LINE.match(line)
        if match:
            stats[match["label"]] = {k: float(match[k]) for k in ("initial", "final", "max", "min")}
    return stats


def _closed_form_stats(name: str, steps: int, lr: float, **kwargs) -> dict[str, float]:
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr, momentum=0.9)
    scheduler = create_scheduler(name, optimizer, steps, **kwargs)
    values = [scheduler.lr_at(t)[0] for t in range(steps)]
    return {"initial": values[0], "final": values[-1], "max": max(values), "min": min(values)}


def _assert_png(path) -> None:
    data = path.read_bytes()
    assert len(data) > 10_000 and data[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_prints_lr_at_statistics_and_writes_png(tmp_path):
    out = tmp_path / "lr.png"
    result = CliRunner().invoke(app, ["schedule", "plot", "cosine", "warmup-cosine", "onecycle", "wsd",
                                      "--steps", "60", "--lr", "0.3", "-p", "cosine.eta_min=0.001",
                                      "-p", "wsd.decay_shape='cosine'", "-o", str(out)])
    assert result.exit_code == 0, result.output
    _assert_png(out)
    printed = _printed_stats(result.output)
    assert list(printed) == ["cosine", "warmup-cosine", "onecycle", "wsd"]
    expected = {"cosine": _closed_form_stats("cosine", 60, 0.3, eta_min=0.001),
                "warmup-cosine": _closed_form_stats("warmup-cosine", 60, 0.3),
                "onecycle": _closed_form_stats("onecycle", 60, 0.3),
                "wsd": _closed_form_stats("wsd", 60, 0.3, decay_shape="cosine")}
    for name, stats in expected.items():
        assert printed[name] == pytest.approx(stats, rel=1e-9), name
    assert printed["cosine"]["min"] > 0.001  # the override reached the cosine only


def test_demo_reproduces_the_seed_figure(tmp_path):
    result = CliRunner().invoke(app, ["demo", "schedules", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    _assert_png(tmp_path / "schedules.png")
    printed = _printed_stats(result.output)
    assert list(printed) == [label for label, _, _ in SEED_FIGURE]
    for label, name, kwargs in SEED_FIGURE:
        assert printed[label] == pytest.approx(_closed_form_stats(name, 100, 0.1, **kwargs), rel=1e-9), label


@pytest.mark.parametrize(("args", "message"), [
    (["schedule", "plot", "cosin"], "Unknown schedule 'cosin'. Did you mean: cosine"),
    (["schedule", "plot", "cosine", "-p", "tmax=3"], "Unknown argument 'tmax' for schedule 'cosine'"),
    (["schedule", "plot", "cosine", "-p", "T_max"], "expected KEY=VALUE or NAME.KEY=VALUE"),
    (["schedule", "plot", "cosine", "-p", "step.gamma=0.5"], "names schedule 'step', which is not being plotted"),
    (["schedule", "plot", "cosine", "--steps", "0"], "Invalid steps: 0"),
])
def test_bad_arguments_exit_with_a_message(tmp_path, args, message):
    result = CliRunner().invoke(app, [*args, "-o", str(tmp_path / "x.png")])
    assert result.exit_code == 2
    assert message in result.output
    assert not (tmp_path / "x.png").exists()


def test_list_shows_every_name():
    result = CliRunner().invoke(app, ["schedule", "list"])
    assert result.exit_code == 0
    assert {line.split()[0] for line in result.output.splitlines()} >= {"cosine", "wsd", "plateau", "onecycle"}
