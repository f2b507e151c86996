"""The user's own tasks: task files, modules and entry points; one-line errors that write nothing; resumes that
refuse a changed task; the example file through the CLI and through compare()."""

import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest
from bench_helpers import cli_env
from typer.testing import CliRunner
from user_task_files import write_task

from optimlab.bench.tasks import TaskLoadError, get_task, make_task, resolve_task_names
from optimlab.bench.tasks.loader import fingerprint
from optimlab.cli import app

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "digits_cnn.py"
TINY_BENCH = ["--optimizers", "adam", "--trials", "1", "--seeds", "1", "--jobs", "1", "--quiet"]


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def existing_db(tmp_path_factory):
    """A database holding one finished run, to check that bad input leaves it byte for byte unchanged."""
    path = tmp_path_factory.mktemp("user") / "existing.db"
    result = invoke("bench", "--task", "quadratic", "--steps", "5", *TINY_BENCH, "--db", path)
    assert result.exit_code == 0, result.output
    return path


def bad_files(folder: Path) -> dict[str, tuple[str, str]]:
    """case → (--task value, expected message fragment)."""
    (folder / "wrong_type.py").write_text("TASK = 3\n")
    (folder / "broken.py").write_text("import torch\n\nVALUE = 1 / 0\n")
    (folder / "syntax.py").write_text("def f(:\n")
    write_task(folder, name=f"no-metric-{folder.name}", metric="accuracy", filename="no_metric.py")
    return {
        "missing file": (f"{folder}/nope.py:TASK", f"task file {folder}/nope.py: no such file"),
        "missing name": (f"{folder}/wrong_type.py:TASKS", f"task file {folder}/wrong_type.py: no name 'TASKS'"),
        "wrong type": (f"{folder}/wrong_type.py:TASK", "TASK is a int; expected a TaskSpec, a list of them, or a "
                                                        "zero-argument function returning either"),
        "import error": (f"{folder}/broken.py:TASK", f"task file {folder}/broken.py: import failed (line 3): "
                                                      "ZeroDivisionError: division by zero"),
        "syntax error": (f"{folder}/syntax.py:TASK", "import failed (line 1): SyntaxError"),
        "metric key": (f"{folder}/no_metric.py:TASK", f"task 'no-metric-{folder.name}': evaluate returned no "
                                                       "'accuracy' (its metric); keys: mse"),
        "missing module": ("no_such_pkg.tasks:TASK", "task module no_such_pkg.tasks: no module named 'no_such_pkg'"),
    }


@pytest.mark.parametrize("case", ["missing file", "missing name", "wrong type", "import error", "syntax error",
                                  "metric key", "missing module"])
@pytest.mark.parametrize("command", ["bench", "lr-find", "recommend"])
def test_bad_task_references_are_one_line_errors_that_write_nothing(case, command, existing_db, tmp_path):
    reference, message = bad_files(tmp_path)[case]
    before = existing_db.read_bytes()
    extra = {"bench": [*TINY_BENCH, "--db", existing_db], "lr-find": ["-o", tmp_path / "lr.png"],
             "recommend": ["--db", existing_db]}[command]
    if command != "bench" and case == "metric key":
        pytest.skip("only the bench evaluates the task")
    result = invoke(command, "--task", reference, *extra)
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.output
    assert existing_db.read_bytes() == before and not (tmp_path / "lr.png").exists()
    fresh = tmp_path / "fresh.db"
    assert invoke("bench", "--task", reference, *TINY_BENCH, "--db", fresh).exit_code == 2 and not fresh.exists()


def test_references_names_and_zero_argument_factories(tmp_path):
    path = write_task(tmp_path, name="ref-task")
    names, sources = resolve_task_names([f"{path}:TASK", "quadratic"])
    assert names == ("ref-task", "quadratic") and sources == (f"{path.resolve()}:TASK",)
    spec = get_task("ref-task")
    assert spec.source == f"{path.resolve()}:TASK" and spec.metric == "mse" and not spec.is_deterministic
    factory = "\nfrom dataclasses import replace\n\ndef tasks():\n    return [TASK, replace(TASK, name=TASK.name + '-b')]\n"
    write_task(tmp_path, name="factory", filename="factory_file.py")
    (tmp_path / "factory_file.py").write_text((tmp_path / "factory_file.py").read_text() + factory)
    assert resolve_task_names([f"{tmp_path}/factory_file.py:tasks"])[0] == ("factory", "factory-b")
    write_task(tmp_path, name="module", filename="user_module_tasks.py")
    (tmp_path / "user_module_tasks.py").write_text((tmp_path / "user_module_tasks.py").read_text() + factory)
    sys.path.insert(0, str(tmp_path))
    try:
        assert resolve_task_names(["user_module_tasks:tasks"])[0] == ("module", "module-b")  # package.module:NAME
    finally:
        sys.path.remove(str(tmp_path))
    assert get_task("module-b").source == "user_module_tasks:tasks"
    with pytest.raises(TaskLoadError, match="task name 'quadratic' is already taken by built-in"):
        resolve_task_names([f"{write_task(tmp_path, name='quadratic', filename='clash.py')}:TASK"])


