"""Which changed columns stop a retrain (broken: missing, stuck) and which are learned and said
(novel: outside the range seen before, categories never seen)."""

from __future__ import annotations

import numpy as np
import pandas as pd

from services.trainer.auto import broken_features, novel_features

KINDS = (("x", "numeric"), ("city", "categorical"))
SINCE = 200


def frame(x_after: np.ndarray, city_after: list[str]) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    before = pd.DataFrame(
        {"x": rng.normal(0, 1, SINCE), "city": rng.choice(["a", "b", "c"], SINCE)}
    )
    after = pd.DataFrame({"x": x_after, "city": city_after})
    return pd.concat([before, after], ignore_index=True)


def test_a_column_that_moved_is_neither_broken_nor_novel() -> None:
    rng = np.random.default_rng(1)
    f = frame(rng.normal(0.5, 1, 100), list(rng.choice(["a", "b"], 100)))
    assert broken_features(f, KINDS, SINCE) == []
    assert novel_features(f, KINDS, SINCE) == []


def test_missing_and_stuck_columns_are_broken_not_novel() -> None:
    f = frame(np.full(100, np.nan), ["a"] * 100)
    broken = broken_features(f, KINDS, SINCE)
    assert broken[0].startswith("x: missing in 100%")
    assert broken[1].startswith("city: stuck at 'a'")
    assert novel_features(f, KINDS, SINCE) == []


def test_new_scales_and_new_categories_are_novel_not_broken() -> None:
    rng = np.random.default_rng(2)
    f = frame(rng.normal(100, 1, 100), list(rng.choice(["north", "south", "east"], 100)))
    assert broken_features(f, KINDS, SINCE) == []
    novel = novel_features(f, KINDS, SINCE)
    assert novel[0].startswith("x: 100% of values outside [")
    assert novel[1] == "city: 100% of values are categories never seen before"


def test_a_few_new_values_are_not_novel() -> None:
    rng = np.random.default_rng(3)
    city = list(rng.choice(["a", "b", "c"], 100))
    city[:10] = ["z"] * 10
    x = rng.normal(0, 1, 100)
    x[:10] = 50.0
    assert novel_features(frame(x, city), KINDS, SINCE) == []


def test_no_split_point_means_nothing_to_compare() -> None:
    f = frame(np.full(100, np.nan), ["a"] * 100)
    for since in (0, len(f)):
        assert broken_features(f, KINDS, since) == []
        assert novel_features(f, KINDS, since) == []
