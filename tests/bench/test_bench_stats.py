"""Statistics over seeds and the verdicts built on them, against hand-computed values."""

import math

import pytest
from scipy import stats as scipy_stats

from optimlab.bench import stats
from optimlab.bench.verdict import compare_groups, lr_warnings, performance_profile, verdict


def test_student_t_quantiles_match_the_tables():
    # closed forms: df 1 is Cauchy, t = tan(pi (p - 1/2)); df 2: t = (2p - 1) / sqrt(2 p (1 - p))
    assert stats.t_quantile(0.975, 1) == pytest.approx(math.tan(math.pi * 0.475), rel=1e-12)
    assert stats.t_quantile(0.975, 2) == pytest.approx(0.95 / math.sqrt(2 * 0.975 * 0.025), rel=1e-12)
    # two-sided 95 % critical values from the tables (10 digits): df 3, 4, 9
    for df, value in ((3, 3.182446305), (4, 2.776445105), (9, 2.262157163)):
        assert stats.t_quantile(0.975, df) == pytest.approx(value, rel=1e-9)
    with pytest.raises(ValueError, match="Invalid probability"):
        stats.t_quantile(1.0, 3)


def test_describe_sample_std_and_t_interval_by_hand():
    summary = stats.describe([1.0, 2.0, 3.0, 4.0])
    # mean 2.5; squared deviations 2.25 + 0.25 + 0.25 + 2.25 = 5, / (n - 1) = 5/3; half-width t(0.975, 3) s / 2
    assert summary.n == 4 and summary.mean == 2.5
    assert summary.std == pytest.approx(math.sqrt(5 / 3), rel=1e-15)
    half = 3.182446305 * math.sqrt(5 / 3) / 2
    assert (summary.ci_low, summary.ci_high) == pytest.approx((2.5 - half, 2.5 + half), rel=1e-9)
    single = stats.describe([0.7])
    assert (single.mean, single.std, single.ci_low) == (0.7, None, None)
    with pytest.raises(ValueError, match="empty"):
        stats.describe([])


def test_welch_by_hand_and_against_scipy():
    a, b = [1.0, 2.0, 3.0], [4.0, 5.0, 6.0, 7.0]
    # var a = 1, var b = 5/3: se^2 = 1/3 + 5/12 = 3/4; t = -3.5 / sqrt(3/4); df = (3/4)^2 / (1/18 + 25/432) = 3888/784
    result = stats.welch_test(a, b)
    assert result.t == pytest.approx(-3.5 / math.sqrt(0.75), rel=1e-14)
    assert result.df == pytest.approx(3888 / 784, rel=1e-14)
    reference = scipy_stats.ttest_ind(a, b, equal_var=False)
    assert result.p == pytest.approx(reference.pvalue, rel=1e-10) and result.p == pytest.approx(0.0100769433, rel=1e-8)
    assert stats.welch_test([1.0], b) is None
    assert stats.welch_test([2.0, 2.0], [2.0, 2.0]).p == 1.0 and stats.welch_test([2.0, 2.0], [3.0, 3.0]).p == 0.0


def test_significance_rules():
    assert stats.significantly_different([1.0, 2.0, 3.0], [4.0, 5.0, 6.0, 7.0], deterministic=False)  # p = 0.01
    assert not stats.significantly_different([1.0, 2.0, 3.0], [1.5, 2.5, 3.5], deterministic=False)
    assert stats.significantly_different([1.0], [2.0], deterministic=False) is None
    assert not stats.significantly_different([1.0], [1.0 + 1e-9], deterministic=True)
    assert stats.significantly_different([1.0], [1.001], deterministic=True)
    assert stats.format_value(stats.describe([0.9, 0.92, 0.94]), False) == "0.92 ± 0.02 (n=3)"
    assert stats.format_value(stats.describe([1e-4]), True) == "0.0001 (deterministic)"
    assert stats.format_value(stats.describe([0.5]), False) == "0.5 (n=1)"


def row(optimizer, values, mode="max", reached=None, deterministic=False, lr=1e-3, task="t", time=None):
    """A summary row as :func:`optimlab.bench.runner.summarize` makes it."""
    return {"task": task, "optimizer": optimizer, "schedule": "constant", "clip": "none", "params": {"lr": lr},
            "metric": "acc" if mode == "max" else "loss", "mode": mode, "target": 0.9 if mode == "max" else 0.1,
            "deterministic": deterministic, "metric_values": values, "metric_mean": sum(values) / len(values),
            "n_seeds": len(values), "reached": len(values) if reached is None else reached,
            "steps_to_target_mean": None, "time_to_target_mean": time}


