"""The store benchmark's recomputable ids: what its seeding and its label sampling rely on."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

from bench.store_scale import Layout, _labelled, _seed_slice
from services.store.db.copy_binary import _SIGNATURE
from services.store.db.types import uuid7_time


def _layout(total: int = 50_000_000, days: float = 75) -> Layout:
    span = timedelta(days=days)
    return Layout(datetime(2026, 12, 7, tzinfo=UTC) - span, span / total, total)


def test_row_ids_are_uuid7_of_the_row_s_millisecond_and_unique() -> None:
    layout = _layout()
    rows = [0, 1, 2, 12_345, 33_333_333, 49_999_999]
    ids = [uuid.UUID(layout.pid(i)) for i in rows]
    for i, u in zip(rows, ids, strict=True):
        assert u.version == 7 and u.variant == uuid.RFC_4122
        at = layout.at(i)
        # created_at is the id's millisecond: the row's time, truncated to the millisecond.
        assert uuid7_time(u) == at.replace(microsecond=at.microsecond // 1000 * 1000)
    # Rows a fraction of a millisecond apart share the millisecond but not the id.
    assert len(set(ids)) == len(ids)
    assert len({layout.pid(i) for i in range(10_000)}) == 10_000


def test_ids_order_as_rows_do() -> None:
    layout = _layout(total=1_000, days=1)
    ids = [uuid.UUID(layout.pid(i)) for i in range(1_000)]
    assert ids == sorted(ids)


def test_a_seed_slice_is_a_copy_payload_with_a_fifth_labelled() -> None:
    layout = _layout(total=1_000, days=1)
    payload, labels, first, last = _seed_slice(layout, 100, 200)
    assert payload.startswith(_SIGNATURE) and payload.endswith(b"\xff\xff")
    lines = labels.decode().splitlines()
    assert len(lines) == 20 == len(_labelled(100, 200))
    assert lines[0].split("\t")[0] == layout.pid(100)
    assert (first, last) == (uuid7_time(layout.pid(100)), uuid7_time(layout.pid(199)))
    # Slices that do not start on a multiple of five label the same rows a whole stage would.
    assert list(_labelled(3, 13)) == [5, 10]
