"""Champion vs challenger on the holdout: metrics through the metric plugins, a paired bootstrap,
and the promotion decision. Pure functions over numpy arrays (no gRPC, no files)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from cyclone.plan import MetricRef
from cyclone.plugin_api import MetricContext, MetricSpec, Window

Task = Literal["classification", "regression"]
# Reported next to the primary metric when they apply to the task.
REPORTED = {
    "classification": ("accuracy", "f1_macro", "roc_auc", "log_loss"),
    "regression": ("mae", "rmse", "r2"),
}


@dataclasses.dataclass(frozen=True)
class Scored:
    """One model's answers on the holdout rows."""

    predictions: npt.NDArray[Any]
    probabilities: npt.NDArray[np.float64] | None = None
    class_labels: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class Decision:
    promote: bool
    metric: str
    higher_is_better: bool
    champion: float
    challenger: float
    improvement: float  # in the better direction: > 0 means the challenger is better
    required: float  # the margin, in the metric's units
    lower_bound: float  # bootstrap lower bound of the improvement at `confidence`
    p_not_better: float  # share of resamples where the challenger was not better
    confidence: float
    resamples: int

    @property
    def text(self) -> str:
        verdict = "promote" if self.promote else "keep the champion"
        why = (
            "challenger is better by more than the margin and the bootstrap agrees"
            if self.promote
            else "challenger is not better by the margin"
            if self.improvement < self.required
            else "the improvement may be noise"
        )
        return (
            f"{verdict}: {self.metric} champion {self.champion:.4g} vs challenger "
            f"{self.challenger:.4g} (improvement {self.improvement:+.4g}, margin {self.required:.4g}, "
            f"{self.confidence:.0%} lower bound {self.lower_bound:+.4g}, "
            f"P(not better) {self.p_not_better:.3f} over {self.resamples} paired resamples): {why}"
        )

    def numbers(self) -> dict[str, float]:
        return {
            "improvement": self.improvement,
            "margin": self.required,
            "lower_bound": self.lower_bound,
            "p_not_better": self.p_not_better,
        }


def _window(
    task: Task, labels: npt.NDArray[Any], scored: Scored, index: Any = slice(None)
) -> Window:
    if task == "classification":
        return Window(
            features={},
            predictions=scored.predictions[index],
            probabilities=None if scored.probabilities is None else scored.probabilities[index],
            class_labels=list(scored.class_labels),
            labels=labels[index],
            task="classification",
        )
    return Window(
        features={},
        predictions=scored.predictions[index],
        labels=labels[index],
        task="regression",
    )


def metric_value(
    spec: MetricSpec,
    ref: MetricRef,
    task: Task,
    labels: npt.NDArray[Any],
    scored: Scored,
    index: Any = slice(None),
) -> float | None:
    result = spec.fn(_window(task, labels, scored, index), MetricContext(params=ref.params))
    return result.value if result.status == "ok" else None


def holdout_metrics(
    specs: Mapping[str, MetricSpec],
    primary: MetricRef,
    task: Task,
    labels: npt.NDArray[Any],
    scored: Scored,
) -> dict[str, float]:
    """The primary metric (under its result key) plus the usual ones for the task."""
    out: dict[str, float] = {}
    refs = [primary, *(MetricRef(n) for n in REPORTED[task] if n != primary.name)]
    for ref in refs:
        spec = specs.get(ref.name)
        if spec is None or spec.task not in ("any", task):
            continue
        value = metric_value(spec, ref, task, labels, scored)
        if value is not None:
            out[ref.result_key] = value
    return out


def decide(
    spec: MetricSpec,
    ref: MetricRef,
    task: Task,
    labels: npt.NDArray[Any],
    champion: Scored,
    challenger: Scored,
    *,
    margin: float,
    confidence: float,
    resamples: int,
    seed: int = 0,
) -> Decision:
    """Promote only when the challenger beats the champion by ``margin`` (relative to the
    champion's value) and a paired bootstrap over holdout rows puts the improvement's lower
    bound at ``confidence`` above zero. Both models are scored on the same resampled rows."""
    sign = 1.0 if spec.higher_is_better else -1.0
    old = metric_value(spec, ref, task, labels, champion)
    new = metric_value(spec, ref, task, labels, challenger)
    if old is None or new is None:
        raise ValueError(f"metric {ref.result_key}: no value on the holdout (one class only?)")
    improvement = sign * (new - old)
    required = margin * max(abs(old), 1e-12)
    rng = np.random.default_rng(seed)
    n = len(labels)
    diffs: list[float] = []
    for _ in range(resamples):
        index = rng.integers(0, n, n)
        a = metric_value(spec, ref, task, labels, champion, index)
        b = metric_value(spec, ref, task, labels, challenger, index)
        if a is not None and b is not None:
            diffs.append(sign * (b - a))
    if not diffs:
        raise ValueError(f"metric {ref.result_key}: no value on any bootstrap resample")
    boot = np.asarray(diffs)
    lower = float(np.quantile(boot, 1.0 - confidence))
    p_not_better = float(np.mean(boot <= 0.0))
    promote = improvement >= required and improvement > 0 and lower > 0.0
    return Decision(
        promote,
        ref.result_key,
        spec.higher_is_better,
        old,
        new,
        improvement,
        required,
        lower,
        p_not_better,
        confidence,
        len(diffs),
    )


def split_holdout(n_rows: int, fraction: float) -> tuple[slice, slice]:
    """Rows are oldest first: the newest ``fraction`` is the holdout, never shuffled, so the
    future never leaks into training. Both parts keep at least one row."""
    if n_rows < 2:
        raise ValueError(f"rows: need at least 2 rows to hold some out, got {n_rows}")
    holdout = min(max(1, round(n_rows * fraction)), n_rows - 1)
    cut = n_rows - holdout
    return slice(0, cut), slice(cut, n_rows)


def class_counts(labels: Sequence[Any]) -> dict[str, int]:
    values, counts = np.unique(np.asarray(labels).astype(str), return_counts=True)
    return {str(v): int(c) for v, c in zip(values, counts, strict=True)}
