"""Classification metrics over the labelled rows of a window, vectorised with numpy.

Binary metrics use ``class_labels[1]`` as the positive class unless the plan sets
``params: {positive_label: ...}``. With more than two classes the unqualified metrics are macro
averages.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final

import numpy as np
import numpy.typing as npt

from cyclone.hookspecs import hookimpl
from cyclone.plugin_api import MetricContext, MetricResult, MetricSpec, Window

IntArray = npt.NDArray[np.intp]
FloatArray = npt.NDArray[np.float64]


def _confusion(window: Window) -> tuple[npt.NDArray[np.int64], int] | MetricResult:
    w = window.labelled
    k = len(w.class_labels)
    if k < 2:
        return MetricResult.not_enough_data("model has fewer than two class labels")
    if w.n_rows == 0:
        return MetricResult.not_enough_data("no labelled rows")
    y, p = w.label_codes, w.prediction_codes
    # Predictions outside class_labels count as wrong for every class (own bucket k).
    p = np.where(p < 0, k, p)
    cm = np.bincount(y * (k + 1) + p, minlength=k * (k + 1)).reshape(k, k + 1)
    return cm[:, :k], k


def _positive(window: Window, ctx: MetricContext) -> int:
    label = ctx.params.get("positive_label")
    if label is None:
        return 1
    return window.class_labels.index(str(label))


def accuracy(window: Window, ctx: MetricContext) -> MetricResult:
    w = window.labelled
    if w.n_rows == 0:
        return MetricResult.not_enough_data("no labelled rows")
    return MetricResult.ok(float(np.mean(w.label_codes == w.prediction_codes)))


def _prf(window: Window, ctx: MetricContext, average: str, which: str) -> MetricResult:
    got = _confusion(window)
    if isinstance(got, MetricResult):
        return got
    cm, k = got
    tp = np.diag(cm).astype(np.float64)
    predicted = cm.sum(axis=0).astype(np.float64)
    actual = cm.sum(axis=1).astype(np.float64)
    # Zero denominators give 0, as sklearn's zero_division=0.
    precision = np.divide(tp, predicted, out=np.zeros(k), where=predicted > 0)
    recall = np.divide(tp, actual, out=np.zeros(k), where=actual > 0)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros(k), where=denom > 0)
    per_class = {"precision": precision, "recall": recall, "f1": f1}[which]
    if average == "binary" or (average == "auto" and k == 2):
        if k != 2:
            return MetricResult.error(f"binary {which} needs exactly two classes, got {k}")
        return MetricResult.ok(float(per_class[_positive(window, ctx)]))
    return MetricResult.ok(float(per_class.mean()))


def _prf_metric(which: str, average: str) -> Callable[[Window, MetricContext], MetricResult]:
    def fn(window: Window, ctx: MetricContext) -> MetricResult:
        return _prf(window, ctx, str(ctx.params.get("average", average)), which)

    return fn


def _auc_binary(y_pos: npt.NDArray[np.bool_], scores: FloatArray) -> float:
    """Mann-Whitney U form of ROC AUC: one sort, ties get average ranks."""
    n_pos = int(y_pos.sum())
    n_neg = len(y_pos) - n_pos
    from scipy.stats import rankdata  # lazy: scipy costs ~0.3 s at service start

    ranks = rankdata(scores)
    return float((ranks[y_pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def roc_auc(window: Window, ctx: MetricContext) -> MetricResult:
    w = window.labelled
    if w.probabilities is None:
        return MetricResult.not_enough_data("window has no probabilities")
    y = w.label_codes
    k = len(w.class_labels)
    present = np.bincount(y, minlength=k) > 0
    if present.sum() < 2:
        return MetricResult.not_enough_data("labelled rows contain a single class")
    if k == 2:
        pos = _positive(window, ctx)
        return MetricResult.ok(_auc_binary(y == pos, w.probabilities[:, pos]))
    # One-vs-rest macro average over the classes present (sklearn requires all present).
    if not present.all():
        return MetricResult.not_enough_data("not every class is present in the labelled rows")
    aucs = [_auc_binary(y == c, w.probabilities[:, c]) for c in range(k)]
    return MetricResult.ok(float(np.mean(aucs)))


def log_loss(window: Window, ctx: MetricContext) -> MetricResult:
    w = window.labelled
    if w.probabilities is None:
        return MetricResult.not_enough_data("window has no probabilities")
    if w.n_rows == 0:
        return MetricResult.not_enough_data("no labelled rows")
    probs = w.probabilities
    eps = np.finfo(probs.dtype).eps
    p_true = np.take_along_axis(probs, w.label_codes[:, None], axis=1)[:, 0]
    return MetricResult.ok(float(-np.mean(np.log(np.clip(p_true, eps, 1 - eps)))))


_CLS: Final = "classification"


@hookimpl
def cyclone_register_metrics(register: Callable[[MetricSpec], None]) -> None:
    register(MetricSpec("accuracy", accuracy, True, _CLS, "share of correct predictions"))
    for which in ("precision", "recall", "f1"):
        register(
            MetricSpec(
                which,
                _prf_metric(which, "auto"),
                True,
                _CLS,
                f"{which} of the positive class (binary) or macro average (multiclass)",
            )
        )
        register(
            MetricSpec(
                f"{which}_macro",
                _prf_metric(which, "macro"),
                True,
                _CLS,
                f"unweighted mean of per-class {which}",
            )
        )
    register(MetricSpec("roc_auc", roc_auc, True, _CLS, "ROC AUC (one-vs-rest macro)"))
    register(MetricSpec("log_loss", log_loss, True, _CLS, "cross-entropy", higher_is_better=False))
