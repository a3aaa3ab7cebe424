"""Where the world changed: a change-point test on the per-row loss of labelled predictions.

Pure numpy. The loss of each labelled prediction, oldest first (0/1 for a wrong class, absolute
error for a regression), is tested with a CUSUM of its deviations from the mean: the split where
the cumulative sum is lowest is the most likely point after which the loss rose, and the sup of
the standardised sum is compared with its Brownian-bridge distribution (``P(sup > x) =
exp(-2 x^2)``). Binary segmentation on the part after a change finds a later one, so a window
holding an old change and a new one starts from the newest.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

# One-sided significance of a rise; small because a false change point throws old rows away.
ALPHA = 1e-3
# Neither side of a change may be shorter than this (a few rows carry no evidence).
MIN_SEGMENT = 30
# Changes looked for after the first one (binary segmentation on the newer side).
MAX_SPLITS = 3


@dataclass(frozen=True)
class ChangePoint:
    """A rise of the loss at row ``index`` (rows ``index:`` are the new world)."""

    index: int
    loss_before: float
    loss_after: float
    p_value: float

    def describe(self, rows: int) -> str:
        return (
            f"loss rose from {self.loss_before:.3g} to {self.loss_after:.3g} at row"
            f" {self.index} of {rows} (p {self.p_value:.1e})"
        )


def per_row_loss(task: str, labels: npt.NDArray[Any], predictions: npt.NDArray[Any]) -> Any:
    """0/1 for a wrong class; |error| for a regression (squared error lets one outlier decide)."""
    if task == "classification":
        return (np.asarray(predictions).astype(str) != np.asarray(labels).astype(str)).astype(
            np.float64
        )
    diff = np.asarray(predictions, dtype=np.float64) - np.asarray(labels, dtype=np.float64)
    return np.abs(np.nan_to_num(diff, nan=0.0, posinf=0.0, neginf=0.0))


def _rise(loss: npt.NDArray[np.float64], alpha: float) -> ChangePoint | None:
    n = len(loss)
    if n < 2 * MIN_SEGMENT:
        return None
    cusum = np.cumsum(loss - loss.mean())
    # cusum[t - 1] sums rows [0, t): lowest where the rows before are lowest against the mean.
    candidates = np.arange(MIN_SEGMENT, n - MIN_SEGMENT + 1)
    t = int(candidates[np.argmin(cusum[candidates - 1])])
    before, after = loss[:t], loss[t:]
    if after.mean() <= before.mean():
        return None
    # Pooled within-segment spread: the change itself must not inflate the noise estimate.
    spread = math.sqrt(
        (((before - before.mean()) ** 2).sum() + ((after - after.mean()) ** 2).sum()) / n
    )
    if spread == 0.0:
        spread = 1e-12
    x = -float(cusum[t - 1]) / (spread * math.sqrt(n))
    p = math.exp(-2.0 * x * x)
    if p >= alpha:
        return None
    return ChangePoint(t, float(before.mean()), float(after.mean()), p)


def find_change(loss: npt.NDArray[np.float64], alpha: float = ALPHA) -> ChangePoint | None:
    """The newest significant rise of the loss, or None when the loss did not rise."""
    loss = np.asarray(loss, dtype=np.float64)
    found = _rise(loss, alpha)
    if found is None:
        return None
    for _ in range(MAX_SPLITS):
        later = _rise(loss[found.index :], alpha)
        if later is None:
            break
        found = ChangePoint(
            found.index + later.index, later.loss_before, later.loss_after, later.p_value
        )
    return found
