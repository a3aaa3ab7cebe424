"""The numpy columns plugins compute on: a monitoring window and a current column binned
against its reference profile."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
import pandas as pd

from cyclone.reference import CategoricalProfile, ColumnProfile, NumericProfile, to_float

Task = Literal["classification", "regression", "any"]
FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.intp]


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
