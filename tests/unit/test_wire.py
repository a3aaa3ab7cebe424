"""The shared wire helpers: timestamps survive a round trip in any zone, unset stays unset."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

from hypothesis import given
from hypothesis import strategies as st

from cyclone import wire
from cyclone.store.v1 import store_service_pb2 as pb


@given(
    st.datetimes(min_value=datetime(1971, 1, 1), max_value=datetime(2200, 1, 1)),
    st.integers(min_value=-12 * 60, max_value=14 * 60),
)
def test_an_aware_datetime_round_trips_as_the_same_instant(naive: datetime, offset: int) -> None:
    aware = naive.replace(tzinfo=timezone(timedelta(minutes=offset)))
    message = pb.MetricPoint(created_at=wire.ts(aware))
    back = wire.from_ts(message, "created_at")
    assert back == aware
    assert back is not None and back.tzinfo == UTC


def test_unset_timestamps_stay_unset() -> None:
    assert wire.ts_or_none(None) is None
    assert wire.from_ts(pb.MetricPoint(), "created_at") is None
    assert wire.from_ts(pb.MetricPoint(created_at=wire.ts_or_none(None)), "created_at") is None
