"""The checks a rollout step must pass, each a statistical test rather than a raw difference.

Every check returns passed=True/False, or None when there is not enough data to judge (an
inconclusive check never fails a step; the step's deadline decides what happens then).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from cyclone.rollout_plan import AnalysisSpec, PromoteIf

from .ports import Calibrated, Rows


@dataclass(frozen=True)
class Counts:
    """Requests and failures one revision served over some period, and its p99 latency."""

    requests: int
    failures: int
    p99_ms: float | None = None


@dataclass(frozen=True)
class Check:
    name: str
    passed: bool | None
    reason: str
    numbers: dict[str, float] = field(default_factory=dict)


def numbers(checks: list[Check]) -> dict[str, float]:
    """Every check's numbers in one mapping (what a recorded step carries)."""
    out: dict[str, float] = {}
    for c in checks:
        out.update(c.numbers)
    return out


def _one_sided_p(diff: float, margin: float, se: float) -> float:
    """p-value of H1: the true difference exceeds `margin` (z-test; exact when there is no noise)."""
    if se == 0:
        return 0.0 if diff > margin else 1.0
    from scipy import stats as st  # lazy: the trainer imports this module at start, scipy ~1 s

    return float(st.norm.sf((diff - margin) / se))


def error_rate(champion: Counts, canary: Counts, spec: AnalysisSpec, min_requests: int) -> Check:
    """One-sided two-proportion z-test of H1: canary rate - champion rate > tolerated increase."""
    if canary.requests < max(min_requests, 1):
        return Check("error_rate", None, f"{canary.requests} canary requests < {min_requests}")
    pc = canary.failures / canary.requests
    ph = champion.failures / champion.requests if champion.requests else 0.0
    var = pc * (1 - pc) / canary.requests
    if champion.requests:
        var += ph * (1 - ph) / champion.requests
    margin = spec.max_error_rate_increase
    diff = pc - ph
    p = _one_sided_p(diff, margin, math.sqrt(var))
    numbers = {
        "canary_error_rate": pc,
        "champion_error_rate": ph,
        "canary_requests": float(canary.requests),
        "champion_requests": float(champion.requests),
        "error_rate_p_value": p,
    }
    if p < spec.significance:
        return Check(
            "error_rate",
            False,
            f"error rate {pc:.2%} vs champion {ph:.2%}: rise above {margin:.2%} is significant"
            f" (p={p:.3g})",
            numbers,
        )
    return Check("error_rate", True, f"error rate {pc:.2%} vs champion {ph:.2%}", numbers)


# A p99 over fewer calls is decided by the slowest one or two of them.
LATENCY_MIN_REQUESTS = 100


def latency(
    champion: Counts,
    canary: Counts,
    spec: AnalysisSpec,
    min_requests: int,
    window_requests: float | None = None,
) -> Check:
    """Canary p99 against the champion's. `window_requests`: about how many canary calls the
    p99s were computed over when they cover a recent window rather than the whole step."""
    if window_requests is not None and window_requests < LATENCY_MIN_REQUESTS:
        return Check(
            "latency",
            None,
            f"latency not judged: ~{window_requests:.0f} canary calls per latency window"
            f" (need {LATENCY_MIN_REQUESTS})",
        )
    if canary.requests < max(min_requests, LATENCY_MIN_REQUESTS) or canary.p99_ms is None:
        return Check(
            "latency",
            None,
            f"latency not judged: {canary.requests} canary requests"
            f" (need {max(min_requests, LATENCY_MIN_REQUESTS)})",
        )
    if champion.p99_ms is None or champion.p99_ms <= 0:
        return Check("latency", None, "no champion latency to compare with")
    ratio = canary.p99_ms / champion.p99_ms
    numbers = {"canary_p99_ms": canary.p99_ms, "champion_p99_ms": champion.p99_ms}
    numbers["p99_ratio"] = ratio
    slower_by = canary.p99_ms - champion.p99_ms
    if ratio > spec.max_p99_latency_ratio and slower_by > spec.min_p99_increase_ms:
        return Check(
            "latency",
            False,
            f"p99 {canary.p99_ms:.1f} ms is {ratio:.2f}x the champion's"
            f" (limit {spec.max_p99_latency_ratio:g}x and +{spec.min_p99_increase_ms:g} ms)",
            numbers,
        )
    return Check("latency", True, f"p99 ratio {ratio:.2f}", numbers)


def stability(health_failures: int, ejections: int, max_health_failures: int = 2) -> Check:
    """The canary's processes stayed up: the proxy's active health checks failed fewer than
    `max_health_failures` times (its own unhealthy threshold) and no host was ejected since
    the revision was first seen healthy. A replica that dies mid-rollout fails this even when
    retries hid every failed request from the callers."""
    numbers = {
        "canary_health_failures": float(health_failures),
        "canary_ejections": float(ejections),
    }
    if health_failures >= max_health_failures or ejections > 0:
        return Check(
            "stability",
            False,
            f"the canary went unhealthy: {health_failures} failed health checks,"
            f" {ejections} ejections",
            numbers,
        )
    return Check("stability", True, "the canary stayed healthy", numbers)


