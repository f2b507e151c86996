"""Sharpness tracking: λmax at each record equals the exact Hessian's at the same training step."""

from __future__ import annotations

import copy

import pytest
import torch
from analysis_problems import Point, quadratic_loss, random_symmetric, small_mlp
from test_hessian import _exact_hessian
from torch import nn

from optimlab.analysis._params import supervised_loss
from optimlab.analysis.sharpness import plot_sharpness, track_sharpness


def test_sharpness_matches_exact_hessian_along_training(tmp_path):
    torch.manual_seed(0)
    model = small_mlp(3, 6, 2)  # 38 parameters
    loss_fn = supervised_loss(nn.functional.mse_loss)
    batch = (torch.randn(24, 3, dtype=torch.float64), torch.randn(24, 2, dtype=torch.float64))
    twin = copy.deepcopy(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.3, momentum=0.5)
    trace = track_sharpness(model, optimizer, loss_fn, [batch], batch, steps=12, every=5, momentum=0.5, tol=1e-10,
                            generator=torch.Generator().manual_seed(0))
    assert trace.steps == [0, 5, 10, 12]
    twin_optimizer = torch.optim.SGD(twin.parameters(), lr=0.3, momentum=0.5)
    for index, step in enumerate(range(13)):
        if step in trace.steps:
            exact = torch.linalg.eigvalsh(_exact_hessian(twin, loss_fn, [batch]))[-1].item()
            position = trace.steps.index(step)
            assert trace.sharpness[position] == pytest.approx(exact, rel=1e-8)
            with torch.no_grad():
                assert trace.losses[position] == pytest.approx(float(loss_fn(twin, batch)), rel=1e-12)
        twin_optimizer.zero_grad()
        loss_fn(twin, batch).backward()
        twin_optimizer.step()
    assert trace.stability_bounds() == [pytest.approx(3.0 / 0.3)] * 4  # (2 + 2 * 0.5) / lr
    assert plot_sharpness(trace, tmp_path / "s.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_quadratic_sharpness_is_its_top_eigenvalue_throughout():
    gen = torch.Generator().manual_seed(0)
    matrix = random_symmetric(torch.tensor([0.5, 2.0, 7.0], dtype=torch.float64), gen)
    model = Point(torch.randn(3, generator=gen, dtype=torch.float64))
    shift = torch.zeros(3, dtype=torch.float64)
    trace = track_sharpness(model, torch.optim.SGD(model.parameters(), lr=0.1), quadratic_loss(matrix), [shift], shift,
                            steps=6, every=2, generator=gen)
    assert trace.sharpness == [pytest.approx(7.0, rel=1e-10)] * 4
    assert trace.losses == sorted(trace.losses, reverse=True)  # lr 0.1 < 2/7: monotone descent


@pytest.mark.parametrize(("kwargs", "match"), [({"steps": -1, "every": 1}, "steps"), ({"steps": 3, "every": 0}, "every"),
                                               ({"steps": 3, "every": 1, "momentum": 1.0}, "momentum")])
def test_bad_arguments_raise_value_error(kwargs, match):
    model = Point(torch.zeros(2, dtype=torch.float64))
    loss_fn = quadratic_loss(torch.eye(2, dtype=torch.float64))
    with pytest.raises(ValueError, match=match):
        track_sharpness(model, torch.optim.SGD(model.parameters(), lr=0.1), loss_fn, [torch.zeros(2)], torch.zeros(2),
                        **kwargs)
