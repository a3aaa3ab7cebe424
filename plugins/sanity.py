"""Prediction sanity checks that need no labels.

For classification the numeric "prediction" is the probability of the positive class
(binary) or of the predicted class (multiclass); for regression it is the predicted value.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import numpy.typing as npt

from cyclone.hookspecs import hookimpl
from cyclone.plugin_api import (
    CategoricalProfile,
    MetricContext,
    MetricResult,
    MetricSpec,
    NumericProfile,
    Window,
)

FloatArray = npt.NDArray[np.float64]
PROBABILITY_SUM_TOLERANCE = 1e-3
# constant_predictions: the fewest identical predictions that can mean a stuck model, and how
# unlikely they must be under the reference's class shares.
STUCK_MIN_ROWS = 20
STUCK_CHANCE = 1e-3


def numeric_predictions(window: Window) -> FloatArray | None:
    if window.task == "classification" or window.predictions.dtype.kind not in "fiub":
        probs = window.probabilities
        if probs is None or probs.ndim != 2 or probs.shape[1] == 0:
            return None
        return probs[:, 1] if probs.shape[1] == 2 else probs.max(axis=1)
    return np.asarray(window.predictions, dtype=np.float64)


def _finite(window: Window) -> FloatArray | MetricResult:
    x = numeric_predictions(window)
    if x is None:
        return MetricResult.not_enough_data("no numeric predictions or probabilities")
    x = x[np.isfinite(x)]
    if len(x) == 0:
        return MetricResult.not_enough_data("no finite predictions in the window")
    return x


def _stat(kind: str) -> Callable[[Window, MetricContext], MetricResult]:
    def fn(window: Window, ctx: MetricContext) -> MetricResult:
        x = _finite(window)
        if isinstance(x, MetricResult):
            return x
        if kind == "min":
            return MetricResult.ok(float(x.min()))
        if kind == "max":
            return MetricResult.ok(float(x.max()))
        if kind == "mean":
            return MetricResult.ok(float(x.mean()))
        return MetricResult.ok(float(np.quantile(x, int(kind[1:]) / 100)))

    return fn


def invalid_probability_rate(window: Window, ctx: MetricContext) -> MetricResult:
    probs = window.probabilities
    if probs is None or len(probs) == 0:
        return MetricResult.not_enough_data("window has no probabilities")
    tol = float(ctx.params.get("tolerance", PROBABILITY_SUM_TOLERANCE))
    out_of_bounds = ((probs < 0) | (probs > 1) | ~np.isfinite(probs)).any(axis=1)
    bad_sum = np.abs(probs.sum(axis=1) - 1.0) > tol
    return MetricResult.ok(float(np.mean(out_of_bounds | bad_sum)))


def constant_predictions(window: Window, ctx: MetricContext) -> MetricResult:
    """1.0 when every prediction in the window is the same (a stuck model), else 0.0.

    Identical predictions are evidence only when a working model would almost surely have
    varied: at least `STUCK_MIN_ROWS` of them, and for a classifier whose reference profile
    knows its class shares, its most frequent class alone that often must be rarer than
    `STUCK_CHANCE` (three "0"s from a model that says "0" 90 % of the time are normal).
    """
    if window.n_rows < 2:
        return MetricResult.not_enough_data("need at least two predictions")
    x = numeric_predictions(window)
    if x is None or window.task == "classification":
        codes = window.prediction_codes
        same = bool(codes.min() == codes.max())
    else:
        same = bool(np.nanmin(x) == np.nanmax(x))
    if not same:
        return MetricResult.ok(0.0)
    if window.n_rows < STUCK_MIN_ROWS:
        return MetricResult.not_enough_data(
            f"{window.n_rows} identical predictions; need {STUCK_MIN_ROWS} to call the model stuck"
        )
    ref = ctx.reference.prediction if ctx.reference is not None else None
    if window.task == "classification" and isinstance(ref, CategoricalProfile) and ref.count:
        share = max(ref.frequencies.values(), default=0) / ref.count
        if share**window.n_rows > STUCK_CHANCE:
            return MetricResult.not_enough_data(
                f"{window.n_rows} identical predictions are not unusual for a model whose most"
                f" frequent class is {share:.0%} of its reference predictions"
            )
    return MetricResult.ok(1.0)


def out_of_training_range_rate(window: Window, ctx: MetricContext) -> MetricResult:
    ref = ctx.reference.prediction if ctx.reference is not None else None
    if not isinstance(ref, NumericProfile) or ref.count == 0:
        return MetricResult.not_enough_data("no numeric prediction profile in the reference")
    x = _finite(window)
    if isinstance(x, MetricResult):
        return x
    return MetricResult.ok(float(np.mean((x < ref.min) | (x > ref.max))))


@hookimpl
def cyclone_register_metrics(register: Callable[[MetricSpec], None]) -> None:
    for kind in ("min", "mean", "max", "p05", "p50", "p95"):
        register(
            MetricSpec(f"prediction_{kind}", _stat(kind), False, "any", f"{kind} of predictions")
        )
    register(
        MetricSpec(
            "invalid_probability_rate",
            invalid_probability_rate,
            False,
            "classification",
            "share of rows with a probability outside [0, 1] or not summing to 1",
            higher_is_better=False,
        )
    )
    register(
        MetricSpec(
            "constant_predictions",
            constant_predictions,
            False,
            "any",
            "1 when the whole window has a single prediction value",
            higher_is_better=False,
        )
    )
    register(
        MetricSpec(
            "prediction_out_of_range_rate",
            out_of_training_range_rate,
            False,
            "any",
            "share of predictions outside the training prediction range",
            higher_is_better=False,
        )
    )
