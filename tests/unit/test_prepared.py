"""A validated request given as its numeric block alone: columns only when asked."""

from __future__ import annotations

import numpy as np
import pytest

from services.inference.batching import Prepared


def test_columns_are_views_of_the_block_made_on_first_use() -> None:
    block = np.arange(6, dtype=np.float32).reshape(3, 2)  # 3 features, 2 rows
    job = Prepared(None, 2, block, ("a", "b", "c"))
    assert job.whole_block
    columns = job.columns
    assert list(columns) == ["a", "b", "c"]
    assert columns["b"].tolist() == [2.0, 3.0]
    assert np.shares_memory(columns["c"], block)
    assert job.columns is columns  # made once


def test_given_columns_are_kept_as_they_are() -> None:
    columns = {"a": np.array([1.0]), "city": np.array(["x"], dtype=object)}
    job = Prepared(columns, 1, np.array([[1.0]]))
    assert not job.whole_block
    assert job.columns is columns


@pytest.mark.parametrize(
    ("block", "names"),
    [(None, ("a",)), (np.zeros((2, 1)), ("a",)), (np.zeros((1, 1)), ())],
)
def test_a_block_alone_needs_one_name_per_row(
    block: np.ndarray | None, names: tuple[str, ...]
) -> None:
    with pytest.raises(ValueError, match="one name per block row"):
        Prepared(None, 1, block, names)
