"""Monitor sinks: the CSV, JSON-lines and TensorBoard files hold exactly what the memory sink holds."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from optimlab.monitor import CSVSink, JSONLSink, MemorySink, OptimizerMonitor, TensorBoardSink


def run_monitored(sinks: list, steps: int = 5) -> MemorySink:
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
    memory = MemorySink()
    monitor = OptimizerMonitor(optimizer, every=2, sinks=[memory, *sinks])
    for _ in range(steps):
        optimizer.zero_grad()
        model(torch.randn(6, 3)).pow(2).mean().backward()
        optimizer.step()
    monitor.remove()
    return memory


def test_csv_and_jsonl_parse_back_to_the_records(tmp_path: Path) -> None:
    memory = run_monitored([CSVSink(tmp_path / "m.csv"), JSONLSink(tmp_path / "m.jsonl")])
    assert [row["step"] for row in memory.history] == [2, 4]
    with open(tmp_path / "m.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    lines = [json.loads(line) for line in (tmp_path / "m.jsonl").read_text().splitlines()]
    assert len(rows) == len(lines) == 2
    for expected, csv_row, json_row in zip(memory.history, rows, lines):
        assert set(csv_row) == set(json_row) == set(expected)
        for key, value in expected.items():
            assert float(csv_row[key]) == pytest.approx(value, rel=1e-12)
            assert json_row[key] == pytest.approx(value, rel=1e-12)
    assert memory.column("step") == [2, 4]


def test_csv_widens_its_header_and_appends(tmp_path: Path) -> None:
    path = tmp_path / "w.csv"
    sink = CSVSink(path)
    sink.write(1, {"a": 1.0})
    sink.write(2, {"a": 2.0, "b": 3.0})
    sink.close()
    fresh = CSVSink(tmp_path / "new.csv", append=True)  # appending to a file that does not exist yet
    fresh.write(1, {"a": 1.0})
    fresh.close()
    assert (tmp_path / "new.csv").read_text().splitlines() == ["step,a", "1,1.0"]
    appended = CSVSink(path, append=True)
    appended.write(3, {"b": 4.0, "a": 5.0})
    appended.close()
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert rows == [{"step": "1", "a": "1.0", "b": ""}, {"step": "2", "a": "2.0", "b": "3.0"},
                    {"step": "3", "a": "5.0", "b": "4.0"}]


def test_jsonl_writes_nonfinite_as_null(tmp_path: Path) -> None:
    sink = JSONLSink(tmp_path / "n.jsonl")
    sink.write(1, {"a": math.nan, "b": math.inf, "c": 1.5})
    sink.close()
    assert json.loads((tmp_path / "n.jsonl").read_text()) == {"step": 1, "a": None, "b": None, "c": 1.5}


def test_tensorboard_event_file_holds_the_scalars(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    memory = run_monitored([TensorBoardSink(tmp_path / "tb")])
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    scalars = events.Scalars("grad_norm/group0")
    assert [event.step for event in scalars] == [2, 4]
    assert [event.value for event in scalars] == pytest.approx(memory.column("grad_norm/group0"), rel=1e-6)
    assert "eff_lr_mean/group0" in events.Tags()["scalars"]
    with pytest.raises(ValueError, match="exactly one"):
        TensorBoardSink()
