"""`optimlab demo clipping`: the full study runs, writes its figure and JSON, and prints the table."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from optimlab.cli import app
from optimlab.demos.clipping import ClippingRun, run_clipping_study, train_with_clipping
from optimlab.models import ExplodingRNN, make_sequence_data


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_demo_runs_the_full_study_and_writes_figure_and_table(tmp_path: Path) -> None:
    start = time.perf_counter()
    result = CliRunner().invoke(app, ["demo", "clipping", "--out", str(tmp_path), "--quiet"])
    elapsed = time.perf_counter() - start
    assert result.exit_code == 0, result.output
    print(f"demo clipping took {elapsed:.1f} s")  # the target is < 60 s; timings are not asserted here
    figure = tmp_path / "clipping.png"
    assert figure.stat().st_size > 20_000 and figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    payload = json.loads((tmp_path / "clipping.json").read_text())
    rows = {row["spec"]: row for row in payload["statistics"]}
    assert set(rows) == {"none", "norm:1.0", "value:0.5", "adaptive:10"}
    for row in rows.values():
        assert row["method"] in result.output
        assert row["max_grad_norm"] >= row["mean_grad_norm"] > 0
    assert rows["none"]["clip_rate_percent"] == 0.0
    assert 0.0 < rows["adaptive:10"]["clip_rate_percent"] < 100.0
    assert all(len(run["epoch_losses"]) == 100 for run in payload["runs"])


def test_runs_start_from_identical_weights_and_data() -> None:
    methods = {"a": "none", "b": "none"}
    first, second = run_clipping_study(epochs=2, methods=methods, guard=False)
    assert first.epoch_losses == second.epoch_losses and first.step_grad_norms == second.step_grad_norms
    with pytest.raises(ValueError, match="epochs"):
        run_clipping_study(epochs=0)


def test_guard_skips_nonfinite_steps_and_keeps_weights_finite() -> None:
    torch.manual_seed(0)
    data = make_sequence_data(num_samples=64, seq_len=5)
    data.inputs[3, 2, 0] = math.inf  # one poisoned sequence: its batch gets NaN gradients
    model = ExplodingRNN(input_size=data.inputs.shape[-1])
    run = train_with_clipping("guarded", "norm:1.0", model, data, epochs=3, batch_size=16, guard=True)
    assert run.skipped_steps == 3  # the poisoned batch, once per epoch
    assert all(torch.isfinite(p).all() for p in model.parameters())
    unguarded = ExplodingRNN(input_size=data.inputs.shape[-1])
    train_with_clipping("unguarded", "norm:1.0", unguarded, data, epochs=1, batch_size=16, guard=False)
    assert not all(torch.isfinite(p).all() for p in unguarded.parameters())


def test_run_statistics() -> None:
    run = ClippingRun("x", "none", epoch_losses=list(np.arange(20.0)), epoch_clip_rates=[0.0, 50.0],
                      step_grad_norms=[1.0, 3.0, math.nan], explosion_steps=[3])
    stats = run.statistics()
    assert stats["final_loss"] == pytest.approx(14.5)
    assert stats["clip_rate_percent"] == 25.0
    assert stats["max_grad_norm"] == 3.0 and stats["mean_grad_norm"] == 2.0
    assert stats["nonfinite_grad_steps"] == 1 and stats["explosions"] == 1


def test_cli_rejects_bad_epochs(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["demo", "clipping", "--out", str(tmp_path), "--epochs", "0"])
    assert result.exit_code != 0 and "--epochs" in result.output


def test_exploding_rnn_init_shapes_and_validation() -> None:
    model = ExplodingRNN(input_size=3, hidden_size=50, num_layers=3, output_size=2, init_range=2.0)
    values = torch.cat([p.detach().flatten() for p in model.parameters()])
    assert float(values.abs().max()) <= 2.0 and float(values.abs().max()) > 1.9  # U(-2, 2), spread over the range
    assert model.rnn.num_layers == 3 and model.rnn.hidden_size == 50
    assert model(torch.randn(4, 7, 3)).shape == (4, 2)
    with pytest.raises(ValueError, match="hidden_size"):
        ExplodingRNN(hidden_size=0)
    with pytest.raises(ValueError, match="init_range"):
        ExplodingRNN(init_range=-1.0)


def test_sequence_data_is_deterministic_linear_in_the_sum_and_batched_once_per_epoch() -> None:
    from optimlab.models import sequence_batches

    data = make_sequence_data(num_samples=200, seq_len=6, input_size=4, noise=0.0, seed=3)
    again = make_sequence_data(num_samples=200, seq_len=6, input_size=4, noise=0.0, seed=3)
    assert torch.equal(data.inputs, again.inputs) and torch.equal(data.targets, again.targets)
    assert not torch.equal(make_sequence_data(seed=4).inputs, make_sequence_data(seed=3).inputs)
    sums = data.inputs.sum(dim=1).double()
    solution = torch.linalg.lstsq(sums, data.targets.double()).solution
    assert float((sums @ solution - data.targets.double()).abs().max()) < 1e-5  # exactly linear in the sum
    assert float(solution.norm()) == pytest.approx(1.0 / math.sqrt(6), rel=1e-5)  # unit read-out over sqrt(T)
    large = make_sequence_data(num_samples=20_000, seq_len=6, input_size=4, output_size=3, noise=0.1, seed=5)
    torch.testing.assert_close(large.targets.var(dim=0), torch.full((3,), 1.01), rtol=0.05, atol=0.0)
    batches = list(sequence_batches(data, 64, torch.Generator().manual_seed(0)))
    assert [len(b.inputs) for b in batches] == [64, 64, 64, 8]
    seen = torch.cat([b.inputs for b in batches])
    assert torch.equal(seen[seen[:, 0, 0].argsort()], data.inputs[data.inputs[:, 0, 0].argsort()])
    with pytest.raises(ValueError, match="batch_size"):
        list(sequence_batches(data, 0, torch.Generator()))
