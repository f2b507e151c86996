"""`optimlab bench`, `runs list|show|compare`, `report` and `recommend` through the Typer app."""

import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from optimlab.cli import app

runner = CliRunner()
TINY = ["--task", "quadratic", "--optimizers", "adam,sgd-momentum", "--trials", "2", "--seeds", "1", "--steps", "30",
        "--jobs", "1", "--quiet"]


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def db(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli") / "cli.db"
    first = invoke("bench", *TINY, "--db", path)
    assert first.exit_code == 0, first.output
    assert "run 1 (started): 6 trials run, 0 already done" in first.output
    assert re.search(r"quadratic: (winner (adam|sgd-momentum) \(lr=|tie: |no configuration reached the target)",
                     first.output)
    again = invoke("bench", *TINY, "--db", path)
    assert again.exit_code == 0 and "run 1 (resumed): 0 trials run, 6 already done" in again.output
    fresh = invoke("bench", *TINY, "--db", path, "--new")
    assert fresh.exit_code == 0 and "run 2 (started)" in fresh.output
    return path


def test_runs_list_show_and_compare(db):
    listing = invoke("runs", "list", "--db", db)
    assert listing.exit_code == 0 and "complete" in listing.output and "quadratic" in listing.output
    show = invoke("runs", "show", "latest", "--db", db)
    assert show.exit_code == 0 and show.output.startswith("run 2 [complete]") and "sgd-momentum" in show.output
    compare = invoke("runs", "compare", "1", "2", "--db", db)
    assert compare.exit_code == 0 and "run 1 vs run 2" in compare.output
    assert compare.output.count("within noise") == 2  # identical deterministic runs: never "better"


def test_report_latest_prints_where_the_report_is(db, tmp_path):
    result = invoke("report", "latest", "--db", db, "-o", tmp_path / "rep")
    assert result.exit_code == 0, result.output
    path = Path(result.output.strip().split(": ", 1)[1])
    assert result.output.startswith("report for run 2:") and path == (tmp_path / "rep" / "index.html").resolve()
    assert path.is_file() and "quadratic-trajectories.png" in path.read_text()


def test_recommend_picks_the_best_stored_configuration(db):
    result = invoke("recommend", "--task", "quadratic", "--db", db)
    assert result.exit_code == 0, result.output
    assert re.search(r"recommended for quadratic: (adam|sgd-momentum) with lr=", result.output)
    missing = invoke("recommend", "--task", "beale", "--db", db)
    assert missing.exit_code == 2 and "no finished results for task 'beale'" in missing.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["bench", "--task", "rosenbrok"], "Unknown task 'rosenbrok'. Did you mean: rosenbrock? Valid names: beale,"),
        (["bench", "--task", "quadratic", "--optimizers", "adamm"], "Unknown optimizer 'adamm'."),
        (["bench", "--task", "quadratic", "--schedules", "cosin"], "Unknown schedule 'cosin'"),
        (["bench", "--task", "quadratic", "--trials", "0"], "Invalid trials: 0"),
        (["recommend", "--task", "nope"], "Unknown task 'nope'"),
        (["runs", "show", "7"], "Unknown run 7"),
        (["report", "abc"], "Invalid run id: 'abc'"),
    ],
)
def test_bad_names_are_errors_listing_the_valid_ones(db, args, message):
    result = invoke(*args, "--db", db)
    assert result.exit_code == 2 and message in result.output


def test_missing_database_is_a_clear_error(tmp_path):
    result = invoke("runs", "list", "--db", tmp_path / "none.db")
    assert result.exit_code == 2 and "no database at" in result.output
    assert not (tmp_path / "none.db").exists()
