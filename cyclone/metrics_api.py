"""Types that plugin authors use: specs they register, the window they compute on, results.

Everything here is plain data over numpy columns, so a plugin needs neither gRPC nor a database.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from datetime import datetime
from enum import StrEnum
from functools import cached_property
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
import pandas as pd

from cyclone.profile import (
    CategoricalProfile,
    ColumnProfile,
    FeatureSchema,
    NumericProfile,
    ReferenceProfile,
    build_profile,
    to_float,
)

__all__ = [
    "Alert",
    "AlertSinkSpec",
    "CategoricalProfile",
    "ColumnProfile",
    "CurrentColumn",
    "DriftResult",
    "DriftTestSpec",
    "FeatureSchema",
    "Level",
    "MetricContext",
    "MetricResult",
    "MetricSpec",
    "ModelFamilySpec",
    "NumericProfile",
    "OrchestratorSpec",
    "ReferenceProfile",
    "Window",
    "build_profile",
    "to_float",
]

Task = Literal["classification", "regression", "any"]
Status = Literal["ok", "not_enough_data", "error"]
FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.intp]


class Level(StrEnum):
    """RAG level of a model; ordered GREEN < AMBER < RED."""

    GREEN = "GREEN"
    AMBER = "AMBER"
    RED = "RED"

    @property
    def rank(self) -> int:
        return ("GREEN", "AMBER", "RED").index(self.value)


@dataclass(frozen=True)
class MetricResult:
    """One metric value; ``value`` is None unless ``status`` is "ok" (never NaN)."""

    value: float | None
    status: Status = "ok"
    detail: str = ""

    @classmethod
    def ok(cls, value: float, detail: str = "") -> MetricResult:
        if not math.isfinite(value):
            return cls(None, "not_enough_data", detail or f"value is {value}")
        return cls(float(value), "ok", detail)

    @classmethod
    def not_enough_data(cls, detail: str) -> MetricResult:
        return cls(None, "not_enough_data", detail)

    @classmethod
    def error(cls, detail: str) -> MetricResult:
        return cls(None, "error", detail)


@dataclass(frozen=True)
class DriftResult:
    """Outcome of one drift test on one feature.

    ``effect_size`` is what the decision uses; ``statistic`` is the test's raw statistic (often the
    same number); ``p_value`` is informative only and None when the test has none.
    """

    statistic: float
    p_value: float | None
    effect_size: float
    drifted: bool
    threshold: float
    status: Status = "ok"
    detail: str = ""

    @classmethod
    def skipped(cls, status: Status, detail: str, threshold: float = math.nan) -> DriftResult:
        return cls(math.nan, None, math.nan, False, threshold, status, detail)


@dataclass(frozen=True)
class Window:
    """The rows a plan evaluates, as numpy columns (all arrays have the same length).

    :param features: input columns by feature name.
    :param predictions: regression values (float) or predicted class labels (classification).
    :param probabilities: n x k class probabilities, columns in ``class_labels`` order.
    :param class_labels: the model's classes as strings.
    :param labels: ground truth; NaN/None where not labelled yet. Metrics use labelled rows only.
    :param task: "classification" or "regression".
    """

    features: dict[str, npt.NDArray[Any]]
    predictions: npt.NDArray[Any]
    probabilities: FloatArray | None = None
    class_labels: list[str] = field(default_factory=list)
    labels: npt.NDArray[Any] | None = None
    task: Task = "any"

    @property
    def n_rows(self) -> int:
        return len(self.predictions)

    @cached_property
    def labelled_mask(self) -> npt.NDArray[np.bool_]:
        if self.labels is None:
            return np.zeros(self.n_rows, dtype=bool)
        if self.task == "classification":
            return np.asarray(self.label_codes >= 0)
        return np.asarray(~pd.isna(self.labels), dtype=bool)

    @property
    def n_labelled(self) -> int:
        return int(self.labelled_mask.sum())

    @cached_property
    def label_codes(self) -> IntArray:
        """True labels as indices into ``class_labels``; -1 where unlabelled or unknown."""
        if self.labels is None:
            return np.full(self.n_rows, -1, dtype=np.intp)
        return _encode(self.labels, self.class_labels)

    @cached_property
    def prediction_codes(self) -> IntArray:
        """Predicted labels as indices into ``class_labels``; -1 where unknown."""
        return _encode(self.predictions, self.class_labels)

    @cached_property
    def labelled(self) -> Window:
        """The same window restricted to labelled rows (computed once)."""
        mask = self.labelled_mask
        sub = Window(
            features={k: v[mask] for k, v in self.features.items()},
            predictions=self.predictions[mask],
            probabilities=None if self.probabilities is None else self.probabilities[mask],
            class_labels=self.class_labels,
            labels=None if self.labels is None else self.labels[mask],
            task=self.task,
        )
        # Codes are already known; avoid re-encoding strings.
        sub.__dict__["label_codes"] = self.label_codes[mask]
        sub.__dict__["labelled_mask"] = np.ones(int(mask.sum()), dtype=bool)
        return sub


def _encode(values: npt.NDArray[Any], classes: list[str]) -> IntArray:
    arr = np.asarray(values)
    if len(classes) == 0:
        return np.full(len(arr), -1, dtype=np.intp)
    if arr.dtype.kind in "iufb":
        # Numeric labels: match them against classes written as numbers ("0", "1", ...).
        as_num = pd.to_numeric(pd.Series(classes), errors="coerce").to_numpy(dtype=np.float64)
        if np.isnan(as_num).any() or len(np.unique(as_num)) != len(as_num):
            return np.full(len(arr), -1, dtype=np.intp)
        codes = pd.Index(as_num).get_indexer(arr.astype(np.float64))
    else:
        codes = pd.Index(classes).get_indexer(arr)
    return np.asarray(codes, dtype=np.intp)


@dataclass(frozen=True)
class MetricContext:
    """What a metric gets besides the window: plan params and the reference profile."""

    params: Mapping[str, Any] = field(default_factory=dict)
    reference: ReferenceProfile | None = None


MetricFn = Callable[[Window, MetricContext], MetricResult]


@dataclass(frozen=True)
class MetricSpec:
    """A metric a plugin registers.

    :param name: unique metric name used in plans (``accuracy``).
    :param fn: ``fn(window, ctx) -> MetricResult``; vectorised over the window's columns.
    :param needs_labels: True if it uses ground truth; the engine then passes a window that has
        at least the plan's ``min_labelled_rows`` labelled rows, else reports not_enough_data.
    :param task: which models it applies to.
    :param higher_is_better: direction used by ``relative_drop`` triggers.
    :param plugin: filled in by the registry with the registering plugin's name.
    """

    name: str
    fn: MetricFn
    needs_labels: bool
    task: Task = "any"
    description: str = ""
    higher_is_better: bool = True
    plugin: str = ""


class CurrentColumn:
    """A current-window column, binned lazily and once against a reference column profile.

    Drift tests share one instance per feature, so KS, PSI, Wasserstein and Jensen-Shannon all
    reuse the same ``searchsorted`` pass.
    """

    def __init__(self, name: str, values: npt.NDArray[Any], reference: ColumnProfile) -> None:
        self.name = name
        self.values = values
        self.reference = reference

    @cached_property
    def numeric(self) -> FloatArray:
        """Finite values as float64 (missing and non-numeric values dropped)."""
        x = to_float(self.values)
        return x[np.isfinite(x)]

    @cached_property
    def histogram(self) -> tuple[FloatArray, FloatArray]:
        """(reference, current) probabilities over [below-min, reference bins..., above-max]."""
        ref = self.reference
        assert isinstance(ref, NumericProfile)
        edges = np.asarray(ref.edges, dtype=np.float64)
        x = self.numeric
        below = int(np.count_nonzero(x < edges[0]))
        above = int(np.count_nonzero(x > edges[-1]))
        idx = np.searchsorted(edges[1:-1], x, side="right")
        inner = np.bincount(idx, minlength=max(len(edges) - 1, 1)).astype(np.float64)
        # Out-of-range values were clipped into the end bins by searchsorted; move them out.
        inner[0] -= below
        inner[-1] -= above
        cur = np.concatenate(([below], inner, [above]))
        ref_p = np.concatenate(([0.0], ref.probabilities, [0.0]))
        total = cur.sum()
        return ref_p, (cur / total if total > 0 else cur)

    @cached_property
    def out_of_range_mass(self) -> tuple[float, float]:
        """Mean distance below the reference min and above the max, over all current values."""
        ref = self.reference
        assert isinstance(ref, NumericProfile)
        x = self.numeric
        if len(x) == 0:
            return 0.0, 0.0
        lo = float(np.clip(ref.min - x, 0.0, None).sum()) / len(x)
        hi = float(np.clip(x - ref.max, 0.0, None).sum()) / len(x)
        return lo, hi

    @cached_property
    def category_counts(self) -> tuple[list[str], FloatArray, FloatArray]:
        """(categories, reference counts, current counts); unseen categories pooled last."""
        ref = self.reference
        assert isinstance(ref, CategoricalProfile)
        series = pd.Series(np.asarray(self.values, dtype=object))
        present = series[~series.isna()].astype(str)
        cats = list(ref.frequencies)
        codes = pd.Index(cats).get_indexer(present.to_numpy())
        counts = np.bincount(codes + 1, minlength=len(cats) + 1).astype(np.float64)
        ref_counts = np.asarray([ref.frequencies[c] for c in cats] + [0], dtype=np.float64)
        cur_counts = np.concatenate((counts[1:], counts[:1]))  # unseen (-1) goes last
        return [*cats, "__unseen__"], ref_counts, cur_counts


DriftFn = Callable[[CurrentColumn, float], DriftResult]


@dataclass(frozen=True)
class DriftTestSpec:
    """A drift test a plugin registers.

    :param name: unique test name used in plans (``psi``).
    :param fn: ``fn(column, threshold) -> DriftResult`` comparing one current column with its
        reference profile; ``drifted`` must be decided from the effect size vs ``threshold``.
    :param kind: the feature kind it applies to.
    :param default_threshold: effect-size threshold when the plan sets none.
    """

    name: str
    fn: DriftFn
    kind: Literal["numeric", "categorical"]
    default_threshold: float
    description: str = ""
    plugin: str = ""


@dataclass(frozen=True)
class Alert:
    """A level change of one model version, as delivered to alert sinks."""

    id: str
    model: str
    version: str
    level: str
    previous_level: str
    reasons: list[str]
    actions: list[str]
    created_at: datetime

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["created_at"] = self.created_at.isoformat()
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Alert:
        return cls(
            id=str(data["id"]),
            model=str(data["model"]),
            version=str(data["version"]),
            level=str(data["level"]),
            previous_level=str(data["previous_level"]),
            reasons=[str(r) for r in data["reasons"]],
            actions=[str(a) for a in data["actions"]],
            created_at=datetime.fromisoformat(str(data["created_at"])),
        )


@dataclass(frozen=True)
class AlertSinkSpec:
    """An alert sink: ``deliver(alert, config)`` raises on failure (the monitor retries)."""

    name: str
    deliver: Callable[[Alert, Mapping[str, Any]], None]
    description: str = ""
    plugin: str = ""


@dataclass(frozen=True)
class ModelFamilySpec:
    """A trainable model family: ``build(params)`` returns an unfitted scikit-learn estimator."""

    name: str
    build: Callable[[Mapping[str, Any]], Any]
    task: Task = "any"
    description: str = ""
    plugin: str = ""


@dataclass(frozen=True)
class OrchestratorSpec:
    """A way to start model revisions: ``create(config)`` returns an orchestrator object."""

    name: str
    create: Callable[[Mapping[str, Any]], Any]
    description: str = ""
    plugin: str = ""
