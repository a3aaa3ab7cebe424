"""Garbage collection settings of a long-running server (cyclone.heap)."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator

import pytest

from cyclone import heap


@pytest.fixture(autouse=True)
def _restore_gc() -> Iterator[None]:
    thresholds = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*thresholds)
    heap._settled = False


class Node:
    def __init__(self) -> None:
        self.me = self  # a reference cycle: only the collector frees it


def test_tune_raises_the_young_generation_threshold() -> None:
    heap.tune()
    assert gc.get_threshold() == heap.THRESHOLDS
    assert gc.get_threshold()[0] > 700


def test_settle_freezes_what_is_alive_and_later_garbage_is_still_collected() -> None:
    heap.settle()
    assert gc.get_freeze_count() > 0
    ref = weakref.ref(Node())
    gc.collect()
    assert ref() is None


def test_a_cycle_frozen_at_start_up_is_freed_by_resettle_once_dropped() -> None:
    node = Node()
    ref = weakref.ref(node)
    heap.settle()
    del node
    gc.collect()
    assert ref() is not None, "frozen objects are out of reach of collections"
    heap.resettle()
    assert ref() is None
    assert gc.get_freeze_count() > 0, "and the heap is frozen again"


def test_resettle_before_start_up_is_done_changes_nothing() -> None:
    heap.resettle()
    assert gc.get_freeze_count() == 0