def resolve_metric(metric: str, task: str) -> str:
    if metric != "auto":
        return metric
    return "accuracy" if task == "classification" else "mae"


def _correct(rows: Rows) -> list[float]:
    return [
        1.0 if str(p) == str(y) else 0.0 for p, y in zip(rows.predictions, rows.labels, strict=True)
    ]


def _abs_errors(rows: Rows) -> list[float]:
    return [abs(float(p) - float(y)) for p, y in zip(rows.predictions, rows.labels, strict=True)]


def quality(champion: Rows, canary: Rows, metric: str, spec: AnalysisSpec) -> Check:
    """Canary vs champion on their own labelled rows: one-sided z-test of H1: canary worse by
    more than `max_quality_drop` (accuracy: two proportions; MAE: two means)."""
    champion, canary = champion.labelled(), canary.labelled()
    n_c, n_h = len(canary.labels), len(champion.labels)
    need = spec.min_labelled_rows
    if n_c < need or n_h < need:
        return Check(
            "quality",
            None,
            f"quality not judged: {n_c} labelled canary rows, {n_h} champion rows (need {need})",
            {"canary_labelled": float(n_c), "champion_labelled": float(n_h)},
        )
    if metric == "accuracy":
        xc, xh = _correct(canary), _correct(champion)
        worse = -1.0  # a drop in accuracy is worse
    else:
        xc, xh = _abs_errors(canary), _abs_errors(champion)
        worse = 1.0
    mc, mh = sum(xc) / n_c, sum(xh) / n_h
    vc = sum((x - mc) ** 2 for x in xc) / max(n_c - 1, 1)
    vh = sum((x - mh) ** 2 for x in xh) / max(n_h - 1, 1)
    diff = worse * (mc - mh)  # > 0: the canary is worse
    se = math.sqrt(vc / n_c + vh / n_h)
    margin = spec.max_quality_drop
    p = _one_sided_p(diff, margin, se)
    numbers = {
        f"canary_{metric}": mc,
        f"champion_{metric}": mh,
        "canary_labelled": float(n_c),
        "champion_labelled": float(n_h),
        "quality_p_value": p,
    }
    text = f"{metric} {mc:.4g} vs champion {mh:.4g}"
    if p < spec.significance:
        return Check("quality", False, f"{text}: worse beyond {margin:g} (p={p:.3g})", numbers)
    return Check("quality", True, text, numbers)


# The champion's quality, when judged on realized labels: its newest labelled rows (recent
# enough to reflect the world the challenger was trained for).
CHAMPION_RECENT_ROWS = 200


def expected_correct(rows: Rows, calibrated: Calibrated) -> np.ndarray | None:
    """Per row, the calibrated probability that the served answer is right (CBPE); None when
    the rows carry no probabilities in classes the calibration knows."""
    if rows.probabilities is None or not rows.predictions:
        return None
    served = [str(c) for c in rows.classes]
    if sorted(served) != sorted(calibrated.classes):
        return None
    order = [served.index(c) for c in calibrated.classes]
    probabilities = np.asarray(rows.probabilities, dtype=np.float64)[:, order]
    position = {c: i for i, c in enumerate(calibrated.classes)}
    predicted = [position.get(str(p), -1) for p in rows.predictions]
    if min(predicted) < 0:
        return None
    calibrated_p = calibrated.calibration.apply(probabilities)
    return np.asarray(calibrated_p[np.arange(len(predicted)), predicted], dtype=np.float64)


