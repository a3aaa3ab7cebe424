"""UUIDv7 prediction ids: layout, ordering and embedded time."""

from __future__ import annotations

import itertools
import threading
import time
import uuid
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cyclone.ids import _format, uuid7, uuid7_batch, uuid7_time


def _check_layout(value: str) -> uuid.UUID:
    parsed = uuid.UUID(value)
    assert str(parsed) == value, "ids are canonical lower-case strings"
    assert parsed.version == 7
    assert parsed.variant == uuid.RFC_4122
    # Raw bits as well, independent of the uuid module's interpretation.
    assert (parsed.int >> 76) & 0xF == 0x7
    assert (parsed.int >> 62) & 0x3 == 0b10
    return parsed


def test_single_id_has_version_and_variant_bits() -> None:
    _check_layout(uuid7())


def test_batch_ids_have_version_and_variant_bits() -> None:
    for value in uuid7_batch(100):
        _check_layout(value)


def test_batch_returns_exactly_n() -> None:
    assert uuid7_batch(0) == []
    assert len(uuid7_batch(1)) == 1
    assert len(uuid7_batch(4097)) == 4097


def test_ids_strictly_increase_across_calls() -> None:
    ids = [uuid7() for _ in range(10_000)]
    as_ints = [uuid.UUID(i).int for i in ids]
    assert all(a < b for a, b in itertools.pairwise(as_ints))
    # String order is the same as numeric order (the store sorts by text too).
    assert ids == sorted(ids)


def test_batch_larger_than_counter_space_strictly_increases() -> None:
    # > 4096 ids in one call cannot share one millisecond's 12-bit counter.
    ids = uuid7_batch(10_000)
    as_ints = [uuid.UUID(i).int for i in ids]
    assert len(set(as_ints)) == len(as_ints)
    assert all(a < b for a, b in itertools.pairwise(as_ints))


def test_consecutive_batches_strictly_increase() -> None:
    batches = [uuid7_batch(3000) for _ in range(5)]
    flat = [uuid.UUID(i).int for batch in batches for i in batch]
    assert all(a < b for a, b in itertools.pairwise(flat))


def test_ids_from_many_threads_are_unique_and_ordered_per_thread() -> None:
    results: list[list[str]] = []
    lock = threading.Lock()

    def work() -> None:
        mine = [uuid7() for _ in range(2000)] + uuid7_batch(2000)
        with lock:
            results.append(mine)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    everything = [i for r in results for i in r]
    assert len(set(everything)) == len(everything) == 16_000
    for r in results:
        assert r == sorted(r)


def test_uuid7_time_round_trip() -> None:
    before = datetime.fromtimestamp(time.time_ns() // 1_000_000 / 1000, tz=UTC)
    value = uuid7()
    after = datetime.now(UTC)
    embedded = uuid7_time(value)
    assert embedded.tzinfo is not None
    # The counter may borrow a few milliseconds ahead after a burst of ids.
    assert before <= embedded <= after + timedelta(milliseconds=50)
    assert uuid7_time(uuid.UUID(value)) == embedded


def test_uuid7_time_is_the_top_48_bits() -> None:
    ms = 1_700_000_000_123
    value = uuid.UUID(int=(ms << 80) | (0x7 << 76) | (0b10 << 62) | 42)
    assert uuid7_time(value) == datetime(2023, 11, 14, 22, 13, 20, 123000, tzinfo=UTC)
    assert uuid7_time(str(value)) == uuid7_time(value)


def test_uuid7_time_of_batch_is_monotonic() -> None:
    times = [uuid7_time(i) for i in uuid7_batch(9000)]
    assert times == sorted(times)


def test_uuid7_time_rejects_other_versions() -> None:
    with pytest.raises(ValueError, match="not a UUIDv7"):
        uuid7_time(str(uuid.uuid4()))


def test_uuid7_time_rejects_garbage() -> None:
    with pytest.raises(ValueError):
        uuid7_time("not-a-uuid")


@given(st.integers(0, 2**64 - 1), st.integers(0, 2**64 - 1))
def test_hand_written_format_matches_the_uuid_module(high: int, low: int) -> None:
    # The hot path formats ids itself; any 128 bits must read as the uuid module writes them.
    assert _format(high, low) == str(uuid.UUID(int=(high << 64) | low))
