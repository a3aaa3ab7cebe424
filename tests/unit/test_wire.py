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


_moments = st.none() | st.datetimes(
    min_value=datetime(1971, 1, 1), max_value=datetime(2200, 1, 1), timezones=st.just(UTC)
)
_names = st.none() | st.text(min_size=1, max_size=8)
_counts = st.none() | st.integers(min_value=1, max_value=2**40)
_metrics = st.none() | st.dictionaries(
    st.text(min_size=1, max_size=8), st.floats(-1e300, 1e300), min_size=1, max_size=3
)


@given(
    st.builds(
        wire.TrainingJob,
        id=st.integers(min_value=1, max_value=2**40),
        alert_id=_counts,
        created_at=_moments,
        started_at=_moments,
        finished_at=_moments,
        updated_at=_moments,
        new_version=_names,
        window_start=_moments,
        window_end=_moments,
        window_rows=_counts,
        train_rows=_counts,
        holdout_rows=_counts,
        champion_metrics=_metrics,
        challenger_metrics=_metrics,
        rollout_id=_names,
        champion_version=_names,
        family=_names,
        lease_expires_at=_moments,
    )
)
def test_a_training_job_round_trips_through_the_store_message(job: wire.TrainingJob) -> None:
    """The store writes the record and the trainer and the monitor read it with one pair of
    converters: nothing is lost, and "none" stays None (not 0 or "")."""
    assert wire.job_from_pb(wire.job_to_pb(job)) == job


def test_an_empty_job_message_reads_as_none_not_zero() -> None:
    job = wire.job_from_pb(pb.TrainingJob(id=3, model="m", state="queued"))
    assert (job.alert_id, job.new_version, job.window_rows, job.champion_metrics) == (
        None,
        None,
        None,
        None,
    )
    assert job.created_at is None and job.owner == ""
