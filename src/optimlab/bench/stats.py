"""Statistics over seeds: mean, sample standard deviation, Student-t confidence interval, Welch's t-test.

For values :math:`x_1..x_n`: mean :math:`\\bar x`, sample standard deviation
:math:`s = \\sqrt{\\sum (x_i - \\bar x)^2 / (n - 1)}`, and the 95 % confidence interval of the mean
:math:`\\bar x \\pm t_{0.975,\\,n-1}\\, s / \\sqrt n` (Student 1908). Two groups are compared with Welch's
unequal-variance t-test (Welch 1947): :math:`t = (\\bar a - \\bar b) / \\sqrt{s_a^2/n_a + s_b^2/n_b}` with
the Welch–Satterthwaite degrees of freedom
:math:`\\nu = (s_a^2/n_a + s_b^2/n_b)^2 / \\big((s_a^2/n_a)^2/(n_a-1) + (s_b^2/n_b)^2/(n_b-1)\\big)`, two-sided.

A *deterministic* task (a test function: the seed changes nothing) has no noise to estimate: two
results differ when they differ beyond floating-point rounding (:data:`DETERMINISTIC_RTOL`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from scipy import stats as _scipy_stats

__all__ = ["ALPHA", "DETERMINISTIC_RTOL", "DETERMINISTIC_ATOL", "Summary", "WelchResult", "describe", "t_quantile",
           "welch_test", "significantly_different", "format_value"]

ALPHA = 0.05
DETERMINISTIC_RTOL = 1e-6
DETERMINISTIC_ATOL = 1e-12


@dataclass(frozen=True)
class Summary:
    """Mean, sample std and the 95 % Student-t interval of ``n`` values (``std``/``ci`` ``None`` when n < 2)."""

    n: int
    mean: float
    std: float | None
    ci_low: float | None
    ci_high: float | None


@dataclass(frozen=True)
class WelchResult:
    """Welch's two-sided t-test: statistic, Welch–Satterthwaite degrees of freedom and p-value."""

    t: float
    df: float
    p: float


def t_quantile(probability: float, df: float) -> float:
    """The ``probability`` quantile of Student's t with ``df`` degrees of freedom."""
    if not 0.0 < probability < 1.0:
        raise ValueError(f"Invalid probability: {probability} (accepted range: (0, 1))")
    if not df > 0:
        raise ValueError(f"Invalid df: {df} (accepted range: > 0)")
    return float(_scipy_stats.t.ppf(probability, df))


def describe(values: Sequence[float], confidence: float = 0.95) -> Summary:
    """:class:`Summary` of ``values`` (at least one)."""
    n = len(values)
    if n == 0:
        raise ValueError("Invalid values: empty (need at least one)")
    mean = math.fsum(values) / n
    if n < 2:
        return Summary(n, mean, None, None, None)
    std = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1))
    half = t_quantile(0.5 + confidence / 2, n - 1) * std / math.sqrt(n)
    return Summary(n, mean, std, mean - half, mean + half)


def welch_test(a: Sequence[float], b: Sequence[float]) -> WelchResult | None:
    """Welch's two-sided t-test of equal means; ``None`` when a group has fewer than two values.

    Both groups without spread: ``p = 1`` for equal means, ``0`` otherwise (a difference without noise).
    """
    sa, sb = describe(a), describe(b)
    if sa.std is None or sb.std is None:
        return None
    va, vb = sa.std**2 / sa.n, sb.std**2 / sb.n
    diff = sa.mean - sb.mean
    if va + vb == 0.0:
        return WelchResult(0.0 if diff == 0 else math.copysign(math.inf, diff), math.inf, 1.0 if diff == 0 else 0.0)
    t = diff / math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va**2 / (sa.n - 1) + vb**2 / (sb.n - 1))
    return WelchResult(t, df, float(2.0 * _scipy_stats.t.sf(abs(t), df)))


def significantly_different(a: Sequence[float], b: Sequence[float], deterministic: bool,
                            alpha: float = ALPHA) -> bool | None:
    """Whether the two groups differ beyond the noise: Welch's test at level ``alpha`` for noisy results,
    beyond rounding (:data:`DETERMINISTIC_RTOL`, :data:`DETERMINISTIC_ATOL`) for deterministic ones.
    ``None`` when a noisy group has a single value (the noise is unknown)."""
    if deterministic:
        return not math.isclose(describe(a).mean, describe(b).mean, rel_tol=DETERMINISTIC_RTOL,
                                abs_tol=DETERMINISTIC_ATOL)
    result = welch_test(a, b)
    return None if result is None else result.p < alpha


def format_value(summary: Summary, deterministic: bool, digits: int = 4) -> str:
    """``"0.9611 ± 0.0040 (n=3)"``; deterministic: ``"0.9611 (deterministic)"``; one value: ``"0.96 (n=1)"``.
    The ± is the sample standard deviation."""
    mean = f"{summary.mean:.{digits}g}"
    if deterministic:
        return f"{mean} (deterministic)"
    if summary.std is None:
        return f"{mean} (n={summary.n})"
    return f"{mean} ± {summary.std:.2g} (n={summary.n})"