def estimated_quality(
    champion: Rows,
    candidate: Rows,
    champion_calibration: Calibrated | None,
    candidate_calibration: Calibrated | None,
    metric: str,
    spec: AnalysisSpec,
) -> Check:
    """Before labels: the candidate's accuracy as its own calibration expects it on its live
    rows, against the champion's -- realized on its newest labelled rows when it has enough
    (a calibration goes stale under concept shift; labels do not), else estimated the same
    way. Worse beyond `max_quality_drop` (one-sided z-test) fails; shown not worse by that
    margin (non-inferiority at the same significance) passes; anything else is inconclusive."""
    name = "estimated_quality"
    if metric != "accuracy":
        return Check(name, None, "estimates cover classifiers only: waiting for labels")
    if candidate_calibration is None:
        return Check(name, None, "the new version has no calibration: waiting for labels")
    need = spec.min_labelled_rows
    mine = expected_correct(candidate, candidate_calibration)
    if mine is None or len(mine) < need:
        n = 0 if mine is None else len(mine)
        return Check(name, None, f"{n} candidate rows with probabilities < {need}")
    recent = champion.labelled().newest(CHAMPION_RECENT_ROWS)
    if len(recent.labels) >= need:
        basis, theirs = "realized", np.asarray(_correct(recent), dtype=np.float64)
    elif champion_calibration is not None:
        basis, estimate = "estimated", expected_correct(champion, champion_calibration)
        if estimate is None or len(estimate) < need:
            return Check(name, None, "too few champion rows with probabilities to compare")
        theirs = estimate
    else:
        return Check(name, None, "the champion has neither labels nor a calibration to compare")
    mc, mh = float(mine.mean()), float(theirs.mean())
    se = math.sqrt(float(mine.var(ddof=1)) / len(mine) + float(theirs.var(ddof=1)) / len(theirs))
    diff = mh - mc  # > 0: the candidate is expected worse
    margin = spec.max_quality_drop
    p_worse = _one_sided_p(diff, margin, se)
    p_not_worse = _one_sided_p(-diff, -margin, se)  # H1: diff < margin
    numbers = {
        "candidate_estimated_accuracy": mc,
        f"champion_{basis}_accuracy": mh,
        "candidate_rows": float(len(mine)),
        "champion_rows": float(len(theirs)),
        "estimate_p_worse": p_worse,
        "estimate_p_not_worse": p_not_worse,
    }
    text = f"estimated accuracy {mc:.4g} vs champion {mh:.4g} ({basis})"
    if p_worse < spec.significance:
        return Check(name, False, f"{text}: worse beyond {margin:g} (p={p_worse:.3g})", numbers)
    if p_not_worse < spec.significance:
        return Check(name, True, f"{text}: not worse (p={p_not_worse:.3g})", numbers)
    return Check(name, None, f"{text}: inconclusive so far", numbers)


def pair(champion: Rows, challenger: Rows) -> tuple[list[Any], list[Any], list[Any]]:
    """Champion's labelled rows matched with the challenger's answer to the same input."""
    answers = dict(zip(challenger.keys, challenger.predictions, strict=True))
    labels: list[Any] = []
    champ: list[Any] = []
    chall: list[Any] = []
    for key, pred, label in zip(champion.keys, champion.predictions, champion.labels, strict=True):
        if label is None or key not in answers:
            continue
        labels.append(label)
        champ.append(pred)
        chall.append(answers[key])
    return labels, champ, chall


def paired(
    labels: Sequence[Any],
    champion: Sequence[Any],
    challenger: Sequence[Any],
    metric: str,
    spec: AnalysisSpec,
    promote_if: PromoteIf,
    min_pairs: int,
) -> Check:
    """Shadow: both versions answered the same requests. Accuracy: exact McNemar (binomial on
    the discordant pairs); MAE: one-sample t-test on the per-row difference of absolute errors."""
    from scipy import stats as st  # lazy, see _one_sided_p

    n = len(labels)
    if n < min_pairs:
        return Check("paired", None, f"{n} paired labelled rows < {min_pairs}", {"pairs": float(n)})
    alpha = spec.significance
    if metric == "accuracy":
        h = [str(p) == str(y) for p, y in zip(champion, labels, strict=True)]
        c = [str(p) == str(y) for p, y in zip(challenger, labels, strict=True)]
        champ_only = sum(1 for a, b in zip(h, c, strict=True) if a and not b)
        chall_only = sum(1 for a, b in zip(h, c, strict=True) if b and not a)
        discordant = champ_only + chall_only
        p_worse = (
            float(st.binomtest(champ_only, discordant, 0.5, alternative="greater").pvalue)
            if discordant
            else 1.0
        )
        p_better = (
            float(st.binomtest(chall_only, discordant, 0.5, alternative="greater").pvalue)
            if discordant
            else 1.0
        )
        numbers = {
            "pairs": float(n),
            "champion_accuracy": sum(h) / n,
            "challenger_accuracy": sum(c) / n,
            "champion_only_right": float(champ_only),
            "challenger_only_right": float(chall_only),
        }
    else:
        d = [
            abs(float(b) - float(y)) - abs(float(a) - float(y))
            for a, b, y in zip(champion, challenger, labels, strict=True)
        ]
        mean = sum(d) / n
        sd = math.sqrt(sum((x - mean) ** 2 for x in d) / max(n - 1, 1))
        if sd == 0:
            p_worse = 0.0 if mean > spec.max_quality_drop else 1.0
            p_better = 0.0 if mean < 0 else 1.0
        else:
            se = sd / math.sqrt(n)
            p_worse = float(st.t.sf((mean - spec.max_quality_drop) / se, n - 1))
            p_better = float(st.t.cdf(mean / se, n - 1))
        numbers = {"pairs": float(n), "mae_difference": mean}
    numbers["p_worse"] = p_worse
    numbers["p_better"] = p_better
    if p_worse < alpha:
        return Check(
            "paired", False, f"challenger is worse on {n} paired rows (p={p_worse:.3g})", numbers
        )
    if promote_if == "better" and p_better >= alpha:
        return Check(
            "paired",
            False,
            f"challenger is not shown better on {n} paired rows (p={p_better:.3g})",
            numbers,
        )
    return Check("paired", True, f"challenger is not worse on {n} paired rows", numbers)