def test_fingerprint_covers_the_settings():  # code changes: test_a_changed_task_file_refuses_to_resume
    first = fingerprint(make_task("f", model=lambda s: None, loss=len, batches=iter, evaluate=dict, metric="m",
                                  target=1.0, steps=10))
    other = fingerprint(make_task("f", model=lambda s: None, loss=len, batches=iter, evaluate=dict, metric="m",
                                  target=2.0, steps=10))
    assert first != other


def test_a_changed_task_file_refuses_to_resume(tmp_path):
    path = write_task(tmp_path, name="changing")
    db = tmp_path / "r.db"
    command = ["bench", "--task", f"{path}:TASK", *TINY_BENCH, "--db", db]
    assert invoke(*command).exit_code == 0
    path.write_text(path.read_text() + "\n# a comment changes nothing\n")
    again = invoke(*command)
    assert again.exit_code == 0 and "run 1 (resumed): 0 trials run, 2 already done" in again.output, again.output
    before = db.read_bytes()
    path.write_text(path.read_text().replace("target=5.0", "target=4.0"))
    changed = invoke(*command)
    assert changed.exit_code == 2 and changed.output.count("\n") == 1
    assert "task 'changing' changed since run 1 started" in changed.output and "(--new)" in changed.output
    assert db.read_bytes() == before
    fresh = invoke(*command, "--new")
    assert fresh.exit_code == 0 and "run 2 (started)" in fresh.output


def test_entry_point_tasks_are_listed_and_run(tmp_path, monkeypatch):
    import optimlab.bench.tasks as registry

    site = tmp_path / "site"
    (site / "ep_tasks").mkdir(parents=True)
    write_task(site / "ep_tasks", name="ep-linear", filename="__init__.py")
    info = site / "ep_tasks-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: ep-tasks\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[optimlab.tasks]\nlinear = ep_tasks:TASK\n")
    monkeypatch.syspath_prepend(str(site))  # what installing the package does
    monkeypatch.setattr(registry, "_ENTRY_POINTS_LOADED", False)
    listing = invoke("tasks")
    assert listing.exit_code == 0, listing.output
    line = next(row for row in listing.output.splitlines() if "ep-linear" in row)
    assert "entry point linear" in line and "mse (min)" in line and "<= 5" in line and "20 (5)" in line
    assert "digits-mlp" in listing.output and "built-in" in listing.output
    bench = invoke("bench", "--task", "ep-linear", *TINY_BENCH, "--db", tmp_path / "ep.db")
    assert bench.exit_code == 0 and "run 1 (started): 2 trials run" in bench.output, bench.output


class Images(HTMLParser):
    def __init__(self):
        super().__init__()
        self.sources = []

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.sources.append(dict(attrs)["src"])


@pytest.mark.slow
def test_the_example_task_file_runs_through_the_cli(tmp_path):
    db, out = tmp_path / "ex.db", tmp_path / "report"
    reference = f"{EXAMPLE.relative_to(REPO)}:TASK"
    bench = subprocess.run([sys.executable, "-m", "optimlab", "bench", "--task", reference, "--optimizers",
                            "adamw,sgd-momentum", "--trials", "2", "--seeds", "2", "--steps", "100", "--lr-range",
                            "1e-3,1e-2", "--jobs", "1", "--quiet", "--db", str(db)], cwd=REPO, env=cli_env(),
                           capture_output=True, text=True, timeout=300)
    assert bench.returncode == 0, bench.stderr
    assert "digits-cnn" in bench.stdout and "(n=2)" in bench.stdout
    assert any(line.startswith("digits-cnn: ") for line in bench.stdout.splitlines())
    report = invoke("report", "--db", db, "-o", out, "--format", "svg")
    assert report.exit_code == 0, report.output
    parser = Images()
    parser.feed((out / "index.html").read_text())
    written = {p.name for p in out.iterdir() if p.suffix == ".svg"}
    assert set(parser.sources) == written and "digits-cnn-sensitivity.svg" in written
    assert {"digits-cnn-steps-to-target.svg", "digits-cnn-time-to-target.svg"} <= written  # adamw reaches 0.97
    assert "digits-cnn-lr.svg" not in written
    recommend = invoke("recommend", "--task", str(EXAMPLE) + ":TASK", "--db", db)
    assert recommend.exit_code == 0, recommend.output
    assert "optimizer = create_optimizer(model, " in recommend.output
    assert "# each step: loss.backward()" in recommend.output


@pytest.mark.slow
def test_compare_in_process_ties_identical_optimizers(tmp_path):
    from optimlab.bench import compare

    result = compare(str(EXAMPLE) + ":TASK", optimizers=["adam", "torch.adam"], trials=2, seeds=3, steps=40,
                     db=tmp_path / "c.db")
    verdict = result.verdicts["digits-cnn"]
    assert {r["optimizer"] for r in result.rows} == {"adam", "torch.adam"}
    assert [r["params"] for r in result.rows][0] == [r["params"] for r in result.rows][1]  # same range, same stream
    assert verdict.kind in ("tie", "unreached") and "winner" not in verdict.text
    if verdict.kind == "tie":
        assert "(within noise)" in verdict.text
    assert "digits-cnn" in result.table and "(n=3)" in result.table
    page = result.report(tmp_path / "rep")
    assert "digits-cnn-sensitivity.png" in page.read_text()


