"""Monitoring windows: the store's columnar chunks → one `Window` of numpy columns."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np

from cyclone.plugin_api import Window
from cyclone.store.v1 import store_service_pb2 as store_pb


def window_from_chunks(chunks: Iterable[store_pb.GetTrainingDataResponse], task: str) -> Window:
    """Concatenate chunks; unlabelled rows get NaN (regression) or None (classification) labels."""
    features: dict[str, list[Any]] = {}
    kinds: dict[str, str] = {}
    predictions: list[Any] = []
    labels: list[Any] = []
    labelled: list[bool] = []
    probabilities: list[float] = []
    class_labels: list[str] = []
    for chunk in chunks:
        for name, column in chunk.features.items():
            if column.strings:
                kinds[name] = "categorical"
                features.setdefault(name, []).extend(column.strings)
            else:
                kinds.setdefault(name, "numeric")
                features.setdefault(name, []).extend(column.numbers)
        if task == "classification":
            predictions.extend(chunk.predictions.strings)
            labels.extend(chunk.labels.strings)
            class_labels = list(chunk.class_labels) or class_labels
            probabilities.extend(chunk.probabilities)
        else:
            predictions.extend(chunk.predictions.numbers)
            labels.extend(chunk.labels.numbers)
        labelled.extend(chunk.labelled)
    mask = np.asarray(labelled, dtype=bool)
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
        )
    values = np.asarray(labels, dtype=np.float64)
    values[~mask] = np.nan
    return Window(
        features=columns,
        predictions=np.asarray(predictions, dtype=np.float64),
        labels=values,
        task="regression",
    )
