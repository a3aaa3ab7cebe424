"""Draining the store sink: every pending row in serving order, with the event loop let in
while hundreds of rows are encoded."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from cyclone.models.repository import ModelRepository
from services.inference.batching import Prepared
from services.inference.model import LoadedModel
from services.inference.store_sink import ENCODE_SLICE, StoreSink

if TYPE_CHECKING:
    from tests.conftest import ModelRepo


async def test_drain_keeps_order_and_lets_the_loop_run(
    model_repo: ModelRepo, tmp_path: Path
) -> None:
    model = LoadedModel(ModelRepository(model_repo.root).files("bench"))
    sink = StoreSink("127.0.0.1:1", tmp_path / "spool")  # never started: nothing is sent
    rows = 5 * ENCODE_SLICE + 3
    x = model_repo.bench_x[:rows].astype(np.float32)
    for i in range(rows):
        block = x[i : i + 1].T
        outputs = model.run(model.feed_block(block, {}), 1)
        sink.submit(
            model, [f"id-{i}"], Prepared(None, 1, block, model.feature_names), outputs, 1.0, ""
        )

    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0)

    running = asyncio.create_task(ticker())
    await asyncio.sleep(0)
    before = ticks
    request = await sink._drain()
    running.cancel()

    assert request is not None
    assert [r.prediction_id for r in request.records] == [f"id-{i}" for i in range(rows)]
    first = json.loads(request.records[0].input_json)
    assert list(first) == list(model.feature_names)
    assert first["f0"] == float(x[0, 0])
    assert ticks - before >= 5, "the loop ran between slices"
    assert await sink._drain() is None, "nothing left behind"
    sink.spool.close()