def test_two_names_of_one_optimizer_tie_through_compare(tmp_path):
    import torch

    from optimlab.bench import compare

    x = torch.randn(64, 4, generator=torch.Generator().manual_seed(0))
    y = x @ torch.tensor([1.0, -2.0, 0.5, 3.0])

    def batches(seed):
        generator = torch.Generator().manual_seed(seed)
        while True:
            index = torch.randint(0, 64, (16,), generator=generator)
            yield x[index], y[index]

    task = make_task("tie-linear", model=lambda seed: torch.nn.Linear(4, 1),
                     loss=lambda model, batch: ((model(batch[0]).squeeze(-1) - batch[1]) ** 2).mean(),
                     batches=batches, evaluate=lambda model: {"mse": ((model(x).squeeze(-1) - y) ** 2).mean()},
                     metric="mse", target=20.0, steps=30, eval_every=5)
    result = compare(task, optimizers=["adam", "torch.adam"], trials=2, seeds=3, db=tmp_path / "t.db")
    (verdict,) = result.verdicts.values()
    assert all(r["reached"] == 3 for r in result.rows)  # the target is met: the tie is the statistics' call
    assert verdict.kind == "tie" and verdict.text.startswith("tie-linear: tie: ") and "(within noise)" in verdict.text
    assert result.rows[0]["params"] == result.rows[1]["params"]  # one range, one seed stream
    assert get_task("tie-linear").source == "python"


def test_time_to_target_counts_training_steps_not_evaluations():
    import time

    import torch

    from optimlab.bench.tasks import register_tasks
    from optimlab.bench.trial import TrialConfig, run_trial

    x = torch.randn(32, 3, generator=torch.Generator().manual_seed(1))
    y = x.sum(1)

    def slow_evaluate(model):
        time.sleep(0.1)  # an expensive validation pass
        return {"mse": ((model(x).squeeze(-1) - y) ** 2).mean()}

    def batches(seed):
        while True:
            yield x, y

    (name,) = register_tasks([make_task("slow-eval", model=lambda seed: torch.nn.Linear(3, 1),
                                        loss=lambda model, batch: ((model(batch[0]).squeeze(-1) - batch[1]) ** 2).mean(),
                                        batches=batches, evaluate=slow_evaluate, metric="mse", target=1.0, steps=40,
                                        eval_every=5)])
    record = run_trial(TrialConfig(name, "adam", {"lr": 0.1}, steps=40))
    assert record.steps_to_target is not None and record.steps_to_target >= 5
    evaluations = 1 + record.steps_to_target // 5  # the initial one and every 5 steps until the target
    # wall time holds those sleeps (>= 0.2 s before the target); time-to-target only the training steps
    # before it (a few ms for this 4-parameter model): counting one evaluation would double it
    assert record.wall_time > evaluations * 0.1
    assert 0 < record.time_to_target < 0.5 * 0.1


def test_cuda_device_without_cuda_is_a_one_line_error(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    result = invoke("bench", "--task", "quadratic", "--device", "cuda", *TINY_BENCH, "--db", tmp_path / "d.db")
    assert result.exit_code == 2 and not (tmp_path / "d.db").exists()
    assert "Invalid device: 'cuda': no CUDA device is available (accepted here: cpu)" in result.output


def test_batches_move_to_the_device_through_containers():
    from collections import namedtuple

    import torch

    from optimlab.bench.tasks.simple import to_device

    Pair = namedtuple("Pair", "inputs targets")
    moved = to_device(Pair(torch.ones(2), [torch.zeros(1), {"mask": torch.ones(3)}, "label"]), "meta")
    assert type(moved) is Pair and moved.inputs.device.type == "meta" and moved.targets[2] == "label"
    assert moved.targets[0].device.type == "meta" and moved.targets[1]["mask"].device.type == "meta"


@pytest.mark.gpu
def test_a_user_task_runs_on_cuda(tmp_path):
    from optimlab.bench import compare
    from optimlab.bench.trial import TrialConfig, run_trial

    path = write_task(tmp_path, name="cuda-linear")
    result = compare(f"{path}:TASK", optimizers=["adamw"], trials=1, seeds=2, device="cuda", db=tmp_path / "g.db")
    (row,) = result.rows
    assert row["n_seeds"] == 2 and len(row["metric_values"]) == 2 and row["n_diverged"] == 0
    on_cpu = run_trial(TrialConfig("cuda-linear", "adamw", row["params"], steps=20, seed=1))
    on_gpu = run_trial(TrialConfig("cuda-linear", "adamw", row["params"], steps=20, seed=1, device="cuda"))
    assert on_gpu.final_metric == pytest.approx(on_cpu.final_metric, rel=1e-4)  # same data, same model, same run
