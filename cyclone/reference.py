"""Reference profiles: the training-time summary that drift and sanity checks compare against.

A profile is built once, when a model version is trained or imported, and stored as JSON in the
registry and next to the model (``reference.json``). Monitoring never rescans training data: every
drift test works from the quantile edges and histogram counts kept here, or, for a numeric column
with few distinct values (0/1 flags, small counts), from its exact value frequencies: quantile
edges of such a column collapse onto its values and would hide a change in their rates.

Profiles without value frequencies (written before they existed) load as continuous columns.

A profile built from labelled rows also keeps what performance estimation needs without labels:
a probability calibration (classifiers) or an error-by-prediction table (regressors). Profiles
written before those existed load without them, and estimation then reports no value.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

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
class Calibration:
    """Monotone maps from a model's predicted probability to the observed frequency, fitted
    (isotonic regression) on labelled reference rows.

    ``maps[c]`` is ``(x, y)`` knots for class ``c`` (linear interpolation between them, clipped
    at the ends). A binary model keeps one map, for class 1; class 0 is its complement. With more
    classes every class has its own one-vs-rest map and calibrated rows are renormalised.
    """

    maps: tuple[tuple[tuple[float, ...], tuple[float, ...]], ...]
    n_rows: int
    source: str = ""

    def apply(self, probabilities: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
        """Calibrated probabilities (same shape); rows keep summing to one."""
        p = np.asarray(probabilities, dtype=np.float64)
        if len(self.maps) == 1:
            x, y = self.maps[0]
            pos = np.interp(p[:, 1], x, y)
            return np.column_stack((1.0 - pos, pos))
        if len(self.maps) != p.shape[1]:
            raise ValueError(f"calibration has {len(self.maps)} classes, window has {p.shape[1]}")
        out = np.column_stack([np.interp(p[:, c], x, y) for c, (x, y) in enumerate(self.maps)])
        total = out.sum(axis=1, keepdims=True)
        uniform = np.full_like(out, 1.0 / out.shape[1])
        return np.asarray(np.divide(out, total, out=uniform, where=total > 0), dtype=np.float64)

    def to_dict(self) -> dict[str, Any]:
        maps = [{"x": list(x), "y": list(y)} for x, y in self.maps]
        return {"maps": maps, "n_rows": self.n_rows, "source": self.source}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Calibration:
        maps = []
        for m in data["maps"]:
            x, y = tuple(float(v) for v in m["x"]), tuple(float(v) for v in m["y"])
            if len(x) != len(y) or not x:
                raise ValueError("calibration map: x and y must be non-empty and equally long")
            maps.append((x, y))
        return cls(tuple(maps), int(data["n_rows"]), str(data.get("source", "")))


@dataclass(frozen=True)
class ErrorProfile:
    """Mean absolute error of a regressor per bin of its own prediction, on labelled reference
    rows: ``mean_abs_error[i]`` for predictions in ``[edges[i], edges[i+1])`` (ends clipped).

    It models the error as a function of the prediction only, so it sees shifts that move the
    predictions, not inputs that change the error at the same prediction (see docs/monitoring.md).
    """

    edges: tuple[float, ...]
    mean_abs_error: tuple[float, ...]
    n_rows: int

    def expected_abs_error(self, predictions: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
        edges = np.asarray(self.edges, dtype=np.float64)
        idx = np.searchsorted(edges[1:-1], predictions, side="right")
        return np.asarray(self.mean_abs_error, dtype=np.float64)[idx]

    def to_dict(self) -> dict[str, Any]:
        return {
            "edges": list(self.edges),
            "mean_abs_error": list(self.mean_abs_error),
            "n_rows": self.n_rows,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ErrorProfile:
        edges = tuple(float(e) for e in data["edges"])
        errors = tuple(float(e) for e in data["mean_abs_error"])
        if len(edges) != len(errors) + 1 or not errors:
            raise ValueError("error profile: edges must be one longer than mean_abs_error")
        return cls(edges, errors, int(data["n_rows"]))


@dataclass(frozen=True)
class ReferenceProfile:
    """Everything monitoring needs to know about the training data of one model version."""

    features: dict[str, ColumnProfile]
    schema: dict[str, FeatureSchema] = field(default_factory=dict)
    prediction: ColumnProfile | None = None
    task: str = "any"
    class_labels: tuple[str, ...] = ()
    n_rows: int = 0
    calibration: Calibration | None = None
    error_profile: ErrorProfile | None = None

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "format": PROFILE_FORMAT,
            "task": self.task,
            "class_labels": list(self.class_labels),
            "n_rows": self.n_rows,
            "features": {k: _column_to_dict(v) for k, v in self.features.items()},
            "schema": {k: _schema_to_dict(v) for k, v in self.schema.items()},
            "prediction": None if self.prediction is None else _column_to_dict(self.prediction),
        }
        # Written only when present, so profiles without labels keep their old JSON.
        if self.calibration is not None:
            data["calibration"] = self.calibration.to_dict()
        if self.error_profile is not None:
            data["error_profile"] = self.error_profile.to_dict()
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ReferenceProfile:
        if data.get("format") != PROFILE_FORMAT:
            raise ValueError(f"unsupported reference profile format: {data.get('format')!r}")
        prediction = data.get("prediction")
        calibration = data.get("calibration")
        error_profile = data.get("error_profile")
        return cls(
            features={k: _column_from_dict(v) for k, v in data["features"].items()},
            schema={k: _schema_from_dict(v) for k, v in data.get("schema", {}).items()},
            prediction=None if prediction is None else _column_from_dict(prediction),
            task=str(data.get("task", "any")),
            class_labels=tuple(data.get("class_labels", ())),
            n_rows=int(data.get("n_rows", 0)),
            calibration=None if calibration is None else Calibration.from_dict(calibration),
            error_profile=None if error_profile is None else ErrorProfile.from_dict(error_profile),
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
    import pandas as pd  # lazy: services import this module at start; pandas costs ~0.3 s

    parsed = pd.to_numeric(pd.Series(values), errors="coerce")
    return np.asarray(parsed.to_numpy(dtype=np.float64, na_value=np.nan), dtype=np.float64)


def profile_categorical(values: npt.ArrayLike) -> CategoricalProfile:
    import pandas as pd  # lazy, see to_float

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
