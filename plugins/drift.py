"""Drift tests of one current column against its reference quantile sketch.

Decisions use effect sizes, not p-values: with a million rows every p-value is tiny even when
nothing meaningful moved, while an effect size estimates *how much* it moved, independent of n.
A feature is flagged when the effect size reaches the threshold **and** the p-value is below
``ALPHA``; the p-value only guards small windows, where effect sizes are noisy (PSI and JS over
100 bins are heavily biased upwards at a few hundred rows). The numeric tests share one p-value:
the KS test on the same bins, which stays valid at small n where chi-square approximations of
PSI/JS do not.

Default thresholds, calibrated so a 0.2-sigma mean shift is caught at 100k rows while sampling
noise at 100k-1M rows stays 5-20x below them (noise: KS ~0.006, PSI ~0.002, JS ~0.015):

========== ======================================= ========= ===============
test       effect size                             threshold 0.2-sigma shift
========== ======================================= ========= ===============
ks         max CDF gap D                           0.05      ~0.08
wasserstein W1 / reference std                     0.1       ~0.2
psi        population stability index              0.02      ~0.04
js         Jensen-Shannon distance (sqrt, base e)  0.05      ~0.07
chi_square Cohen's w = sqrt(sum (c-r)^2 / r)       0.1       (categorical)
========== ======================================= ========= ===============

PSI's textbook 0.1/0.25 bands would miss a 0.2-sigma shift entirely; they were made for 10 bins.
Every test bins the current column once (shared :class:`CurrentColumn`) with ``searchsorted`` on
the reference quantile edges; nothing rescans training data.

Discrete numeric columns (0/1 flags, small counts: at most ~20 distinct values in the reference)
are tested as distributions over values: their quantile edges collapse onto the values, so a flag
going from 10 % to 20 % ones would leave every quantile bin unchanged. The reference keeps exact
value frequencies instead, the histogram has one cell per value and one per gap between values,
Wasserstein is exact over the values, and the shared p-value is a chi-square test on the value
frequencies (the KS p-value is too conservative for discrete data). The same thresholds apply:
the flag above gives KS 0.10, PSI 0.08, JS 0.10 and W1/std 0.33.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import numpy.typing as npt

from cyclone.hookspecs import hookimpl
from cyclone.plugin_api import CurrentColumn, DriftResult, DriftTestSpec, NumericProfile

FloatArray = npt.NDArray[np.float64]
ALPHA = 1e-3
# Floor for empty bins in log ratios; 1e-4 is below the mass of a single 100-quantile bin.
EPS = 1e-4
MIN_ROWS = 2


def _decide(statistic: float, p: float | None, effect: float, threshold: float) -> DriftResult:
    drifted = effect >= threshold and (p is None or p < ALPHA)
    return DriftResult(statistic, p, effect, bool(drifted), threshold)


def _effective_n(col: CurrentColumn, n_cur: int) -> float:
    n_ref = col.reference.count
    return n_ref * n_cur / (n_ref + n_cur) if n_ref + n_cur > 0 else 0.0


def _numeric_guard(col: CurrentColumn, threshold: float) -> DriftResult | None:
    ref = col.reference
    if not isinstance(ref, NumericProfile) or ref.count == 0 or not ref.edges:
        return DriftResult.skipped("not_enough_data", "empty numeric reference", threshold)
    if len(col.numeric) < MIN_ROWS:
        return DriftResult.skipped("not_enough_data", "fewer than 2 current values", threshold)
    return None


# scipy is imported inside these three wrappers, not at module level: the monitor loads this
# plugin at start (get_plugins() checks every plugin then), and scipy costs ~0.3 s of import
# that only the first drift test needs to pay.
def _kolmogorov(x: float) -> float:
    from scipy import special

    return float(special.kolmogorov(x))


def _chi2_sf(statistic: float, dof: int) -> float:
    from scipy import stats

    return float(stats.chi2.sf(statistic, dof))


def _rel_entr(p: npt.NDArray[np.float64], q: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    from scipy import special

    return np.asarray(special.rel_entr(p, q), dtype=np.float64)


def _ks(col: CurrentColumn) -> tuple[float, float | None]:
    ref_p, cur_p = col.histogram
    d = float(np.abs(np.cumsum(cur_p) - np.cumsum(ref_p)).max())
    en = _effective_n(col, len(col.numeric))
    if _is_discrete(col):
        return d, _value_chi_square_p(col, en)
    return d, (float(_kolmogorov(math.sqrt(en) * d)) if en > 0 else None)


def _is_discrete(col: CurrentColumn) -> bool:
    return isinstance(col.reference, NumericProfile) and col.reference.discrete


def _value_chi_square_p(col: CurrentColumn, n_eff: float) -> float | None:
    """Chi-square p-value on value frequencies; current mass off the values is one pooled cell."""
    if n_eff <= 0:
        return None
    ref_p, cur_p = col.histogram
    ref_cells = np.append(ref_p[1::2], 0.0)
    cur_cells = np.append(cur_p[1::2], cur_p[0::2].sum())
    ref_cells = np.maximum(ref_cells, EPS)
    statistic = n_eff * float(np.sum((cur_cells - ref_cells) ** 2 / ref_cells))
    return float(_chi2_sf(statistic, max(len(ref_cells) - 1, 1)))


def ks(col: CurrentColumn, threshold: float) -> DriftResult:
    if (skip := _numeric_guard(col, threshold)) is not None:
        return skip
    d, p = _ks(col)
    return _decide(d, p, d, threshold)


def _discrete_wasserstein(col: CurrentColumn) -> float:
    """Exact W1 between the reference value frequencies and the current values."""
    points, ref_p, cur_p = col.value_support
    gap = np.abs(np.cumsum(cur_p) - np.cumsum(ref_p))[:-1]
    return float(np.sum(gap * np.diff(points)))


def wasserstein(col: CurrentColumn, threshold: float) -> DriftResult:
    if (skip := _numeric_guard(col, threshold)) is not None:
        return skip
    ref = col.reference
    assert isinstance(ref, NumericProfile)
    scale = ref.std if ref.std > 0 else 1.0
    if ref.discrete:
        w = _discrete_wasserstein(col)
        return _decide(w, _ks(col)[1], w / scale, threshold)
    ref_p, cur_p = col.histogram
    edges = np.asarray(ref.edges, dtype=np.float64)
    # CDF gap at each reference edge; within a bin both CDFs are taken as linear (trapezoid).
    gap = np.abs(np.cumsum(cur_p)[:-1] - np.cumsum(ref_p)[:-1])
    inner = float(np.sum((gap[:-1] + gap[1:]) * 0.5 * np.diff(edges))) if len(edges) > 1 else 0.0
    lo, hi = col.out_of_range_mass
    w = inner + lo + hi
    # W1 has no closed-form p-value; the KS p-value on the same bins guards small windows.
    return _decide(w, _ks(col)[1], w / scale, threshold)


def _smoothed(ref_p: FloatArray, cur_p: FloatArray) -> tuple[FloatArray, FloatArray]:
    return np.maximum(ref_p, EPS), np.maximum(cur_p, EPS)


def psi(col: CurrentColumn, threshold: float) -> DriftResult:
    if (skip := _numeric_guard(col, threshold)) is not None:
        return skip
    ref_p, cur_p = _smoothed(*col.histogram)
    value = float(np.sum((cur_p - ref_p) * np.log(cur_p / ref_p)))
    return _decide(value, _ks(col)[1], value, threshold)


def js(col: CurrentColumn, threshold: float) -> DriftResult:
    if (skip := _numeric_guard(col, threshold)) is not None:
        return skip
    ref_p, cur_p = col.histogram
    m = 0.5 * (ref_p + cur_p)
    divergence = 0.5 * float(np.sum(_rel_entr(ref_p, m) + _rel_entr(cur_p, m)))
    distance = math.sqrt(max(divergence, 0.0))
    return _decide(distance, _ks(col)[1], distance, threshold)


def chi_square(col: CurrentColumn, threshold: float) -> DriftResult:
    cats, ref_counts, cur_counts = col.category_counts
    n_ref, n_cur = float(ref_counts.sum()), float(cur_counts.sum())
    if n_ref == 0 or n_cur < MIN_ROWS:
        return DriftResult.skipped("not_enough_data", "empty categorical column", threshold)
    ref_p = np.maximum(ref_counts / n_ref, EPS)
    cur_p = cur_counts / n_cur
    w2 = float(np.sum((cur_p - ref_p) ** 2 / ref_p))
    n_eff = n_ref * n_cur / (n_ref + n_cur)
    statistic = n_eff * w2
    p = float(_chi2_sf(statistic, max(len(cats) - 1, 1)))
    return _decide(statistic, p, math.sqrt(w2), threshold)


DEFAULT_THRESHOLDS = {
    "ks": 0.05,
    "wasserstein": 0.1,
    "psi": 0.02,
    "js": 0.05,
    "chi_square": 0.1,
}


@hookimpl
def cyclone_register_drift_tests(register: Callable[[DriftTestSpec], None]) -> None:
    t = DEFAULT_THRESHOLDS
    register(DriftTestSpec("ks", ks, "numeric", t["ks"], "Kolmogorov-Smirnov D on the sketch"))
    register(
        DriftTestSpec(
            "wasserstein",
            wasserstein,
            "numeric",
            t["wasserstein"],
            "earth mover's distance divided by the reference std",
        )
    )
    register(DriftTestSpec("psi", psi, "numeric", t["psi"], "population stability index"))
    register(DriftTestSpec("js", js, "numeric", t["js"], "Jensen-Shannon distance"))
    register(
        DriftTestSpec(
            "chi_square", chi_square, "categorical", t["chi_square"], "chi-square, Cohen's w"
        )
    )
