"""Paired comparisons over seeds: is variant A better than baseline B, and how sure are we?

Seed s trains every variant on the same data order and with the same initialisation of every
module they share, so the runs of one seed form a pair and the seed-to-seed noise that both
share cancels in their difference. For an evaluation set and a budget point, seed s gives

    d_s = ppl_A(s) / ppl_B(s) - 1          (relative perplexity difference; < 0: A is better)

and over N seeds (Student t, N - 1 degrees of freedom)

    mean = (1/N) sum_s d_s,   sd = sqrt(sum_s (d_s - mean)^2 / (N - 1)),
    95% interval = mean +- t_{0.975, N-1} * sd / sqrt(N).

The verdict compares the interval with the paper's direction for the pair (the paper's
perplexities, ``expected``): ``holds`` when the whole interval lies on the paper's side of 0,
``reversed`` when it lies on the other side, ``not resolved`` when it contains 0 (or N < 2).
``wins`` counts the seeds in which A had the lower perplexity.

The evaluation's own noise in a pair is measured window by window (``mhmoe.runs.eval_windows``):
both runs see the same windows, so the standard error of the loss difference
``sum_w (nll_A,w - nll_B,w) / sum_w n_w`` over windows is what another sample of the same kind
of text would move the comparison by (``eval_se``; for small differences the relative
perplexity difference moves by the same amount, since d = exp(loss_A - loss_B) - 1).

``seeds_needed`` turns a measured seed-to-seed spread into a power estimate: the fewest seeds
for which a true difference of ``effect`` is resolved (the interval excludes 0) with the
requested power: (t_{1-alpha/2, N-1} + t_{power, N-1}) * sd / sqrt(N) <= effect.
"""

from __future__ import annotations

import logging
import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

VERDICTS = ("holds", "reversed", "not resolved")
_NORMAL_975_PLUS_80 = 1.959963984540054 + 0.8416212335729143  # z_0.975 + z_0.8


def _regularized_incomplete_beta(x: float, a: float, b: float) -> float:
    """I_x(a, b) by its continued fraction (modified Lentz), for 0 <= x <= 1."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    if x > (a + 1.0) / (a + b + 2.0):  # the fraction converges fast only below this point
        return 1.0 - _regularized_incomplete_beta(1.0 - x, b, a)
    log_front = (math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
                 + a * math.log(x) + b * math.log1p(-x))
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    fraction = d
    for m in range(1, 500):
        for numerator in (
            m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
            -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1)),
        ):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            fraction *= c * d
        if abs(c * d - 1.0) < 1e-15:
            break
    return math.exp(log_front) * fraction / a


def student_t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with ``df`` degrees of freedom."""
    if df <= 0:
        raise ValueError(f"df={df!r}: degrees of freedom must be positive")
    tail = 0.5 * _regularized_incomplete_beta(df / (df + t * t), df / 2.0, 0.5)
    return 1.0 - tail if t > 0 else tail


