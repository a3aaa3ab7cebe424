"""Scoring a request that arrived as one numeric block leaves it a block: its per-feature
columns are never made, so the journal and the store sink take their block paths (making
them cost a logged request ~15 µs on the event loop)."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import numpy as np
import pytest

from cyclone.models.repository import ModelRepository
from cyclone.oip.v2 import open_inference_pb2 as oip
from services.inference import convert, journal
from services.inference.batching import Prepared
from services.inference.dataplane import OFFLOAD_ROWS, DataPlane, StreamJob
from services.inference.model import LoadedModel, Outputs
from services.inference.store_sink import Submitted

if TYPE_CHECKING:
    from tests.conftest import ModelRepo


class _RecordingSink:
    def __init__(self) -> None:
        self.jobs: list[Prepared] = []

    def submit(
        self,
        model: LoadedModel,
        prediction_ids: list[str],
        job: Prepared,
        outputs: Outputs,
        latency_ms: float,
        trace_id: str,
    ) -> None:
        self.jobs.append(job)


def _block_job(model: LoadedModel, x: np.ndarray) -> Prepared:
    request = oip.ModelInferRequest(model_name=model.name)
    request.inputs.add(name="input", datatype="FP32", shape=list(x.shape))
    request.raw_input_contents.append(x.astype("<f4").tobytes())
    job = convert.quick_prepared_from_tensors(model, request)
    assert job is not None and job.whole_block
    return job


@pytest.mark.parametrize("rows", [1, OFFLOAD_ROWS + 1])  # inline, and in a worker thread
async def test_a_block_request_is_scored_and_logged_as_a_block(
    model_repo: ModelRepo, rows: int
) -> None:
    model = LoadedModel(ModelRepository(model_repo.root).files("bench"))
    x = np.resize(model_repo.bench_x, (rows, model_repo.bench_x.shape[1])).astype(np.float32)
    sink = _RecordingSink()
    dataplane = DataPlane(catalog=None, sink=sink)  # type: ignore[arg-type]
    job = _block_job(model, x)
    started = time.perf_counter()
    scored = dataplane.score_inline(model, job, started)
    _, outputs = scored or await dataplane.score(model, job, started)

    assert sink.jobs == [job] and job.whole_block
    expected = model.predict({n: x[:, j] for j, n in enumerate(model.feature_names)})
    assert outputs.values is not None and expected.values is not None
    np.testing.assert_allclose(outputs.values, expected.values, rtol=1e-6)
    # The journal writes it as one block, not a column per feature.
    item = Submitted(model.name, model.version, ["id"] * rows, job, outputs, (), 1.0, "")
    fields: Any = journal.decode(journal.encode(item))
    assert fields[3].whole_block


async def test_a_stream_of_block_requests_stays_blocks(model_repo: ModelRepo) -> None:
    model = LoadedModel(ModelRepository(model_repo.root).files("bench"))
    sink = _RecordingSink()
    dataplane = DataPlane(catalog=None, sink=sink)  # type: ignore[arg-type]
    jobs = [_block_job(model, model_repo.bench_x[i : i + 1]) for i in range(3)]
    results = await dataplane.score_stream(
        [StreamJob(model, job) for job in jobs], time.perf_counter()
    )
    assert not [r for r in results if isinstance(r, Exception)]
    assert all(job.whole_block for job in jobs)
