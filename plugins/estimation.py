"""Performance estimated without labels (confidence-based performance estimation, CBPE).

With calibrated probabilities a classifier's expected confusion matrix follows from its
predicted probabilities alone: a row predicted as class c with calibrated probability q of being
c adds q to the true positives of c and 1 - q to its false positives. The calibration is fitted
on the version's labelled reference rows (``cyclone.baseline``) and kept in its reference
profile; a version without one gets ``not_enough_data``.

Every estimate comes with a 95 % band: the range the realized value over the same rows should
fall in if the calibration still holds (sampling only). It is in the result's detail, and
``params: {bound: lower}`` (or ``upper``) makes the metric return that edge instead, so a
trigger can act on it. Estimates go wrong when the relation between inputs and labels changes
(concept shift): only labels show that -- see docs/monitoring.md.

For regressors ``estimated_mae`` averages the reference's mean |error| per prediction bin over
the window: an honest estimate only of how a changed prediction mix changes the error.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Final

import numpy as np
import numpy.typing as npt

from cyclone.hookspecs import hookimpl
from cyclone.plugin_api import MetricContext, MetricResult, MetricSpec, Window

FloatArray = npt.NDArray[np.float64]
Z95: Final = 1.959963984540054
BOUNDS: Final = ("estimate", "lower", "upper")


def _calibrated(window: Window, ctx: MetricContext) -> tuple[FloatArray, FloatArray] | MetricResult:
    """(raw, calibrated) probabilities of the rows that have finite ones."""
    if window.probabilities is None:
        return MetricResult.not_enough_data("window has no probabilities")
    calibration = None if ctx.reference is None else ctx.reference.calibration
    if calibration is None:
        return MetricResult.not_enough_data(
            "no calibration for this version (imported without labelled rows, or before "
            "estimation existed)"
        )
    raw = window.probabilities
    finite = np.isfinite(raw).all(axis=1)
    if not finite.any():
        return MetricResult.not_enough_data("no rows with probabilities")
    raw = raw[finite] if not finite.all() else raw
    try:
        return raw, calibration.apply(raw)
    except ValueError as exc:
        return MetricResult.error(str(exc))


def _result(value: float, se: float, n: int, ctx: MetricContext) -> MetricResult:
    bound = str(ctx.params.get("bound", "estimate"))
    if bound not in BOUNDS:
        return MetricResult.error(f"params.bound: expected one of {list(BOUNDS)}, got {bound!r}")
    low, high = max(0.0, value - Z95 * se), min(1.0, value + Z95 * se)
    detail = f"estimate {value:.4f}, 95% band [{low:.4f}, {high:.4f}] over {n} rows"
    chosen = {"estimate": value, "lower": low, "upper": high}[bound]
    return MetricResult.ok(chosen, detail)


def _predicted(window: Window, finite: int) -> npt.NDArray[np.intp]:
    codes = window.prediction_codes
    if window.probabilities is not None and finite != len(codes):
        codes = codes[np.isfinite(window.probabilities).all(axis=1)]
    return codes


def estimated_accuracy(window: Window, ctx: MetricContext) -> MetricResult:
    got = _calibrated(window, ctx)
    if isinstance(got, MetricResult):
        return got
    _, q = got
    predicted = _predicted(window, len(q))
    # A prediction outside the classes is never right.
    correct = np.where(predicted >= 0, q[np.arange(len(q)), np.clip(predicted, 0, None)], 0.0)
    n = len(correct)
    # The realized accuracy is a sum of independent Bernoulli(correct) over n: exact variance.
    se = math.sqrt(float(np.sum(correct * (1.0 - correct)))) / n
    return _result(float(correct.mean()), se, n, ctx)


def _positive(window: Window, ctx: MetricContext) -> int:
    label = ctx.params.get("positive_label")
    return 1 if label is None else window.class_labels.index(str(label))


def estimated_f1(window: Window, ctx: MetricContext) -> MetricResult:
    got = _calibrated(window, ctx)
    if isinstance(got, MetricResult):
        return got
    _, q = got
    k = q.shape[1]
    predicted = _predicted(window, len(q))
    average = str(ctx.params.get("average", "auto"))
    if average not in ("auto", "binary", "macro"):
        return MetricResult.error(
            f"params.average: expected auto, binary or macro, got {average!r}"
        )
    if average == "binary" and k != 2:
        return MetricResult.error(f"binary f1 needs exactly two classes, got {k}")
    binary = average == "binary" or (average == "auto" and k == 2)
    classes = [_positive(window, ctx)] if binary else list(range(k))
    values, variances = [], []
    for c in classes:
        is_c = predicted == c
        a_mean, a_var = _bernoulli_sum(q[is_c, c])  # true positives
        b_mean, b_var = _bernoulli_sum(q[~is_c, c])  # false negatives
        n_pred = float(is_c.sum())
        denom = n_pred + a_mean + b_mean  # 2TP + FP + FN
        if denom <= 0:
            values.append(0.0)
            variances.append(0.0)
            continue
        values.append(2 * a_mean / denom)
        # Delta method on F1 = 2A / (n_pred + A + B), A and B independent.
        d_a, d_b = 2 * (n_pred + b_mean) / denom**2, -2 * a_mean / denom**2
        variances.append(d_a**2 * a_var + d_b**2 * b_var)
    value = float(np.mean(values))
    # Classes treated as independent: an approximation for the macro average.
    se = math.sqrt(sum(variances)) / len(classes)
    return _result(value, se, len(q), ctx)


def _bernoulli_sum(p: FloatArray) -> tuple[float, float]:
    return float(p.sum()), float(np.sum(p * (1.0 - p)))


def _expected_auc(scores: FloatArray, q_pos: FloatArray) -> tuple[float, float, float]:
    """Expected ROC AUC when row i is positive with probability q_pos[i], ranked by scores;
    also the expected numbers of positives and negatives. Tied scores share a trapezoid."""
    _, inverse = np.unique(-scores, return_inverse=True)  # groups in descending score order
    tp = np.bincount(inverse, weights=q_pos)
    fp = np.bincount(inverse, weights=1.0 - q_pos)
    n_pos, n_neg = float(tp.sum()), float(fp.sum())
    if n_pos <= 0 or n_neg <= 0:
        return math.nan, n_pos, n_neg
    tpr = np.concatenate(([0.0], np.cumsum(tp))) / n_pos
    fpr = np.concatenate(([0.0], np.cumsum(fp))) / n_neg
    auc = float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2.0))
    return auc, n_pos, n_neg


def _hanley_mcneil_se(auc: float, n_pos: float, n_neg: float) -> float:
    q1, q2 = auc / (2 - auc), 2 * auc**2 / (1 + auc)
    var = (auc * (1 - auc) + (n_pos - 1) * (q1 - auc**2) + (n_neg - 1) * (q2 - auc**2)) / (
        n_pos * n_neg
    )
    return math.sqrt(max(var, 0.0))


def estimated_roc_auc(window: Window, ctx: MetricContext) -> MetricResult:
    got = _calibrated(window, ctx)
    if isinstance(got, MetricResult):
        return got
    raw, q = got
    k = q.shape[1]
    classes = [_positive(window, ctx)] if k == 2 else list(range(k))
    aucs, ses = [], []
    for c in classes:
        auc, n_pos, n_neg = _expected_auc(raw[:, c], q[:, c])
        if not math.isfinite(auc):
            return MetricResult.not_enough_data(
                f"expected positives or negatives of class {window.class_labels[c]!r} are zero"
            )
        aucs.append(auc)
        ses.append(_hanley_mcneil_se(auc, n_pos, n_neg))
    se = math.sqrt(sum(s**2 for s in ses)) / len(ses)
    return _result(float(np.mean(aucs)), se, len(q), ctx)


def estimated_mae(window: Window, ctx: MetricContext) -> MetricResult:
    profile = None if ctx.reference is None else ctx.reference.error_profile
    if profile is None:
        return MetricResult.not_enough_data(
            "no error profile for this version (imported without labelled rows, or before "
            "estimation existed)"
        )
    predictions = np.asarray(window.predictions, dtype=np.float64)
    predictions = predictions[np.isfinite(predictions)]
    if len(predictions) == 0:
        return MetricResult.not_enough_data("no finite predictions")
    expected = profile.expected_abs_error(predictions)
    value = float(expected.mean())
    outside = float(np.mean((predictions < profile.edges[0]) | (predictions > profile.edges[-1])))
    detail = (
        f"reference mean |error| per prediction bin, averaged over {len(predictions)} rows; "
        f"{outside:.1%} of predictions outside the reference range (they get the end bins' "
        "error, likely too low); no band: it does not see errors that change at the same "
        "prediction"
    )
    return MetricResult.ok(value, detail)


_CLS: Final = "classification"


@hookimpl
def cyclone_register_metrics(register: Callable[[MetricSpec], None]) -> None:
    specs: list[tuple[str, Callable[[Window, MetricContext], MetricResult], str]] = [
        ("estimated_accuracy", estimated_accuracy, "accuracy"),
        ("estimated_f1", estimated_f1, "f1 (params: average, positive_label)"),
        ("estimated_roc_auc", estimated_roc_auc, "ROC AUC (one-vs-rest macro)"),
    ]
    for name, fn, what in specs:
        register(
            MetricSpec(
                name,
                fn,
                False,
                _CLS,
                f"{what} estimated from calibrated probabilities, without labels; "
                "params.bound: estimate|lower|upper of its 95% band",
            )
        )
    register(
        MetricSpec(
            "estimated_mae",
            estimated_mae,
            False,
            "regression",
            "mean absolute error expected from the reference's error per prediction bin",
            higher_is_better=False,
        )
    )
