"""Why a model went RED: the features whose drift and whose values explain the loss, and the
segment where the error rose most. Pure numpy over the window's labelled rows.

Each feature's values are cut into a few bins (the reference's quantiles; categories as they
are; a bin of their own for values beyond the reference's range). With ``e_b`` the window's
error in bin ``b``, ``w_b`` its share of the window's rows and ``r_b`` its share of the
reference rows, a feature's score is

- the loss its drift brings, ``sum_b max(w_b - r_b, 0) * max(e_b - e0, 0)``: rows that moved
  into bins where the error rose (about zero when the feature did not move), plus
- how unevenly the *unexpected* error falls along it, ``sqrt(sum_b w_b (s_b - s)^2)`` with
  ``s_b`` the bin's mean of loss minus the loss the model expected for the row (1 - its top
  probability; the reference's error at that prediction for a regression): a concept change
  along a feature leaves its inputs where they were but piles surprising errors into some of
  its bins, while the errors every model makes near its decision boundary are expected.

The segment is the (feature, bin) whose error rose most against the error the version had at
registration (``e0``, from its baseline), weighed by its evidence: ``sqrt(n_b) * (e_b - e0)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from cyclone.plugin_api import ReferenceProfile, Window

# Bins per numeric feature: a few, so each holds enough labelled rows to say something.
BINS = 5
MIN_ROWS = 30


@dataclass(frozen=True)
class Explanation:
    features: tuple[tuple[str, float], ...]  # (feature, score), best first
    segment: str

    def text(self) -> str:
        ranked = ", ".join(f"{name} ({score:.3f})" for name, score in self.features)
        return f"why: loss explained most by {ranked}; error rose most where {self.segment}"


def expected_loss(window: Window, reference: ReferenceProfile) -> Any:
    """Per labelled row, the loss the model itself expected there: 1 - its top probability
    (classification), the reference's error at that prediction (regression); None if unknown.
    Errors near a decision boundary are expected; only the excess over them is news."""
    w = window.labelled
    if window.task == "classification":
        if w.probabilities is None or len(w.probabilities) != w.n_rows:
            return None
        return 1.0 - np.max(np.asarray(w.probabilities, dtype=np.float64), axis=1)
    if reference.error_profile is None:
        return None
    return reference.error_profile.expected_abs_error(np.asarray(w.predictions, dtype=np.float64))


def row_loss(window: Window) -> Any:
    """Per labelled row: 0/1 for a wrong class, |error| for a regression."""
    w = window.labelled
    if window.task == "classification":
        return (w.label_codes != w.prediction_codes).astype(np.float64)
    diff = np.asarray(w.predictions, dtype=np.float64) - np.asarray(w.labels, dtype=np.float64)
    return np.abs(np.nan_to_num(diff))


def _bins(values: npt.NDArray[Any], profile: Any) -> tuple[Any, list[str], Any] | None:
    """(bin of each row, bin names, reference share of each bin) for one feature."""
    if profile.kind == "categorical":
        freq = profile.frequencies
        names = sorted(freq, key=lambda k: -freq[k])
        text = np.asarray(values).astype(str)
        unseen = len(names)
        index = {name: i for i, name in enumerate(names)}
        codes = np.asarray([index.get(t, unseen) for t in text], dtype=np.intp)
        total = max(1, sum(freq.values()))
        ref = np.asarray([freq[n] / total for n in names] + [0.0])
        return codes, [f"= {n!r}" for n in names] + ["a category never seen"], ref
    edges = np.asarray(profile.edges, dtype=np.float64)
    if len(edges) < 2:
        return None
    picks = np.unique(np.quantile(edges, np.linspace(0, 1, BINS + 1)))
    x = np.asarray(values, dtype=np.float64)
    inner = np.clip(np.searchsorted(picks, x, side="right") - 1, 0, len(picks) - 2)
    codes = np.where(x < picks[0], len(picks) - 1, np.where(x > picks[-1], len(picks), inner))
    codes = np.where(np.isnan(x), len(picks) + 1, codes)
    names = [f"in [{picks[i]:.4g}, {picks[i + 1]:.4g})" for i in range(len(picks) - 1)]
    names += [f"< {picks[0]:.4g}", f"> {picks[-1]:.4g}", "is missing"]
    ref = np.append(np.full(len(picks) - 1, 1.0 / (len(picks) - 1)), [0.0, 0.0, 0.0])
    return codes, names, ref


def explain(
    window: Window, reference: ReferenceProfile | None, baseline_error: float | None
) -> Explanation | None:
    """The top three features and the worst segment; None without labels or a reference."""
    if reference is None or window.labels is None:
        return None
    loss = row_loss(window)
    n = len(loss)
    if n < MIN_ROWS:
        return None
    mean = float(loss.mean())
    e0 = mean if baseline_error is None else baseline_error
    expected = expected_loss(window, reference)
    surprise = loss if expected is None else loss - expected
    surprise_mean = float(surprise.mean())
    labelled = window.labelled
    scores: list[tuple[str, float]] = []
    best = (-math.inf, "")
    for name, profile in reference.features.items():
        values = labelled.features.get(name)
        if values is None:
            continue
        binned = _bins(values, profile)
        if binned is None:
            continue
        codes, names, ref = binned
        counts = np.bincount(codes, minlength=len(names)).astype(np.float64)
        sums = np.bincount(codes, weights=loss, minlength=len(names))
        error = np.divide(sums, counts, out=np.zeros_like(sums), where=counts > 0)
        share = counts / n
        # Only mass that moved in, and only where the error rose: sampling noise in the shares
        # of a feature that did not move times bins of ordinary error cancels out to ~0.
        drift = float(np.sum(np.clip(share - ref, 0, None) * np.clip(error - e0, 0, None)))
        excess = np.divide(
            np.bincount(codes, weights=surprise, minlength=len(names)),
            counts,
            out=np.zeros_like(sums),
            where=counts > 0,
        )
        spread = math.sqrt(float(np.sum(share * (excess - surprise_mean) ** 2)))
        scores.append((name, drift + spread))
        # The rise weighed by its evidence (sqrt of rows), so a small bin of a few bad rows
        # does not win, nor a big bin whose error rose a little.
        rise = np.sqrt(counts) * (error - e0)
        b = int(np.argmax(rise))
        if rise[b] > best[0] and counts[b] > 0:
            best = (
                float(rise[b]),
                f"{name} {names[b]}: error {error[b]:.3g} vs {e0:.3g} at registration"
                f" over {int(counts[b])} rows",
            )
    if not scores:
        return None
    scores.sort(key=lambda s: -s[1])
    return Explanation(tuple(scores[:3]), best[1])
