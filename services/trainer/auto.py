"""``retrain.window: auto``: which rows to hold out and which windows to fit, from the change
point of the served predictions' loss; the features that broke at that point (a data fault
that retraining would learn instead of fixing) and those whose values are new there (learned,
and said). Pure functions over a `LabelledWindow`."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import numpy as np

from services.trainer.changepoint import ChangePoint, find_change, per_row_loss
from services.trainer.data import LabelledWindow
from services.trainer.evaluate import split_holdout
from services.trainer.fit import LABEL

if TYPE_CHECKING:
    import pandas as pd

SINCE_CHANGE = "since_change"
NEWEST = "newest"
# A feature is broken when this share of the rows after the change is broken (and was not).
BROKEN_SHARE = 0.5
# A feature is stuck when one value is this share of the rows after the change.
STUCK_SHARE = 0.9


@dataclass(frozen=True)
class AutoWindow:
    """Rows (positions in the window's frame) to fit on, per candidate, and to hold out."""

    change: ChangePoint | None
    holdout: slice
    candidates: dict[str, slice] = field(default_factory=dict)
    change_time: datetime | None = None

    @property
    def fresh_rows(self) -> int:
        """Labelled rows after the change point (all rows when there is none)."""
        if self.change is None:
            return int(self.holdout.stop)
        return int(self.holdout.stop - self.change.index)

    def lineage(self, rows: int) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": "auto", "rows": rows}
        if self.change is not None:
            out["change_point"] = {
                "row": self.change.index,
                "time": None if self.change_time is None else self.change_time.isoformat(),
                "loss_before": self.change.loss_before,
                "loss_after": self.change.loss_after,
                "p_value": self.change.p_value,
            }
        return out


def locate_change(window: LabelledWindow, task: str) -> tuple[ChangePoint | None, datetime | None]:
    if window.predictions is None or window.rows == 0:
        return None, None
    loss = per_row_loss(task, window.frame[LABEL].to_numpy(), window.predictions)
    change = find_change(loss)
    when = None
    if change is not None and window.times is not None and len(window.times) > change.index:
        micros = int(window.times[change.index])
        when = datetime(1970, 1, 1, tzinfo=UTC) + timedelta(microseconds=micros)
    return change, when


def plan_auto(
    rows: int, fraction: float, change: ChangePoint | None, when: datetime | None = None
) -> AutoWindow:
    """Holdout: the newest ``fraction`` of the rows after the change (of all rows without one).
    Candidates: since the change, and the whole window (which wins when the change point is a
    false alarm or the old rows still teach something)."""
    if rows < 2:  # nothing to split: the job ends "not enough data" on the row count
        return AutoWindow(None, slice(rows, rows), {NEWEST: slice(0, rows)})
    if change is None or rows - change.index < 2:
        train, holdout = split_holdout(rows, fraction)
        return AutoWindow(None, holdout, {NEWEST: train})
    fresh = rows - change.index
    held = min(max(1, round(fresh * fraction)), fresh - 1)
    cut = rows - held
    return AutoWindow(
        change,
        slice(cut, rows),
        {SINCE_CHANGE: slice(change.index, cut), NEWEST: slice(0, cut)},
        when,
    )


def broken_features(
    frame: pd.DataFrame, features: tuple[tuple[str, str], ...], since: int
) -> list[str]:
    """Features that broke at row ``since``: missing in most rows, or stuck at one value, while
    they were not so before. Such a column carries nothing a model could learn: retraining on it
    would only learn the fault. One reason per broken feature, naming it."""
    if since <= 0 or since >= len(frame):
        return []
    import pandas as pd  # lazy: the trainer's main process imports this module at start

    reasons: list[str] = []
    for name, kind in features:
        before, after = frame[name].iloc[:since], frame[name].iloc[since:]
        if kind == "numeric":
            b, a = _numbers(before), _numbers(after)
            b_ok, a_ok = b[np.isfinite(b)], a[np.isfinite(a)]
            if len(b_ok) == 0:
                continue
            if np.mean(~np.isfinite(a)) >= BROKEN_SHARE > np.mean(~np.isfinite(b)):
                reasons.append(f"{name}: missing in {np.mean(~np.isfinite(a)):.0%} of rows")
            elif len(a_ok) > 1 and _top_share(a_ok) >= STUCK_SHARE > 2 * _top_share(b_ok):
                value = pd.Series(a_ok).mode().iloc[0]
                reasons.append(
                    f"{name}: stuck at {value:g} in {_top_share(a_ok):.0%} of rows since the change"
                )
        else:
            a_text = after.astype(str)
            if _top_share(a_text) >= STUCK_SHARE > 2 * _top_share(before.astype(str)):
                value = a_text.mode().iloc[0]
                reasons.append(
                    f"{name}: stuck at {value!r} in {_top_share(a_text):.0%} of rows since the change"
                )
    return reasons


def novel_features(
    frame: pd.DataFrame, features: tuple[tuple[str, str], ...], since: int
) -> list[str]:
    """Features whose values since row ``since`` are mostly new: outside the range seen before,
    or categories never seen before. A new season, market or price level looks like this, and
    so does an upstream change of units or codes: the values still carry information, so the
    job retrains on them (the champion/challenger comparison decides) and says so, for a person
    to check it was the world and not the pipeline."""
    if since <= 0 or since >= len(frame):
        return []
    notes: list[str] = []
    for name, kind in features:
        before, after = frame[name].iloc[:since], frame[name].iloc[since:]
        if kind == "numeric":
            b_ok, a_ok = _finite(_numbers(before)), _finite(_numbers(after))
            if len(b_ok) == 0 or len(a_ok) == 0:
                continue
            low, high = float(b_ok.min()), float(b_ok.max())
            outside = float(np.mean((a_ok < low) | (a_ok > high)))
            if outside >= BROKEN_SHARE:
                notes.append(
                    f"{name}: {outside:.0%} of values outside [{low:g}, {high:g}] seen before"
                )
        else:
            seen = set(before.astype(str))
            unseen = float(np.mean(~after.astype(str).isin(seen)))
            if unseen >= BROKEN_SHARE:
                notes.append(f"{name}: {unseen:.0%} of values are categories never seen before")
    return notes


def _numbers(values: Any) -> Any:
    """A column as floats; what does not parse is NaN (counted as missing)."""
    import pandas as pd  # lazy, see broken_features

    return pd.to_numeric(values, errors="coerce").to_numpy(dtype=np.float64)


def _finite(values: Any) -> Any:
    return values[np.isfinite(values)]


def _top_share(values: Any) -> float:
    """Share of the most frequent value (a change point is a few rows off: not exactly 1)."""
    import pandas as pd  # lazy, see broken_features

    counts = pd.Series(values).value_counts()
    return float(counts.iloc[0] / counts.sum()) if len(counts) else 0.0
