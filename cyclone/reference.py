"""Reference profiles: the training-time summary that drift and sanity checks compare against.

A profile is built once, when a model version is trained or imported, and stored as JSON in the
registry and next to the model (``reference.json``). Monitoring never rescans training data: every
drift test works from the quantile edges and histogram counts kept here, or, for a numeric column
with few distinct values (0/1 flags, small counts), from its exact value frequencies: quantile
edges of such a column collapse onto its values and would hide a change in their rates.

Profiles without value frequencies (written before they existed) load as continuous columns.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
import pandas as pd

FeatureKind = Literal["numeric", "categorical"]
PROFILE_FORMAT = 1
DEFAULT_QUANTILES = 100
# A numeric column is discrete when it takes at most this many distinct values, each seen
# DISCRETE_MIN_REPEATS times on average (so a short continuous sample never looks discrete).
DISCRETE_MAX_VALUES = 20
DISCRETE_MIN_REPEATS = 5


@dataclass(frozen=True)
class FeatureSchema:
    """What the model accepts for one input, from ``model.yaml``."""

    name: str
    kind: FeatureKind
    min: float | None = None
    max: float | None = None
    categories: tuple[str, ...] | None = None


@dataclass(frozen=True)
class NumericProfile:
    """Quantile sketch of a numeric column.

    ``edges`` are the reference quantiles (deduplicated, so ties collapse) and ``counts[i]`` is the
    number of reference values in ``[edges[i], edges[i+1])`` (the last bin is closed).
    A discrete column also keeps its distinct ``values`` (sorted) and ``value_counts``; drift
    tests then compare value frequencies instead of quantile bins.
    """

    edges: tuple[float, ...]
    counts: tuple[int, ...]
    mean: float
    std: float
    min: float
    max: float
    count: int
    missing_rate: float
    kind: Literal["numeric"] = "numeric"
    values: tuple[float, ...] = ()
    value_counts: tuple[int, ...] = ()

    @property
    def discrete(self) -> bool:
        return bool(self.values)

    @property
    def probabilities(self) -> npt.NDArray[np.float64]:
        counts = np.asarray(self.counts, dtype=np.float64)
        total = counts.sum()
        return counts / total if total > 0 else counts


@dataclass(frozen=True)
class CategoricalProfile:
    """Category frequencies (counts) of a categorical column."""

    frequencies: dict[str, int]
    count: int
    missing_rate: float
    kind: Literal["categorical"] = "categorical"


ColumnProfile = NumericProfile | CategoricalProfile


@dataclass(frozen=True)
class ReferenceProfile:
    """Everything monitoring needs to know about the training data of one model version."""

    features: dict[str, ColumnProfile]
    schema: dict[str, FeatureSchema] = field(default_factory=dict)
    prediction: ColumnProfile | None = None
    task: str = "any"
    class_labels: tuple[str, ...] = ()
    n_rows: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": PROFILE_FORMAT,
            "task": self.task,
            "class_labels": list(self.class_labels),
            "n_rows": self.n_rows,
            "features": {k: _column_to_dict(v) for k, v in self.features.items()},
            "schema": {k: _schema_to_dict(v) for k, v in self.schema.items()},
            "prediction": None if self.prediction is None else _column_to_dict(self.prediction),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ReferenceProfile:
        if data.get("format") != PROFILE_FORMAT:
            raise ValueError(f"unsupported reference profile format: {data.get('format')!r}")
        prediction = data.get("prediction")
        return cls(
            features={k: _column_from_dict(v) for k, v in data["features"].items()},
            schema={k: _schema_from_dict(v) for k, v in data.get("schema", {}).items()},
            prediction=None if prediction is None else _column_from_dict(prediction),
            task=str(data.get("task", "any")),
            class_labels=tuple(data.get("class_labels", ())),
            n_rows=int(data.get("n_rows", 0)),
        )

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> ReferenceProfile:
        return cls.from_dict(json.loads(text))

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json(), encoding="utf-8")

    @classmethod
    def load(cls, path: str | Path) -> ReferenceProfile:
        return cls.from_json(Path(path).read_text(encoding="utf-8"))


def build_profile(
    features: Mapping[str, npt.ArrayLike],
    *,
    predictions: npt.ArrayLike | None = None,
    schema: Mapping[str, FeatureSchema] | None = None,
    task: str = "any",
    class_labels: Sequence[str] = (),
    n_quantiles: int = DEFAULT_QUANTILES,
) -> ReferenceProfile:
    """Summarise training columns; columns are numeric unless the schema or dtype says otherwise."""
    schema = dict(schema or {})
    profiles: dict[str, ColumnProfile] = {}
    n_rows = 0
    for name, raw in features.items():
        values = np.asarray(raw)
        n_rows = max(n_rows, len(values))
        declared = schema.get(name)
        kind = declared.kind if declared else _infer_kind(values)
        profiles[name] = (
            profile_numeric(values, n_quantiles)
            if kind == "numeric"
            else profile_categorical(values)
        )
    prediction: ColumnProfile | None = None
    if predictions is not None:
        pred = np.asarray(predictions)
        prediction = (
            profile_categorical(pred)
            if task == "classification" or _infer_kind(pred) == "categorical"
            else profile_numeric(pred, n_quantiles)
        )
    return ReferenceProfile(
        features=profiles,
        schema=schema,
        prediction=prediction,
        task=task,
        class_labels=tuple(str(c) for c in class_labels),
        n_rows=n_rows,
    )


def profile_numeric(values: npt.ArrayLike, n_quantiles: int = DEFAULT_QUANTILES) -> NumericProfile:
    x = to_float(np.asarray(values))
    total = len(x)
    x = x[np.isfinite(x)]
    missing_rate = 1.0 - len(x) / total if total else 0.0
    if len(x) == 0:
        return NumericProfile((), (), 0.0, 0.0, 0.0, 0.0, 0, missing_rate)
    edges = np.unique(np.quantile(x, np.linspace(0.0, 1.0, n_quantiles + 1)))
    counts = bin_counts(x, edges)
    # Few distinct values make few distinct quantiles: only then pay for the full sort.
    values, value_counts = (
        _discrete_values(x) if len(edges) <= DISCRETE_MAX_VALUES else _NOT_DISCRETE
    )
    return NumericProfile(
        edges=tuple(float(e) for e in edges),
        counts=tuple(int(c) for c in counts),
        mean=float(x.mean()),
        std=float(x.std()),
        min=float(edges[0]),
        max=float(edges[-1]),
        count=len(x),
        missing_rate=missing_rate,
        values=tuple(float(v) for v in values),
        value_counts=tuple(int(c) for c in value_counts),
    )


_NOT_DISCRETE: tuple[npt.NDArray[np.float64], npt.NDArray[np.int64]] = (
    np.empty(0),
    np.empty(0, dtype=np.int64),
)


def _discrete_values(
    x: npt.NDArray[np.float64],
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.int64]]:
    """Distinct values and their counts if ``x`` is discrete, else two empty arrays."""
    values, counts = np.unique(x, return_counts=True)
    if len(values) > DISCRETE_MAX_VALUES or len(x) < DISCRETE_MIN_REPEATS * len(values):
        return _NOT_DISCRETE
    return values, counts.astype(np.int64)


def bin_counts(x: npt.NDArray[np.float64], edges: npt.NDArray[np.float64]) -> npt.NDArray[np.int64]:
    """Counts of ``x`` in the bins between ``edges`` (values outside are clipped to the end bins).

    One ``searchsorted`` pass; the last bin is closed so the maximum lands inside it.
    """
    n_bins = max(len(edges) - 1, 1)
    idx = np.searchsorted(edges[1:-1], x, side="right")
    return np.bincount(idx, minlength=n_bins).astype(np.int64)


def to_float(values: npt.NDArray[Any]) -> npt.NDArray[np.float64]:
    """Values as float64; anything non-numeric becomes NaN (vectorised, no row loop)."""
    if values.dtype.kind in "fiub":
        return np.asarray(values, dtype=np.float64)
    parsed = pd.to_numeric(pd.Series(values), errors="coerce")
    return np.asarray(parsed.to_numpy(dtype=np.float64, na_value=np.nan), dtype=np.float64)


def profile_categorical(values: npt.ArrayLike) -> CategoricalProfile:
    series = pd.Series(np.asarray(values, dtype=object))
    missing = series.isna()
    present = series[~missing].astype(str)
    counts = present.value_counts(sort=False)
    total = len(series)
    return CategoricalProfile(
        frequencies={str(k): int(v) for k, v in counts.items()},
        count=len(present),
        missing_rate=float(missing.mean()) if total else 0.0,
    )


def _infer_kind(values: npt.NDArray[Any]) -> FeatureKind:
    return "numeric" if values.dtype.kind in "fiub" else "categorical"


def _column_to_dict(col: ColumnProfile) -> dict[str, Any]:
    data = asdict(col)
    if isinstance(col, NumericProfile):
        data["edges"] = list(col.edges)
        data["counts"] = list(col.counts)
        # Written only for discrete columns, so continuous ones keep their old JSON.
        del data["values"], data["value_counts"]
        if col.discrete:
            data["values"] = list(col.values)
            data["value_counts"] = list(col.value_counts)
    return data


def _column_from_dict(data: Mapping[str, Any]) -> ColumnProfile:
    if data["kind"] == "numeric":
        if len(data.get("values", ())) != len(data.get("value_counts", ())):
            raise ValueError("numeric column profile: values and value_counts differ in length")
        return NumericProfile(
            edges=tuple(float(e) for e in data["edges"]),
            counts=tuple(int(c) for c in data["counts"]),
            mean=float(data["mean"]),
            std=float(data["std"]),
            min=float(data["min"]),
            max=float(data["max"]),
            count=int(data["count"]),
            missing_rate=float(data["missing_rate"]),
            values=tuple(float(v) for v in data.get("values", ())),
            value_counts=tuple(int(c) for c in data.get("value_counts", ())),
        )
    if data["kind"] == "categorical":
        return CategoricalProfile(
            frequencies={str(k): int(v) for k, v in data["frequencies"].items()},
            count=int(data["count"]),
            missing_rate=float(data["missing_rate"]),
        )
    raise ValueError(f"unknown column profile kind: {data['kind']!r}")


def _schema_to_dict(s: FeatureSchema) -> dict[str, Any]:
    data = asdict(s)
    data["categories"] = None if s.categories is None else list(s.categories)
    return data


def _schema_from_dict(data: Mapping[str, Any]) -> FeatureSchema:
    cats = data.get("categories")
    return FeatureSchema(
        name=str(data["name"]),
        kind=data["kind"],
        min=data.get("min"),
        max=data.get("max"),
        categories=None if cats is None else tuple(str(c) for c in cats),
    )
