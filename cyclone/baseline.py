"""A model version's reference profile and baseline metrics, computed at registration.

The monitor compares live windows against both: drift tests against the profile's
distributions, `relative_drop` triggers against the baseline metric values. With labelled rows
the profile also gets what estimating performance without labels needs: a probability
calibration (classifiers) or an error-by-prediction table (regressors).

Calibrate on rows the model was not fitted on (a holdout): on its own training rows a flexible
model looks better calibrated than it is, and the estimates come out optimistic.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import numpy as np
import pandas as pd

from cyclone.models.schema import MISSING_CATEGORY, ModelSchema
from cyclone.plugin_api import MetricContext, ReferenceProfile, Window
from cyclone.plugins import metrics
from cyclone.reference import Calibration, ErrorProfile, build_profile
from cyclone.reference import FeatureSchema as ProfileFeature

log = logging.getLogger(__name__)

# Fewer labelled rows than this give a calibration too noisy to estimate from.
MIN_CALIBRATION_ROWS = 50
# Knots kept per calibration map (isotonic fits can have one per distinct score).
MAX_KNOTS = 256
ERROR_BINS = 20


def window_from_frame(
    schema: ModelSchema,
    frame: pd.DataFrame,
    predictions: np.ndarray,
    probabilities: np.ndarray | None,
    labels: np.ndarray | None,
) -> Window:
    features: dict[str, np.ndarray] = {}
    for f in schema.features:
        column = frame[f.name]
        if f.kind == "categorical" and f.allow_missing:
            # As served and logged: a missing category is the marker, not "nan".
            column = column.where(column.notna(), MISSING_CATEGORY)
        features[f.name] = (
            column.astype(str).to_numpy(dtype=object)
            if f.kind == "categorical"
            else pd.to_numeric(column, errors="coerce").to_numpy(dtype=np.float64)
        )
    if schema.task == "classification":
        return Window(
            features=features,
            predictions=np.asarray(predictions).astype(str).astype(object),
            probabilities=probabilities,
            class_labels=list(schema.class_labels),
            labels=None if labels is None else np.asarray(labels).astype(str).astype(object),
            task="classification",
        )
    return Window(
        features=features,
        predictions=np.asarray(predictions, dtype=np.float64),
        labels=None if labels is None else np.asarray(labels, dtype=np.float64),
        task="regression",
    )


def reference_profile(schema: ModelSchema, window: Window) -> ReferenceProfile:
    declared = {
        f.name: ProfileFeature(f.name, f.kind, f.min, f.max, f.categories or None)
        for f in schema.features
    }
    profile = build_profile(
        window.features,
        predictions=window.predictions,
        schema=declared,
        task=schema.task,
        class_labels=list(schema.class_labels),
    )
    return dataclasses.replace(
        profile,
        calibration=fit_calibration(window),
        error_profile=fit_error_profile(window),
    )


def fit_calibration(window: Window, source: str = "reference sample") -> Calibration | None:
    """Isotonic maps from predicted probability to observed frequency on the labelled rows;
    None without enough labelled rows with probabilities."""
    from sklearn.isotonic import IsotonicRegression

    if window.task != "classification" or window.probabilities is None:
        return None
    w = window.labelled
    probs = w.probabilities
    k = len(w.class_labels)
    if probs is None or k < 2 or probs.shape[1] != k:
        return None
    usable = np.isfinite(probs).all(axis=1) & (w.label_codes >= 0)
    if int(usable.sum()) < MIN_CALIBRATION_ROWS:
        return None
    probs, codes = probs[usable], w.label_codes[usable]
    classes = (1,) if k == 2 else tuple(range(k))
    maps = []
    for c in classes:
        iso = IsotonicRegression(y_min=0.0, y_max=1.0, out_of_bounds="clip")
        iso.fit(probs[:, c], (codes == c).astype(np.float64))
        x = np.asarray(iso.X_thresholds_, dtype=np.float64)
        y = np.asarray(iso.y_thresholds_, dtype=np.float64)
        if len(x) > MAX_KNOTS:
            keep = np.unique(np.linspace(0, len(x) - 1, MAX_KNOTS).round().astype(int))
            x, y = x[keep], y[keep]
        maps.append((tuple(float(v) for v in x), tuple(float(v) for v in y)))
    return Calibration(tuple(maps), int(usable.sum()), source)


def fit_error_profile(window: Window) -> ErrorProfile | None:
    """Mean |error| per quantile bin of the prediction on the labelled rows (regression)."""
    if window.task != "regression":
        return None
    w = window.labelled
    predictions = np.asarray(w.predictions, dtype=np.float64)
    errors = np.abs(np.asarray(w.labels, dtype=np.float64) - predictions)
    finite = np.isfinite(predictions) & np.isfinite(errors)
    if int(finite.sum()) < MIN_CALIBRATION_ROWS:
        return None
    predictions, errors = predictions[finite], errors[finite]
    n_bins = max(1, min(ERROR_BINS, len(predictions) // 25))
    edges = np.unique(np.quantile(predictions, np.linspace(0.0, 1.0, n_bins + 1)))
    if len(edges) < 2:
        edges = np.array([edges[0], edges[0]])
    idx = np.searchsorted(edges[1:-1], predictions, side="right")
    sums = np.bincount(idx, weights=errors, minlength=len(edges) - 1)
    counts = np.bincount(idx, minlength=len(edges) - 1)
    # An empty bin (ties collapsed) takes the overall mean error.
    means = np.divide(sums, counts, out=np.full(len(sums), errors.mean()), where=counts > 0)
    return ErrorProfile(
        tuple(float(e) for e in edges), tuple(float(m) for m in means), len(predictions)
    )


def baseline_metrics(window: Window, reference: ReferenceProfile | None) -> dict[str, float]:
    """Every registered metric that applies to the task and has a value on `window`."""
    values: dict[str, float] = {}
    context = MetricContext(reference=reference)
    for name, spec in metrics().items():
        if spec.task not in ("any", window.task):
            continue
        if spec.needs_labels and window.labels is None:
            continue
        try:
            result = spec.fn(window, context)
        except Exception as exc:
            log.warning("baseline metric %s failed: %s", name, exc)
            continue
        if result.value is not None:
            values[name] = result.value
    return values


def evaluation_record(
    window: Window, reference: ReferenceProfile | None, source: str
) -> dict[str, Any]:
    return {"metrics": baseline_metrics(window, reference), "rows": window.n_rows, "source": source}
