"""Monitoring windows: columnar `WindowChunk`s → one `Window` of numpy columns."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np

from cyclone.plugin_api import Window
from services.monitor.records import WindowChunk


def window_from_chunks(chunks: Iterable[WindowChunk], task: str) -> Window:
    """Concatenate chunks; unlabelled rows get NaN (regression) or None (classification) labels."""
    features: dict[str, list[Any]] = {}
    kinds: dict[str, str] = {}
    predictions: list[Any] = []
    labels: list[Any] = []
    labelled: list[bool] = []
    probabilities: list[float] = []
    class_labels: list[str] = []
    latency: list[float] = []
    created: list[int] = []
    # Latencies and times only when every chunk has them for every row.
    complete = True
    for chunk in chunks:
        for name, column in chunk.features.items():
            if name in chunk.categorical:
                kinds[name] = "categorical"
            else:
                kinds.setdefault(name, "numeric")
            features.setdefault(name, []).extend(column)
        predictions.extend(chunk.predictions)
        labels.extend(chunk.labels)
        if task == "classification":
            class_labels = list(chunk.class_labels) or class_labels
            probabilities.extend(chunk.probabilities)
        labelled.extend(chunk.labelled)
        n = len(chunk.predictions)
        complete = complete and len(chunk.latency_ms) == n and len(chunk.created_at_micros) == n
        latency.extend(chunk.latency_ms)
        created.extend(chunk.created_at_micros)
    mask = np.asarray(labelled, dtype=bool)
    operations: dict[str, Any] = {}
    if complete and predictions:
        operations = {
            "latency_ms": np.asarray(latency, dtype=np.float64),
            "created_at": np.asarray(created, dtype=np.float64) / 1e6,
        }
    columns = {
        name: np.asarray(values, dtype=object if kinds[name] == "categorical" else np.float64)
        for name, values in features.items()
    }
    if task == "classification":
        label_array = np.asarray(labels, dtype=object)
        label_array[~mask] = None
        k = len(class_labels)
        probs = (
            np.asarray(probabilities, dtype=np.float64).reshape(-1, k)
            if k and probabilities
            else None
        )
        return Window(
            features=columns,
            predictions=np.asarray(predictions, dtype=object),
            probabilities=probs,
            class_labels=class_labels,
            labels=label_array,
            task="classification",
            **operations,
        )
    values = np.asarray(labels, dtype=np.float64)
    values[~mask] = np.nan
    return Window(
        features=columns,
        predictions=np.asarray(predictions, dtype=np.float64),
        labels=values,
        task="regression",
        **operations,
    )
