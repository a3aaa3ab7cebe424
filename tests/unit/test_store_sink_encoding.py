"""The store sink's batch encoding: the JSON it writes per row is what `json.dumps` of the
row's dict would be, whichever shortcut made it (row templates, value templates)."""

from __future__ import annotations

import json

import numpy as np

from services.inference.batching import Prepared
from services.inference.model import Outputs
from services.inference.store_sink import Submitted, encode_items


def _regression(block: np.ndarray, names: tuple[str, ...], values: np.ndarray) -> Submitted:
    rows = block.shape[1]
    outputs = Outputs(rows, values=values)
    ids = [f"id{i}" for i in range(rows)]
    return Submitted("m", "1", ids, Prepared(None, rows, block, names), outputs, (), 1.0, "t")


def _rows(items: list[Submitted]) -> list[tuple[dict[str, object], object]]:
    request = encode_items(items)
    return [(json.loads(r.input_json), json.loads(r.output_json)) for r in request.records]


def test_block_rows_are_the_json_of_their_values() -> None:
    rng = np.random.default_rng(3)
    names = ("age", 'he said "hi"', "100%", "naïve")
    blocks = [rng.normal(size=(4, 2)).astype(np.float32) for _ in range(3)]
    values = [rng.normal(size=2).astype(np.float32) for _ in range(3)]
    items = [_regression(b, names, v) for b, v in zip(blocks, values, strict=True)]
    expected = [
        (dict(zip(names, row, strict=True)), {"value": value})
        for block, vals in zip(blocks, values, strict=True)
        for row, value in zip(block.T.tolist(), vals.tolist(), strict=True)
    ]
    assert _rows(items) == expected
    # Byte for byte what json.dumps writes, so the stored text does not depend on the path.
    first = encode_items(items[:1]).records[0]
    row = dict(zip(names, blocks[0][:, 0].tolist(), strict=True))
    assert first.input_json == json.dumps(row).encode()
    assert first.output_json == json.dumps({"value": values[0][0].item()}).encode()


def test_a_non_finite_output_is_written_as_json_dumps_writes_it() -> None:
    block = np.ones((2, 2), dtype=np.float64)
    item = _regression(block, ("a", "b"), np.array([np.nan, 2.5]))
    records = encode_items([item]).records
    assert [r.output_json for r in records] == [b'{"value": NaN}', b'{"value": 2.5}']
    assert [json.loads(r.input_json) for r in records] == [{"a": 1.0, "b": 1.0}] * 2
