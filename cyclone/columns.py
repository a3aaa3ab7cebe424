"""The numpy columns plugins compute on: a monitoring window and a current column binned
against its reference profile."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from cyclone.reference import CategoricalProfile, ColumnProfile, NumericProfile, to_float

Task = Literal["classification", "regression", "any"]
FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.intp]
# Current values within this relative distance of a discrete reference value are that value:
# a flag logged as float32 must still match the float64 reference.
VALUE_MATCH_RTOL = 1e-6


@dataclass(frozen=True)
class Window:
    """The rows a plan evaluates, as numpy columns (all arrays have the same length).

    :param features: input columns by feature name.
    :param predictions: regression values (float) or predicted class labels (classification).
    :param probabilities: n x k class probabilities, columns in ``class_labels`` order.
    :param class_labels: the model's classes as strings.
    :param labels: ground truth; NaN/None where not labelled yet. Metrics use labelled rows only.
    :param task: "classification" or "regression".
    :param latency_ms: the model's latency per row in milliseconds (NaN where not recorded);
        None when the store sent none.
    :param created_at: when each row was served, Unix seconds; None when not known.
    """

    features: dict[str, npt.NDArray[Any]]
    predictions: npt.NDArray[Any]
    probabilities: FloatArray | None = None
    class_labels: list[str] = field(default_factory=list)
    labels: npt.NDArray[Any] | None = None
    task: Task = "any"
    latency_ms: FloatArray | None = None
    created_at: FloatArray | None = None

    @property
    def n_rows(self) -> int:
        return len(self.predictions)

    @cached_property
    def labelled_mask(self) -> npt.NDArray[np.bool_]:
        if self.labels is None:
            return np.zeros(self.n_rows, dtype=bool)
        if self.task == "classification":
            return np.asarray(self.label_codes >= 0)
        import pandas as pd  # lazy: a service that never builds a window does not pay for pandas

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
            latency_ms=None if self.latency_ms is None else self.latency_ms[mask],
            created_at=None if self.created_at is None else self.created_at[mask],
        )
        # Codes are already known; avoid re-encoding strings.
        sub.__dict__["label_codes"] = self.label_codes[mask]
        sub.__dict__["labelled_mask"] = np.ones(int(mask.sum()), dtype=bool)
        return sub


def _encode(values: npt.NDArray[Any], classes: list[str]) -> IntArray:
    import pandas as pd  # lazy, see labelled_mask

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
    reuse the same ``searchsorted`` pass. Against a discrete reference (exact value frequencies)
    the bins are the reference values themselves and the gaps between them.
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
        """(reference, current) probabilities over [below-min, reference bins..., above-max].

        For a discrete reference the cells are [below v0, v0, (v0, v1), v1, ..., v_k-1, above]:
        one per reference value and one per gap, so KS, PSI and JS see rate changes of
        values and mass moving to values the reference never had.
        """
        ref = self.reference
        assert isinstance(ref, NumericProfile)
        if ref.discrete:
            return self._value_histogram(ref)
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

    def _value_histogram(self, ref: NumericProfile) -> tuple[FloatArray, FloatArray]:
        n_cells = 2 * len(ref.values) + 1
        cur = np.bincount(self.value_cells, minlength=n_cells).astype(np.float64)
        ref_p = np.zeros(n_cells, dtype=np.float64)
        ref_counts = np.asarray(ref.value_counts, dtype=np.float64)
        ref_p[1::2] = ref_counts / ref_counts.sum()
        total = cur.sum()
        return ref_p, (cur / total if total > 0 else cur)

    @cached_property
    def value_cells(self) -> IntArray:
        """Each finite current value's cell against a discrete reference (see ``histogram``):
        ``2i + 1`` where it matches reference value ``i``, ``2j`` in the gap below value ``j``."""
        ref = self.reference
        assert isinstance(ref, NumericProfile) and ref.discrete
        values = np.asarray(ref.values, dtype=np.float64)
        x = self.numeric
        above = np.searchsorted(values, x)  # index of the first value >= x
        lo = np.clip(above - 1, 0, len(values) - 1)
        hi = np.clip(above, 0, len(values) - 1)
        nearest = np.where(np.abs(x - values[lo]) <= np.abs(values[hi] - x), lo, hi)
        tolerance = VALUE_MATCH_RTOL * np.maximum(np.abs(values), 1.0)
        matched = np.abs(x - values[nearest]) <= tolerance[nearest]
        return np.asarray(np.where(matched, 2 * nearest + 1, 2 * above), dtype=np.intp)

    @cached_property
    def value_support(self) -> tuple[FloatArray, FloatArray, FloatArray]:
        """(points, reference probabilities, current probabilities) over the reference values
        and the distinct current values that match none, sorted: both distributions exactly."""
        ref = self.reference
        assert isinstance(ref, NumericProfile) and ref.discrete
        values = np.asarray(ref.values, dtype=np.float64)
        cells = self.value_cells
        matched = cells % 2 == 1
        at_values = np.bincount((cells[matched] - 1) // 2, minlength=len(values))
        others, other_counts = np.unique(self.numeric[~matched], return_counts=True)
        points = np.concatenate((values, others))
        ref_w = np.concatenate(
            (np.asarray(ref.value_counts, dtype=np.float64), np.zeros(len(others)))
        )
        cur_w = np.concatenate((at_values, other_counts)).astype(np.float64)
        order = np.argsort(points, kind="stable")
        cur_total = cur_w.sum()
        return (
            points[order],
            ref_w[order] / ref_w.sum(),
            cur_w[order] / cur_total if cur_total > 0 else cur_w[order],
        )

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
        import pandas as pd  # lazy, see Window.labelled_mask

        series = pd.Series(np.asarray(self.values, dtype=object))
        present = series[~series.isna()].astype(str)
        cats = list(ref.frequencies)
        codes = pd.Index(cats).get_indexer(present.to_numpy())
        counts = np.bincount(codes + 1, minlength=len(cats) + 1).astype(np.float64)
        ref_counts = np.asarray([ref.frequencies[c] for c in cats] + [0], dtype=np.float64)
        cur_counts = np.concatenate((counts[1:], counts[:1]))  # unseen (-1) goes last
        return [*cats, "__unseen__"], ref_counts, cur_counts
