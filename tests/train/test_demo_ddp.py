"""`optimlab demo ddp`: a 2-process gloo job on CPU that matches one process with twice the batch."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from train_helpers import invoke


@pytest.mark.slow
def test_demo_ddp_runs_two_processes_on_cpu(tmp_path: Path) -> None:
    result = invoke("demo", "ddp", "--out", str(tmp_path), "--steps", "6", "--batch-size", "4")
    assert result.exit_code == 0, result.output + result.stderr
    difference = float(re.search(r"max \|parameter difference\| between the runs: (\S+)", result.stdout).group(1))
    assert difference < 1e-5
    summaries = [json.loads((tmp_path / f"nproc{n}" / "summary.json").read_text()) for n in (1, 2)]
    assert [s["world_size"] for s in summaries] == [1, 2]
    assert [s["tokens_seen"] for s in summaries] == [6 * 8 * 64] * 2  # same global batch: 8 windows of 64
    assert summaries[0]["val_loss"] == pytest.approx(summaries[1]["val_loss"], abs=1e-4)


@pytest.mark.parametrize("args,message", [
    (("--steps", "0"), "error: Invalid steps: 0 (accepted range: an integer >= 1)"),
    (("--batch-size", "0"), "error: Invalid batch_size: 0 (accepted range: an integer >= 1)"),
])
def test_demo_ddp_bad_values_are_one_line_before_any_write(tmp_path: Path, args: tuple[str, ...], message: str) -> None:
    out = tmp_path / "demo"
    result = invoke("demo", "ddp", "--out", str(out), *args)
    assert result.exit_code == 2, result.output
    assert result.stderr == message + "\n" and "Traceback" not in result.output
    assert not out.exists()
