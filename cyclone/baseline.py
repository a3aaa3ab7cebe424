"""A model version's reference profile and baseline metrics, computed at registration.

The monitor compares live windows against both: drift tests against the profile's
distributions, `relative_drop` triggers against the baseline metric values.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import pandas as pd

from cyclone.models.schema import ModelSchema
from cyclone.plugin_api import MetricContext, ReferenceProfile, Window
from cyclone.plugins import metrics
from cyclone.reference import FeatureSchema as ProfileFeature
from cyclone.reference import build_profile

log = logging.getLogger(__name__)


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
    return build_profile(
        window.features,
        predictions=window.predictions,
        schema=declared,
        task=schema.task,
        class_labels=list(schema.class_labels),
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