def test_max_mode_crowns_the_highest_accuracy():
    low, high = row("sgd", [0.90, 0.91, 0.92]), row("adam", [0.97, 0.975, 0.98])
    result = verdict("t", [low, high])
    assert result.kind == "winner" and result.best["optimizer"] == "adam" and result.runner_up["optimizer"] == "sgd"
    assert result.text.startswith("t: winner adam (lr=0.001, schedule constant, clip none): acc 0.975 ± 0.005 (n=3)")
    minimum = verdict("t", [row("a", [0.3, 0.31], mode="min"), row("b", [0.2, 0.21], mode="min")])
    assert minimum.best["optimizer"] == "b"


def test_ties_within_noise_and_identical_results():
    noisy = verdict("t", [row("adam", [0.95, 0.97, 0.96]), row("torch.adam", [0.96, 0.95, 0.97]),
                          row("sgd", [0.5, 0.51, 0.52])])
    assert noisy.kind == "tie" and {r["optimizer"] for r in noisy.tied} == {"adam", "torch.adam"}
    assert noisy.text.startswith("t: tie: adam, torch.adam (within noise)") or \
        noisy.text.startswith("t: tie: torch.adam, adam (within noise)")
    same = verdict("t", [row("adam", [1e-3], deterministic=True), row("torch.adam", [1e-3 * (1 + 1e-12)],
                                                                      deterministic=True)])
    assert same.kind == "tie"
    one_seed = verdict("t", [row("a", [0.95]), row("b", [0.93])])
    assert one_seed.kind == "tie" and "single seed: noise unknown" in one_seed.text
    exact = verdict("t", [row("a", [0.2], deterministic=True, mode="min"),
                          row("b", [0.15], deterministic=True, mode="min")])  # neither meets the target 0.1
    assert exact.kind == "winner" and exact.best["optimizer"] == "b" and "(deterministic)" in exact.text
    assert "±" not in exact.text


def test_deterministic_gaps_below_the_target_tie():
    """beale's 0 against 5e-7 (target: gap <= 1e-3) is no win; a configuration above the target still loses."""
    def gap(optimizer, value):
        return row(optimizer, [value], deterministic=True, mode="min", task="beale") | {"target": 1e-3}

    both = verdict("beale", [gap("adam", 5e-7), gap("lion", 0.0), gap("sgd", 2e-3)])
    assert both.kind == "tie" and [r["optimizer"] for r in both.tied] == ["lion", "adam"]
    assert "tie: lion, adam (both meet the target)" in both.text
    one = verdict("beale", [gap("adam", 1e-3 * (1 + 1e-3)), gap("lion", 0.0)])  # just above the target: real
    assert one.kind == "winner" and one.best["optimizer"] == "lion"
    three = verdict("beale", [gap("adam", 5e-7), gap("lion", 0.0), gap("sgd", 1e-4)])
    assert "tie: lion, adam, sgd (all meet the target)" in three.text
    accuracy = verdict("t", [row("a", [0.95], deterministic=True), row("b", [0.99], deterministic=True)])
    assert accuracy.kind == "tie" and "both meet the target" in accuracy.text  # max mode: both >= 0.9
    noisy = verdict("t", [row("a", [0.95, 0.951, 0.952]), row("b", [0.99, 0.991, 0.992])])
    assert noisy.kind == "winner"  # the rule is for deterministic tasks only: seeds' noise decides elsewhere
    runs = compare_groups(gap("adam", 5e-7), gap("adam", 0.0))  # `runs compare`: the same rule
    assert runs == ("both meet the target", None)
    assert compare_groups(gap("adam", 2e-3), gap("adam", 0.0))[0] == "b"


def test_nothing_reached_crowns_nobody():
    result = verdict("t", [row("a", [0.5, 0.52], reached=0), row("b", [0.8, 0.81], reached=0)])
    assert result.kind == "unreached" and "winner" not in result.text
    assert result.text.startswith("t: no configuration reached the target (acc >= 0.9) (best: b (lr=0.001")
    diverged = verdict("t", [row("a", [0.5]) | {"metric_values": [], "metric_mean": None}])
    assert diverged.kind == "diverged" and diverged.best is None


