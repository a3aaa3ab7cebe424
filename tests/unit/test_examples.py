"""The demo's bike-sharing world: the shift must really break the first model, and data from
after the shift must really fix it -- otherwise the demo's story would be staged."""

from __future__ import annotations

import numpy as np
import pytest

from cyclone_app.examples import BIKE_FEATURES, SEASONS, bike_frame, bike_pipeline


def _mae(pipeline: object, frame: object) -> float:
    predictions = pipeline.predict(frame[BIKE_FEATURES])  # type: ignore[attr-defined]
    return float(np.mean(np.abs(predictions - frame["rentals"])))  # type: ignore[index]


def test_bike_frame_is_hourly_and_plausible() -> None:
    frame = bike_frame(24 * 7, start="2026-07-01", seed=1)
    assert list(frame.columns) == [*BIKE_FEATURES, "rentals"]
    assert len(frame) == 24 * 7 and frame.index.freqstr == "h"
    assert set(frame["season"]) <= set(SEASONS)
    assert (frame["rentals"] >= 0).all() and frame["humidity"].between(15, 100).all()
    # Summer is warmer than winter; rush hours are busier than the night.
    winter = bike_frame(24 * 7, start="2026-01-10", seed=1)
    assert frame["temperature"].mean() > winter["temperature"].mean() + 10
    by_hour = frame.groupby("hour")["rentals"].mean()
    assert by_hour[8] > 3 * by_hour[3]


@pytest.mark.slow
def test_new_bike_lanes_break_the_old_model_and_recent_data_fixes_it() -> None:
    before = bike_pipeline(bike_frame(24 * 31, start="2026-01-01", seed=0))
    same_world = bike_frame(24 * 14, start="2026-01-15", seed=5)
    after = bike_frame(24 * 14, start="2026-04-22", seed=6, lanes=1.0)
    retrained = bike_pipeline(bike_frame(24 * 21, start="2026-04-01", seed=4, lanes=1.0))
    # Relative to the demand level, the old model is far worse after the lanes opened...
    old_error = _mae(before, after) / after["rentals"].mean()
    assert old_error > 2 * _mae(before, same_world) / same_world["rentals"].mean()
    # ...and a model fitted on the new world halves its error at least.
    assert _mae(retrained, after) < 0.5 * _mae(before, after)