def student_t_quantile(p: float, df: float) -> float:
    """The ``p`` quantile of Student's t (bisection on ``student_t_cdf``; |error| < 1e-10)."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"p={p!r}: must lie strictly between 0 and 1")
    if p < 0.5:
        return -student_t_quantile(1.0 - p, df)
    low, high = 0.0, 1.0
    while student_t_cdf(high, df) < p:
        high *= 2.0
    while high - low > 1e-10 * max(1.0, high):
        middle = 0.5 * (low + high)
        if student_t_cdf(middle, df) < p:
            low = middle
        else:
            high = middle
    return 0.5 * (low + high)


@dataclass(frozen=True)
class PairedInterval:
    """Mean, standard deviation and confidence interval of per-seed paired differences."""

    mean: float
    sd: float | None  # None for one seed
    low: float | None  # None for one seed: no interval
    high: float | None
    count: int


def paired_interval(differences: Sequence[float], level: float = 0.95) -> PairedInterval:
    """The Student t interval of the mean of ``differences`` (module docstring)."""
    values = [float(v) for v in differences]
    if not values:
        raise ValueError("paired_interval: no differences given")
    if not all(math.isfinite(v) for v in values):
        raise ValueError(f"paired_interval: differences must be finite, got {values}")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level={level!r}: must lie strictly between 0 and 1")
    mean = statistics.fmean(values)
    if len(values) < 2:
        return PairedInterval(mean, None, None, None, len(values))
    sd = statistics.stdev(values)
    half = student_t_quantile(0.5 + level / 2.0, len(values) - 1) * sd / math.sqrt(len(values))
    return PairedInterval(mean, sd, mean - half, mean + half, len(values))


def verdict(interval: PairedInterval, expect_lower: bool = True) -> str:
    """``holds`` / ``reversed`` / ``not resolved`` (module docstring); ``expect_lower``: the
    paper has the variant's perplexity below the baseline's."""
    if interval.low is None or interval.high is None:
        return "not resolved"
    if interval.high < 0.0:
        return "holds" if expect_lower else "reversed"
    if interval.low > 0.0:
        return "reversed" if expect_lower else "holds"
    return "not resolved"


def ratio_standard_error(window_nll: np.ndarray, window_targets: np.ndarray) -> float | None:
    """Standard error of the ratio ``sum(nll) / sum(n)`` with windows as the sampling units:
    sqrt(W / (W - 1) * sum_w (nll_w - ratio * n_w)^2) / sum_w n_w (``mhmoe.evaluate.EvalResult``);
    None for fewer than 2 windows."""
    count = int(window_nll.shape[0])
    if count < 2:
        return None
    total = float(window_targets.sum())
    loss = float(window_nll.sum()) / total
    residual = window_nll - loss * window_targets
    return math.sqrt(count / (count - 1) * float(np.square(residual).sum())) / total


def paired_window_se(nll_a: np.ndarray, nll_b: np.ndarray, targets: np.ndarray) -> float | None:
    """Standard error over windows of the loss difference ``sum(nll_a - nll_b) / sum(targets)``:
    ``ratio_standard_error`` of the per-window differences (both runs saw the same windows)."""
    nll_a, nll_b, targets = (np.asarray(v, dtype=np.float64) for v in (nll_a, nll_b, targets))
    if not nll_a.shape == nll_b.shape == targets.shape or nll_a.ndim != 1:
        raise ValueError(f"window arrays must have one 1-D shape, got {nll_a.shape}, {nll_b.shape}, {targets.shape}")
    return ratio_standard_error(nll_a - nll_b, targets)


def seeds_needed(sd: float, effect: float = 0.02, level: float = 0.95, power: float = 0.8,
                 max_seeds: int = 10_000) -> int | None:
    """Fewest seeds resolving a true paired difference ``effect`` (module docstring); None when
    more than ``max_seeds`` would be needed."""
    if not (sd >= 0 and math.isfinite(sd)):
        raise ValueError(f"sd={sd!r}: must be a finite non-negative number")
    if not effect > 0:
        raise ValueError(f"effect={effect!r}: must be positive")
    # t quantiles exceed the normal ones, so the answer is never below the normal-theory count.
    z = _NORMAL_975_PLUS_80 if (level, power) == (0.95, 0.8) else None
    first = 2 if z is None else max(2, math.ceil((z * sd / effect) ** 2))
    if first > max_seeds:
        return None
    for n in range(first, max_seeds + 1):
        width = (student_t_quantile(0.5 + level / 2.0, n - 1) + student_t_quantile(power, n - 1)) * sd / math.sqrt(n)
        if width <= effect:
            return n
    return None


@dataclass(frozen=True)
class PointValue:
    """One run's evaluation of one set at one budget point: its loss, and the per-window sums
    when they were kept (``mhmoe.runs.eval_windows``)."""

    loss: float
    window_nll: np.ndarray | None = None
    window_targets: np.ndarray | None = None


# runs[variant][seed][(set, point)] -> PointValue
RunValues = Mapping[str, Mapping[int, Mapping[tuple[str, str], PointValue]]]


def compare(
    runs: RunValues,
    pairs: Sequence[tuple[str, str]],
    expect_lower: Mapping[tuple[str, str], bool] | None = None,
    level: float = 0.95,
) -> list[dict[str, Any]]:
    """One entry per (set, point, variant, baseline) that both runs of at least one common seed
    have: the paired statistics of the module docstring, in ``results.json``'s ``comparisons``
    layout (``set``, ``point``, ``variant``, ``baseline``, ``mean_rel_diff``, ``ci95``, ``wins``,
    ``seeds``, ``verdict``; plus ``sd``, ``eval_se``, ``expected``, ``per_seed``)."""
    expect_lower = expect_lower or {}
    entries = []
    for variant, baseline in pairs:
        seeds = sorted(set(runs.get(variant, {})) & set(runs.get(baseline, {})))
        keys = sorted({key for seed in seeds for key in runs[variant][seed]} &
                      {key for seed in seeds for key in runs[baseline][seed]})
        for set_name, point in keys:
            per_seed, eval_ses = [], []
            for seed in seeds:
                a = runs[variant][seed].get((set_name, point))
                b = runs[baseline][seed].get((set_name, point))
                if a is None or b is None:
                    continue
                if not (math.isfinite(a.loss) and math.isfinite(b.loss)):
                    logger.warning("%s vs %s, %s @%s, seed %d: a non-finite loss; seed left out",
                                   variant, baseline, set_name, point, seed)
                    continue
                relative = math.expm1(a.loss - b.loss)  # ppl_a / ppl_b - 1
                se = None
                if (a.window_nll is not None and b.window_nll is not None
                        and a.window_nll.shape == b.window_nll.shape
                        and np.array_equal(a.window_targets, b.window_targets)):
                    se = paired_window_se(a.window_nll, b.window_nll, a.window_targets)
                if se is not None:
                    se *= 1.0 + relative  # SE of the loss difference -> of ppl_a / ppl_b - 1
                    eval_ses.append(se)
                per_seed.append({"seed": seed, "rel_diff": relative, "loss_diff": a.loss - b.loss,
                                 "eval_se": se})
            if not per_seed:
                continue
            interval = paired_interval([entry["rel_diff"] for entry in per_seed], level)
            lower = expect_lower.get((variant, baseline), True)
            entries.append({
                "set": set_name,
                "point": point,
                "variant": variant,
                "baseline": baseline,
                "mean_rel_diff": interval.mean,
                "ci95": [interval.low, interval.high],
                "sd": interval.sd,
                "wins": sum(entry["rel_diff"] < 0 for entry in per_seed),
                "seeds": interval.count,
                "eval_se": statistics.fmean(eval_ses) if eval_ses else None,
                "expected": "lower" if lower else "higher",
                "verdict": verdict(interval, lower),
                "per_seed": per_seed,
            })
    return entries
