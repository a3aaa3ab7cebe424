"""A serving pool member over real gRPC: versions load on their first request (callers wait,
none fail), the least recently used is evicted past the memory budget and loads again when asked
for; a version that cannot be loaded is NOT_FOUND naming it; bad settings name the field."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import pytest
from grpc import aio
from support import expect_error

from cyclone.client import build_request
from cyclone.inference.v1 import inference_service_pb2 as pb
from cyclone.inference.v1 import inference_service_pb2_grpc as pb_grpc
from cyclone.models.convert import import_pipeline
from cyclone.settings import SettingsError
from cyclone.wire import POOL_MODEL_HEADER, POOL_VERSION_HEADER
from cyclone_app.examples import credit_frame, credit_pipeline
from services.inference.main import InferenceSettings

if TYPE_CHECKING:
    from tests.conftest import RunningServer

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

MODELS = ("m0", "m1", "m2")


@pytest.fixture(scope="module")
def pool_repo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any]:
    """Three small classifiers, two versions of `m0`."""
    root = tmp_path_factory.mktemp("pool-repo")
    frame = credit_frame(300, seed=1)
    pipeline = credit_pipeline(frame)
    for name in MODELS:
        import_pipeline(pipeline, name, root, sample=frame)
    import_pipeline(credit_pipeline(credit_frame(300, seed=2)), "m0", root, sample=frame)
    return root, frame


@contextlib.asynccontextmanager
async def pool_server(
    start: Callable[..., contextlib.AbstractAsyncContextManager[RunningServer]],
    root: Path,
    budget_mb: float,
) -> AsyncIterator[tuple[RunningServer, pb_grpc.InferenceServiceStub]]:
    async with (
        start(model_repository=root, pool_memory_mb=budget_mb) as running,
        aio.insecure_channel(running.address) as channel,
    ):
        yield running, pb_grpc.InferenceServiceStub(channel)


def _request(model: str, frame: Any) -> pb.PredictRequest:
    from cyclone_app.examples import CREDIT_FEATURES

    return build_request(model, frame[CREDIT_FEATURES].head(3).to_dict(orient="records"))


def _as_cluster(model: str, version: str) -> list[tuple[str, str]]:
    """The headers a pooled revision's Envoy cluster adds."""
    return [(POOL_MODEL_HEADER, model), (POOL_VERSION_HEADER, version)]


async def test_loads_on_first_request_evicts_lru_and_reloads(
    start_inference_server: Any, pool_repo: tuple[Path, Any]
) -> None:
    root, frame = pool_repo
    async with pool_server(start_inference_server, root, budget_mb=512) as (running, stub):
        pool = running.scorer.catalog.pool
        assert pool.models() == []  # nothing loaded before a request asks
        # Many callers of a version nobody loaded yet: all answered, one load.
        replies = await asyncio.gather(*(stub.Predict(_request("m1", frame)) for _ in range(8)))
        assert all(len(r.prediction_ids) == 3 for r in replies)
        assert pool.loads == 1
        await stub.Predict(_request("m2", frame))
        # A budget that holds exactly what is loaded now (m1 and m2): one more is past it.
        pool.budget_bytes = pool.used_bytes
        await stub.Predict(_request("m1", frame))  # m1 is now the most recently used
        await stub.Predict(_request("m0", frame), metadata=_as_cluster("m0", "1"))
        loaded = {(m.name, m.version) for m in pool.models()}
        assert pool.recently_evicted[0] == ("m2", "1")  # the least recently used first
        assert ("m0", "1") in loaded and ("m2", "1") not in loaded
        # Within the budget, unless the newest alone is over it (then it is all that is kept).
        assert pool.used_bytes <= pool.budget_bytes or loaded == {("m0", "1")}
        loads = pool.loads
        reply = await stub.Predict(_request("m2", frame))  # evicted: loaded again, answered
        assert reply.version == "1"
        assert pool.loads == loads + 1
        assert ("m2", "1") in {(m.name, m.version) for m in pool.models()}


