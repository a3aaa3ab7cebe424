"""Regression metrics over the labelled rows of a window."""

from __future__ import annotations

from collections.abc import Callable
from typing import Final

import numpy as np
import numpy.typing as npt

from cyclone.hookspecs import hookimpl
from cyclone.plugin_api import MetricContext, MetricResult, MetricSpec, Window

FloatArray = npt.NDArray[np.float64]


def _pairs(window: Window) -> tuple[FloatArray, FloatArray] | MetricResult:
    w = window.labelled
    if w.n_rows == 0 or w.labels is None:
        return MetricResult.not_enough_data("no labelled rows")
    y = np.asarray(w.labels, dtype=np.float64)
    pred = np.asarray(w.predictions, dtype=np.float64)
    return y, pred


def mae(window: Window, ctx: MetricContext) -> MetricResult:
    got = _pairs(window)
    if isinstance(got, MetricResult):
        return got
    y, pred = got
    return MetricResult.ok(float(np.mean(np.abs(y - pred))))


def rmse(window: Window, ctx: MetricContext) -> MetricResult:
    got = _pairs(window)
    if isinstance(got, MetricResult):
        return got
    y, pred = got
    diff = y - pred
    return MetricResult.ok(float(np.sqrt(np.dot(diff, diff) / len(diff))))


def mape(window: Window, ctx: MetricContext) -> MetricResult:
    got = _pairs(window)
    if isinstance(got, MetricResult):
        return got
    y, pred = got
    # Same guard as sklearn: tiny true values are floored at machine epsilon.
    denom = np.maximum(np.abs(y), np.finfo(np.float64).eps)
    return MetricResult.ok(float(np.mean(np.abs(y - pred) / denom)))


def r2(window: Window, ctx: MetricContext) -> MetricResult:
    got = _pairs(window)
    if isinstance(got, MetricResult):
        return got
    y, pred = got
    if len(y) < 2:
        return MetricResult.not_enough_data("R2 needs at least two labelled rows")
    centred = y - y.mean()
    total = float(np.dot(centred, centred))
    if total == 0.0:
        return MetricResult.not_enough_data("labels are constant; R2 is undefined")
    diff = y - pred
    return MetricResult.ok(1.0 - float(np.dot(diff, diff)) / total)


_REG: Final = "regression"


@hookimpl
def cyclone_register_metrics(register: Callable[[MetricSpec], None]) -> None:
    register(MetricSpec("mae", mae, True, _REG, "mean absolute error", higher_is_better=False))
    register(
        MetricSpec("rmse", rmse, True, _REG, "root mean squared error", higher_is_better=False)
    )
    register(
        MetricSpec(
            "mape", mape, True, _REG, "mean absolute percentage error", higher_is_better=False
        )
    )
    register(MetricSpec("r2", r2, True, _REG, "coefficient of determination"))
