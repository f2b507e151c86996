"""The HTML report references every PNG it writes, the PNGs are real figures, the table equals the database."""

import statistics
from html.parser import HTMLParser

import matplotlib.image
import pytest

from optimlab.bench.report import TABLE_COLUMNS, write_report
from optimlab.bench.runner import summarize
from optimlab.bench.stats import t_quantile
from optimlab.bench.store import Store


class ReportParser(HTMLParser):
    """Collects image sources and the comparison tables' rows (name cells as text, number cells' data-value)."""

    def __init__(self):
        super().__init__()
        self.images, self.rows, self._row, self._in_table, self._name_cell = [], [], None, False, False

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":
            self.images.append(attrs["src"])
        elif tag == "table" and attrs.get("class") == "comparison":
            self._in_table = True
        elif tag == "tr" and self._in_table:
            self._row = []
        elif tag == "td" and self._row is not None:
            self._name_cell = attrs.get("class") == "name"
            if not self._name_cell:
                self._row.append(attrs["data-value"])

    def handle_data(self, data):
        if self._name_cell and self._row is not None:
            self._row.append(data)
            self._name_cell = False

    def handle_endtag(self, tag):
        if tag == "tr" and self._row:
            self.rows.append(self._row)
            self._row = None
        elif tag == "table":
            self._in_table = False


@pytest.fixture(scope="module")
def report(finished_bench, tmp_path_factory):
    db, run_id = finished_bench
    out = tmp_path_factory.mktemp("report")
    with Store(db) as store:
        page = write_report(store, run_id, out)
    parser = ReportParser()
    parser.feed(page.read_text())
    return out, parser


def test_html_references_every_png_and_each_is_a_readable_figure(finished_bench, report):
    out, parser = report
    db, run_id = finished_bench
    written = sorted(p.name for p in out.glob("*.png"))
    assert sorted(parser.images) == written
    tasks = ("rosenbrock", "nonconvex-10d", "digits-logreg")
    with Store(db) as store:
        rows = summarize(store, run_id)
    reached = {row["task"] for row in rows if row["reached"]}
    solved = any(row["reached"] == row["n_seeds"] for row in rows)
    assert set(tasks) - reached  # a task nobody solved: a sentence, not an empty chart (the other case: test_user_tasks)
    expected = {"rosenbrock-trajectories.png", "nonconvex-10d-final-params.png"} | (
        {"performance-profile.png"} if solved else set())
    expected |= {f"{task}-{kind}.png" for task in tasks for kind in ("loss", "sensitivity")}
    expected |= {f"{task}-{kind}.png" for task in reached for kind in ("steps-to-target", "time-to-target")}
    assert set(written) == expected  # no LR curve: every schedule is constant
    page = (out / "index.html").read_text()
    summary, contents = page.split('<ul class="summary">')[1], page.split('<ul class="toc">')[1].split("</ul>")[0]
    for task in tasks:  # a summary line and a contents entry per task, each linking to its section
        assert f'<li><a href="#{task}">{task}</a>: no configuration reached the target' in summary or \
            f'<li><a href="#{task}">{task}</a>:' in summary
        assert f'<a href="#{task}">{task}</a>' in contents and f'<section id="{task}">' in page
    assert page.index('<ul class="summary">') < page.index('<section id="rosenbrock">')
    for task in set(tasks) - reached:
        assert f"No seed of any configuration reached the target" in page.split(f'id="{task}"')[1].split("</section>")[0]
    for name in written:
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
        height, width = matplotlib.image.imread(out / name).shape[:2]
        assert height >= 300 and width >= 500