def test_learning_rate_bound_warning():
    rows = [row("a", [0.9]) | {"params": {"lr": 0.07}, "lr_range": [1e-5, 0.1]},  # 0.1 / 0.07 < 1.5
            row("b", [0.9]) | {"params": {"lr": 1.4e-5}, "lr_range": [1e-5, 0.1]},  # 1.4 < 1.5
            row("c", [0.9]) | {"params": {"lr": 1e-3}, "lr_range": [1e-5, 0.1]}]
    lines = lr_warnings(rows)
    assert len(lines) == 2 and "t/a: tuned lr 0.07 lies within 1.5x of the upper search bound 0.1" in lines[0]
    assert "lower search bound 1e-05" in lines[1] and "--lr-range LOW,HIGH" in lines[1]


def test_runs_compare_says_better_only_beyond_noise():
    a, b = row("x", [0.90, 0.91, 0.92]), row("x", [0.97, 0.975, 0.98])
    assert compare_groups(a, b)[0] == "b" and compare_groups(a, a)[0] == "within noise"
    assert compare_groups(a, row("x", [0.905, 0.915, 0.925]))[0] == "within noise"
    assert compare_groups(row("x", [0.9]), row("x", [0.95]))[0] == "noise unknown"


def test_performance_profile_by_hand():
    rows = [row("x", [1.0, 1.0], task="p", time=2.0), row("y", [1.0, 1.0], task="p", time=1.0),
            row("x", [1.0, 1.0], task="q", time=3.0), row("y", [1.0, 1.0], task="q", time=6.0, reached=1)]
    profile = performance_profile(rows)
    assert profile.ratios == {"x": [2.0, 1.0], "y": [1.0, math.inf]}  # y solves q on one seed of two: unsolved
    assert profile.fraction("x", 1.0) == 0.5 and profile.fraction("x", 2.0) == 1.0
    assert profile.fraction("y", 100.0) == 0.5
    assert profile.summaries["y"] == "y: solved 1/2 tasks, fastest on 1, within 2x of the fastest on 1"


def test_recommend_snippet_runs_and_builds_the_configuration():
    import torch

    from optimlab.bench.recommend import Recommendation, snippet
    from optimlab.schedules import WarmupCosineLR

    best = Recommendation(optimizer="adamw", params={"lr": 0.003, "weight_decay": 0.01},
                          schedule="warmup-cosine:warmup_steps=10", clip="norm:1.0", metric="acc", mode="max",
                          mean=0.9, std=0.01, n_seeds=3, n_diverged=0, run_id=1, steps=200)
    code = snippet(best)
    model = torch.nn.Linear(3, 1)
    namespace = {"model": model}
    exec(code, namespace)  # what a user pastes
    optimizer, scheduler, clipper = namespace["optimizer"], namespace["scheduler"], namespace["clipper"]
    assert type(optimizer).__name__ == "AdamW" and optimizer.defaults["weight_decay"] == 0.01
    assert isinstance(scheduler, WarmupCosineLR) and scheduler.warmup_steps == 10 and scheduler.total_steps == 200
    assert optimizer.param_groups[0]["initial_lr"] == pytest.approx(0.003)
    model(torch.ones(1, 3)).sum().mul(1e6).backward()
    clipper.step()
    assert float(torch.cat([p.grad.flatten() for p in model.parameters()]).norm()) == pytest.approx(1.0, rel=1e-5)
    assert "# each step: loss.backward(); clipper.step(); optimizer.step(); scheduler.step(); optimizer.zero_grad()" \
        in code
    plain = snippet(Recommendation("sgd", {"lr": 0.1}, "constant", "none", "acc", "max", 0.9, None, 1, 0, 1, 50))
    assert plain == ("from optimlab.optim import create_optimizer\noptimizer = create_optimizer(model, 'sgd', lr=0.1)\n"
                     "# each step: loss.backward(); optimizer.step(); optimizer.zero_grad()")


def test_recommend_snippet_for_sam_steps_with_a_closure():
    import torch

    from optimlab.bench.recommend import Recommendation, snippet

    code = snippet(Recommendation("sam-adamw", {"lr": 0.001}, "constant", "norm:1.0", "acc", "max", 0.9, None, 1, 0,
                                  1, 50))
    namespace = {"model": torch.nn.Linear(3, 1)}
    exec(code, namespace)
    assert type(namespace["optimizer"]).__name__ == "SAM"
    assert code.endswith("# each step: optimizer.step(closure) where closure() does optimizer.zero_grad(); loss = ...; "
                         "loss.backward(); clipper.step(); return loss (called twice per step: SAM's two gradients)")