async def test_cluster_headers_choose_the_version(
    start_inference_server: Any, pool_repo: tuple[Path, Any]
) -> None:
    root, frame = pool_repo
    async with pool_server(start_inference_server, root, budget_mb=512) as (_, stub):
        for version in ("1", "2"):
            reply = await stub.Predict(_request("m0", frame), metadata=_as_cluster("m0", version))
            assert reply.version == version
        # Without the headers (a caller reaching the process directly): the latest version.
        assert (await stub.Predict(_request("m0", frame))).version == "2"
        # A stream of one cluster's version.
        call = stub.PredictStream(metadata=_as_cluster("m0", "1"))
        await call.write(pb.PredictStreamRequest(request=_request("m0", frame)))
        await call.done_writing()
        answers = [message async for message in call]
        assert answers[0].response.version == "1"


async def test_a_version_that_cannot_load_is_not_found_naming_it(
    start_inference_server: Any, pool_repo: tuple[Path, Any]
) -> None:
    root, frame = pool_repo
    async with pool_server(start_inference_server, root, budget_mb=512) as (_, stub):
        await expect_error(
            stub.Predict(_request("m0", frame), metadata=_as_cluster("m0", "7")),
            grpc.StatusCode.NOT_FOUND,
            "'m0' version '7'",
        )
        await expect_error(
            stub.Predict(_request("nope", frame)), grpc.StatusCode.NOT_FOUND, "'nope'"
        )
        # The pool still serves the others.
        assert (await stub.Predict(_request("m1", frame))).version == "1"


async def test_a_request_naming_another_model_than_its_route_names_the_callers_field(
    start_inference_server: Any, pool_repo: tuple[Path, Any]
) -> None:
    """The route (cluster headers) serves m0 v1; a body naming m1, or m0 v2, is refused naming
    the field of the API that was called: `model`/`version` on the Cyclone API,
    `model_name`/`model_version` on the Open Inference Protocol."""
    from cyclone.oip.v2 import open_inference_pb2 as oip_pb
    from cyclone.oip.v2 import open_inference_pb2_grpc as oip_grpc

    root, frame = pool_repo
    route = _as_cluster("m0", "1")
    async with pool_server(start_inference_server, root, budget_mb=512) as (running, stub):
        failed = grpc.StatusCode.FAILED_PRECONDITION
        missing = grpc.StatusCode.NOT_FOUND
        details = await expect_error(
            stub.Predict(_request("m1", frame), metadata=route), failed, "serves 'm0'"
        )
        assert details.startswith("model: "), details
        versioned = _request("m0", frame)
        versioned.version = "2"
        details = await expect_error(stub.Predict(versioned, metadata=route), missing, "'2'")
        assert details.startswith("version: "), details
        async with aio.insecure_channel(running.address) as channel:
            oip = oip_grpc.GRPCInferenceServiceStub(channel)
            details = await expect_error(
                oip.ModelInfer(oip_pb.ModelInferRequest(model_name="m1"), metadata=route),
                failed,
                "serves 'm0'",
            )
            assert details.startswith("model_name: "), details
            details = await expect_error(
                oip.ModelInfer(
                    oip_pb.ModelInferRequest(model_name="m0", model_version="2"), metadata=route
                ),
                missing,
                "'2'",
            )
            assert details.startswith("model_version: "), details
            details = await expect_error(
                oip.ModelMetadata(oip_pb.ModelMetadataRequest(name="m1"), metadata=route),
                failed,
            )
            assert details.startswith("name: "), details


def test_bad_pool_settings_name_the_field(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="pool_memory_mb: must be more than 0"):
        InferenceSettings(model_repository=tmp_path, pool_memory_mb=0)
    with pytest.raises(SettingsError, match=r"pool_memory_mb: .* do not also give model"):
        InferenceSettings(model_repository=tmp_path, pool_memory_mb=64, model="credit")