def test_comparison_table_values_equal_the_database(finished_bench, report):
    db, run_id = finished_bench
    _, parser = report
    assert len(parser.rows) == 3 * 2
    keys = [key for _, key in TABLE_COLUMNS]
    with Store(db) as store:
        for row in parser.rows:
            task, optimizer, schedule, clip, params, *values = row
            cells = dict(zip(keys, values))
            finals = store.execute(
                "SELECT final_metric, final_loss, steps_to_target, time_to_target, ms_per_step, "
                "state_bytes_per_param, params FROM trials WHERE run_id = ? AND task = ? AND optimizer = ? "
                "AND phase = 'final' ORDER BY trial_index", (run_id, task, optimizer))
            tune_diverged = store.execute(
                "SELECT COUNT(*) FROM trials WHERE run_id = ? AND task = ? AND optimizer = ? AND phase = 'tune' "
                "AND status = 'diverged'", (run_id, task, optimizer))[0][0]
            metrics = [r["final_metric"] for r in finals if r["final_metric"] is not None]  # None: diverged
            losses = [r["final_loss"] for r in finals if r["final_loss"] is not None]
            assert cells["n_seeds"] == str(len(finals))
            if metrics and task == "digits-logreg":  # noisy: sample std and the Student-t interval
                mean, std = statistics.fmean(metrics), statistics.stdev(metrics)
                half = t_quantile(0.975, len(metrics) - 1) * std / len(metrics) ** 0.5
                assert float(cells["metric_mean"]) == pytest.approx(mean, rel=1e-12)
                assert float(cells["metric_std"]) == pytest.approx(std, rel=1e-9, abs=1e-15)
                assert float(cells["ci_low"]) == pytest.approx(mean - half, rel=1e-9)
                assert float(cells["ci_high"]) == pytest.approx(mean + half, rel=1e-9)
                assert float(cells["loss_mean"]) == pytest.approx(statistics.fmean(losses), rel=1e-12)
            elif metrics:  # deterministic test functions: no spread shown
                assert float(cells["metric_mean"]) == pytest.approx(statistics.fmean(metrics), rel=1e-12)
                assert cells["metric_std"] == cells["ci_low"] == cells["ci_high"] == ""
            else:
                assert cells["metric_mean"] == cells["metric_std"] == cells["loss_mean"] == ""
            reached = [r["steps_to_target"] for r in finals if r["steps_to_target"] is not None]
            assert cells["reached"] == str(len(reached))
            if reached:
                assert float(cells["steps_to_target_mean"]) == pytest.approx(statistics.fmean(reached), rel=1e-12)
            else:
                assert cells["steps_to_target_mean"] == ""
            assert float(cells["ms_per_step"]) == pytest.approx(statistics.median(r["ms_per_step"] for r in finals),
                                                                rel=1e-12)
            assert float(cells["state_bytes_per_param"]) == finals[0]["state_bytes_per_param"]
            assert cells["tune_diverged"] == str(tune_diverged)
            assert (schedule, clip) == ("constant", "none") and params.startswith("lr=")


def test_state_bytes_per_param_match_the_algorithms(finished_bench):
    db, run_id = finished_bench
    with Store(db) as store:
        rows = store.execute("SELECT DISTINCT task, optimizer, state_bytes_per_param FROM trials WHERE run_id = ?",
                             (run_id,))
    by_key = {(r["task"], r["optimizer"]): r["state_bytes_per_param"] for r in rows}
    assert by_key[("digits-logreg", "adam")] == 8.0  # exp_avg + exp_avg_sq in float32
    assert by_key[("digits-logreg", "sgd-momentum")] == 4.0  # momentum_buffer
    assert by_key[("rosenbrock", "adam")] == 16.0  # the test functions run in float64


def test_loss_smoothing_is_a_bias_corrected_ema():
    from optimlab.bench.plots import ema
    from optimlab.bench.report import smoothing_factor

    # m1 = 0.5 * 1 = 0.5 -> 0.5 / (1 - 0.5) = 1; m2 = 0.5 * 0.5 + 0.5 * 3 = 1.75 -> 1.75 / (1 - 0.25) = 7/3
    assert list(ema([1.0, 3.0], 0.5)) == pytest.approx([1.0, 7 / 3], rel=1e-15)
    assert list(ema([2.0] * 5, 0.9)) == pytest.approx([2.0] * 5, rel=1e-15)  # no shrinking towards 0
    assert smoothing_factor(300) == pytest.approx(0.9) and smoothing_factor(59) is None
