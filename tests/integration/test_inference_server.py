"""The inference server over real gRPC: Predict, streams, metadata, health, metrics, errors."""

from __future__ import annotations

import asyncio
import shutil
import threading
import time
import urllib.request
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import numpy as np
import pytest
import yaml
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families
from support import expect_error

from cyclone.client import build_request
from cyclone.ids import uuid7_time
from cyclone.inference.v1 import inference_service_pb2 as pb
from cyclone.inference.v1 import inference_service_pb2_grpc as pb_grpc

pytestmark = pytest.mark.integration

SERVICE = "cyclone.inference.v1.InferenceService"
Starter = Callable[..., AbstractAsyncContextManager["RunningServer"]]

if TYPE_CHECKING:
    from tests.conftest import ModelRepo, RunningServer

CREDIT = "credit"
BENCH = "bench"


@pytest.fixture
async def channel(inference_server: RunningServer) -> AsyncIterator[aio.Channel]:
    async with aio.insecure_channel(inference_server.address) as ch:
        yield ch


@pytest.fixture
def stub(channel: aio.Channel) -> pb_grpc.InferenceServiceStub:
    return pb_grpc.InferenceServiceStub(channel)


def credit_request(
    repo: ModelRepo, rows: int = 5, start: int = 0, request_id: str = ""
) -> pb.PredictRequest:
    frame = repo.credit_rows.iloc[start : start + rows]
    request = build_request(CREDIT, frame.to_dict(orient="records"))
    request.request_id = request_id
    return request


def bench_request(repo: ModelRepo, rows: int = 5, start: int = 0) -> pb.PredictRequest:
    x = repo.bench_x[start : start + rows]
    return build_request(BENCH, {f"f{i}": x[:, i].tolist() for i in range(x.shape[1])})


def assert_uuid7s(ids: list[str], count: int) -> None:
    assert len(ids) == count
    assert len(set(ids)) == count
    for value in ids:
        assert uuid.UUID(value).version == 7
        uuid7_time(value)
    assert ids == sorted(ids)


# -- happy paths --------------------------------------------------------------------------------


async def test_predict_classifier_matches_sklearn(
    stub: pb_grpc.InferenceServiceStub, model_repo: ModelRepo
) -> None:
    rows = 60
    response = await stub.Predict(credit_request(model_repo, rows=rows, request_id="req-1"))
    frame = model_repo.credit_rows.iloc[:rows]
    assert response.model == CREDIT and response.version == "1"
    assert response.request_id == "req-1"
    assert not response.values
    classes = list(response.class_labels)
    assert classes == [str(c) for c in model_repo.credit_pipeline.classes_]
    probabilities = np.array(response.probabilities).reshape(rows, len(classes))
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(
        probabilities, model_repo.credit_pipeline.predict_proba(frame), atol=1e-5
    )
    assert set(response.labels) <= set(classes)
    assert list(response.labels) == [str(v) for v in model_repo.credit_pipeline.predict(frame)]
    assert_uuid7s(list(response.prediction_ids), rows)


async def test_predict_regressor_matches_sklearn(
    stub: pb_grpc.InferenceServiceStub, model_repo: ModelRepo
) -> None:
    response = await stub.Predict(bench_request(model_repo, rows=40, start=100))
    expected = model_repo.bench_model.predict(model_repo.bench_x[100:140])
    assert response.model == BENCH
    assert not response.labels and not response.probabilities
    np.testing.assert_allclose(np.array(response.values), expected, rtol=1e-4, atol=1e-3)
    assert_uuid7s(list(response.prediction_ids), 40)


async def test_large_batch_matches_sklearn(
    stub: pb_grpc.InferenceServiceStub, model_repo: ModelRepo
) -> None:
    # More than OFFLOAD_ROWS rows take the worker-thread path.
    response = await stub.Predict(bench_request(model_repo, rows=1000))
    expected = model_repo.bench_model.predict(model_repo.bench_x[:1000])
    np.testing.assert_allclose(np.array(response.values), expected, rtol=1e-4, atol=1e-3)
    assert_uuid7s(list(response.prediction_ids), 1000)


async def test_ids_unique_across_requests(
    stub: pb_grpc.InferenceServiceStub, model_repo: ModelRepo
) -> None:
    first = await stub.Predict(credit_request(model_repo, rows=10))
    second = await stub.Predict(credit_request(model_repo, rows=10))
    ids = list(first.prediction_ids) + list(second.prediction_ids)
    assert_uuid7s(ids, 20)


async def test_get_model_and_list_models(
    stub: pb_grpc.InferenceServiceStub, model_repo: ModelRepo
) -> None:
    info = (await stub.GetModel(pb.GetModelRequest(model=CREDIT))).model
    assert info.name == CREDIT and info.version == "1"
    assert info.task == pb.TASK_CLASSIFICATION
    assert [f.name for f in info.features] == ["age", "income", "debt_ratio", "city"]
    kinds = {f.name: f.kind for f in info.features}
    assert kinds["city"] == pb.FEATURE_KIND_CATEGORICAL
    assert kinds["age"] == pb.FEATURE_KIND_NUMERIC
    assert list(info.class_labels) == ["0", "1"]
    schema = yaml.safe_load((model_repo.root / CREDIT / "1" / "model.yaml").read_text())
    assert info.sha256 == schema["sha256"]
    assert info.max_batch_rows == 10_000
    assert not info.features[0].HasField("min")

    same = (await stub.GetModel(pb.GetModelRequest(model=CREDIT, version="1"))).model
    assert same == info

    listed = (await stub.ListModels(pb.ListModelsRequest())).models
    assert sorted(m.name for m in listed) == [BENCH, CREDIT]
    bench = next(m for m in listed if m.name == BENCH)
    assert bench.task == pb.TASK_REGRESSION
    assert [f.name for f in bench.features] == [f"f{i}" for i in range(12)]


async def test_get_model_unknown(stub: pb_grpc.InferenceServiceStub) -> None:
    await expect_error(
        stub.GetModel(pb.GetModelRequest(model="nope")), grpc.StatusCode.NOT_FOUND, "model", "nope"
    )
    await expect_error(
        stub.GetModel(pb.GetModelRequest(model=CREDIT, version="9")),
        grpc.StatusCode.NOT_FOUND,
        "version",
    )


async def test_predict_stream_keeps_order_and_survives_bad_message(
    stub: pb_grpc.InferenceServiceStub, model_repo: ModelRepo
) -> None:
    bad = credit_request(model_repo, rows=2)
    bad.features["age"].strings.append("old")
    requests = [
        credit_request(model_repo, rows=3, start=0, request_id="a"),
        bench_request(model_repo, rows=2),
        bad,
        credit_request(model_repo, rows=4, start=10, request_id="d"),
        pb.PredictRequest(model="nope"),
        bench_request(model_repo, rows=1, start=7),
    ]
    call = stub.PredictStream(pb.PredictStreamRequest(request=r) for r in requests)
    responses = [r async for r in call]
    assert await call.code() == grpc.StatusCode.OK
    assert len(responses) == len(requests)
    ok = [0, 1, 3, 5]
    for i in ok:
        assert responses[i].error_code == 0, responses[i].error_message
        assert responses[i].HasField("response")
    assert responses[0].response.request_id == "a" and len(responses[0].response.labels) == 3
    assert responses[1].response.model == BENCH and len(responses[1].response.values) == 2
    assert responses[3].response.request_id == "d" and len(responses[3].response.labels) == 4
    frame = model_repo.credit_rows.iloc[10:14]
    np.testing.assert_allclose(
        np.array(responses[3].response.probabilities).reshape(4, 2),
        model_repo.credit_pipeline.predict_proba(frame),
        atol=1e-5,
    )
    np.testing.assert_allclose(
        responses[5].response.values,
        model_repo.bench_model.predict(model_repo.bench_x[7:8]),
        rtol=1e-4,
        atol=1e-3,
    )
    assert responses[2].error_code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "features.age" in responses[2].error_message
    assert not responses[2].HasField("response")
    assert responses[4].error_code == grpc.StatusCode.NOT_FOUND.value[0]
    assert "nope" in responses[4].error_message


async def test_health_reports_serving(channel: aio.Channel) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", SERVICE, "inference.GRPCInferenceService"):
        reply = await health.Check(health_pb2.HealthCheckRequest(service=service))
        assert reply.status == health_pb2.HealthCheckResponse.SERVING, service
    await expect_error(
        health.Check(health_pb2.HealthCheckRequest(service="no.such.Service")),
        grpc.StatusCode.NOT_FOUND,
    )


async def test_reflection_lists_services(channel: aio.Channel) -> None:
    reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
    call = reflection.ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")])
    )
    replies = [r async for r in call]
    names = {s.name for s in replies[0].list_services_response.service}
    assert {SERVICE, "inference.GRPCInferenceService", "grpc.health.v1.Health"} <= names
    assert any("reflection" in n for n in names)


async def test_request_id_echoed_in_trailing_metadata(
    stub: pb_grpc.InferenceServiceStub, model_repo: ModelRepo
) -> None:
    call = stub.Predict(
        credit_request(model_repo, rows=1), metadata=(("x-request-id", "trace-me-42"),)
    )
    await call
    assert ("x-request-id", "trace-me-42") in tuple(await call.trailing_metadata())

    call = stub.Predict(credit_request(model_repo, rows=1))
    await call
    generated = dict(tuple(await call.trailing_metadata())).get("x-request-id")
    assert generated, "a request without x-request-id gets one"


async def test_request_id_echoed_on_error(stub: pb_grpc.InferenceServiceStub) -> None:
    call = stub.Predict(pb.PredictRequest(model="nope"), metadata=(("x-request-id", "failing-7"),))
    with pytest.raises(aio.AioRpcError) as info:
        await call
    trailing = info.value.trailing_metadata() or ()
    assert ("x-request-id", "failing-7") in tuple(trailing)


def _scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        text = reply.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def _value(samples: dict[Any, float], name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


async def test_metrics_count_requests_and_errors(
    start_inference_server: Starter, model_repo: ModelRepo
) -> None:
    async with start_inference_server(metrics_port=0) as running:
        assert running.server.metrics_port > 0
        before = await asyncio.to_thread(_scrape, running.server.metrics_port)
        async with aio.insecure_channel(running.address) as channel:
            stub = pb_grpc.InferenceServiceStub(channel)
            for _ in range(3):
                await stub.Predict(credit_request(model_repo, rows=2))
            with pytest.raises(aio.AioRpcError):
                await stub.Predict(pb.PredictRequest(model="nope"))
            with pytest.raises(aio.AioRpcError):
                await stub.Predict(pb.PredictRequest(model=CREDIT))
            await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
        after = await asyncio.to_thread(_scrape, running.server.metrics_port)
    labels = {"service": SERVICE, "method": "Predict"}

    def delta(name: str, **extra: str) -> float:
        return _value(after, name, **labels, **extra) - _value(before, name, **labels, **extra)

    assert delta("cyclone_grpc_requests_total") == 5
    assert delta("cyclone_grpc_errors_total", code="NOT_FOUND") == 1
    assert delta("cyclone_grpc_errors_total", code="INVALID_ARGUMENT") == 1
    assert delta("cyclone_grpc_latency_seconds_count") == 5
    health = {"service": "grpc.health.v1.Health", "method": "Check"}
    assert _value(after, "cyclone_grpc_requests_total", **health) == 0


class _SlowSession:
    """Wraps an onnxruntime session: every run waits first, so a call stays in flight."""

    def __init__(self, inner: Any, delay: float) -> None:
        self._inner = inner
        self._delay = delay
        self.started = threading.Event()

    def run(self, *args: Any, **kwargs: Any) -> Any:
        self.started.set()
        time.sleep(self._delay)
        return self._inner.run(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


async def test_graceful_stop_finishes_call_in_flight(
    start_inference_server: Starter, model_repo: ModelRepo
) -> None:
    async with start_inference_server() as running:
        model = running.scorer.catalog.get(BENCH)
        slow = _SlowSession(model.session, delay=0.7)
        model.session = slow
        async with aio.insecure_channel(running.address) as channel:
            stub = pb_grpc.InferenceServiceStub(channel)
            # A batch this large is scored in a worker thread, so the event loop stays free.
            in_flight = asyncio.ensure_future(stub.Predict(bench_request(model_repo, rows=600)))
            assert await asyncio.to_thread(slow.started.wait, 5), "the call never reached the model"
            assert not in_flight.done()
            await running.server.stop(5)
            response = await asyncio.wait_for(in_flight, 5)
            np.testing.assert_allclose(
                np.array(response.values),
                model_repo.bench_model.predict(model_repo.bench_x[:600]),
                rtol=1e-4,
                atol=1e-3,
            )
            assert_uuid7s(list(response.prediction_ids), 600)
            with pytest.raises(aio.AioRpcError) as info:
                await stub.Predict(credit_request(model_repo, rows=1), timeout=2)
            assert info.value.code() in (
                grpc.StatusCode.UNAVAILABLE,
                grpc.StatusCode.DEADLINE_EXCEEDED,
            )


# -- bad input over the wire --------------------------------------------------------------------


def _with(
    request: pb.PredictRequest, edit: Callable[[pb.PredictRequest], None]
) -> pb.PredictRequest:
    copy = pb.PredictRequest()
    copy.CopyFrom(request)
    edit(copy)
    return copy


def _set_numbers(name: str, values: list[float]) -> Callable[[pb.PredictRequest], None]:
    def edit(r: pb.PredictRequest) -> None:
        del r.features[name].numbers[:]
        r.features[name].numbers.extend(values)

    return edit


def _bad_requests(
    repo: ModelRepo,
) -> list[tuple[str, pb.PredictRequest, grpc.StatusCode, tuple[str, ...]]]:
    good = credit_request(repo, rows=3)
    invalid = grpc.StatusCode.INVALID_ARGUMENT
    empty_columns = pb.PredictRequest(model=BENCH)
    for i in range(12):
        empty_columns.features[f"f{i}"].numbers.extend([])
        empty_columns.features[f"f{i}"].SetInParent()
    return [
        (
            "unknown model",
            _with(good, lambda r: setattr(r, "model", "nope")),
            grpc.StatusCode.NOT_FOUND,
            ("model", "'nope'"),
        ),
        (
            "unknown version",
            _with(good, lambda r: setattr(r, "version", "42")),
            grpc.StatusCode.NOT_FOUND,
            ("version", "'42'"),
        ),
        (
            "missing feature",
            _with(good, lambda r: r.features.pop("income")),
            invalid,
            ("features.income", "missing"),
        ),
        (
            "unknown feature",
            _with(good, lambda r: r.features["salary"].numbers.extend([1, 2, 3])),
            invalid,
            ("features.salary", "unknown feature"),
        ),
        (
            "strings for numeric",
            _with(
                good,
                lambda r: r.features["age"].CopyFrom(pb.FeatureColumn(strings=["a", "b", "c"])),
            ),
            invalid,
            ("features.age", "expected numbers"),
        ),
        (
            "numbers for categorical",
            _with(good, lambda r: r.features["city"].CopyFrom(pb.FeatureColumn(numbers=[1, 2, 3]))),
            invalid,
            ("features.city", "expected strings"),
        ),
        (
            "numbers and strings",
            _with(good, lambda r: r.features["age"].strings.extend(["x", "y", "z"])),
            invalid,
            ("features.age", "not both"),
        ),
        (
            "mismatched lengths",
            _with(good, _set_numbers("debt_ratio", [0.1, 0.2])),
            invalid,
            ("features.debt_ratio", "has 2 values"),
        ),
        (
            "NaN",
            _with(good, _set_numbers("income", [1.0, float("nan"), 2.0])),
            invalid,
            ("features.income", "row 1 is NaN"),
        ),
        (
            "inf",
            _with(good, _set_numbers("age", [float("inf"), 30.0, 40.0])),
            invalid,
            ("features.age", "row 0 is inf"),
        ),
        (
            "empty request",
            pb.PredictRequest(model=CREDIT),
            invalid,
            ("features: none given", "takes age, income", '"features"'),
        ),
        ("no rows", empty_columns, invalid, ("features", "no rows")),
        (
            "no model name",
            _with(good, lambda r: setattr(r, "model", "")),
            grpc.StatusCode.NOT_FOUND,
            ("model",),
        ),
    ]


async def test_bad_requests_rejected_and_server_keeps_serving(
    stub: pb_grpc.InferenceServiceStub, model_repo: ModelRepo
) -> None:
    failures = []
    for label, request, code, fragments in _bad_requests(model_repo):
        try:
            await expect_error(stub.Predict(request), code, *fragments)
        except AssertionError as exc:
            failures.append(f"{label}: {exc}")
        # Still serving after every bad request.
        response = await stub.Predict(credit_request(model_repo, rows=1))
        assert len(response.labels) == 1
    assert not failures, "\n".join(failures)


async def test_zero_rows_for_classifier_names_rows(stub: pb_grpc.InferenceServiceStub) -> None:
    # Every feature present but without values: a zero-row request, whatever the column kinds.
    request = pb.PredictRequest(model=CREDIT)
    for name in ("age", "income", "debt_ratio", "city"):
        request.features[name].SetInParent()
    await expect_error(
        stub.Predict(request), grpc.StatusCode.INVALID_ARGUMENT, "features: the request has no rows"
    )


async def test_more_rows_than_max_batch_rows(
    start_inference_server: Starter, model_repo: ModelRepo
) -> None:
    async with (
        start_inference_server(max_batch_rows=5) as running,
        aio.insecure_channel(running.address) as ch,
    ):
        stub = pb_grpc.InferenceServiceStub(ch)
        assert len((await stub.Predict(credit_request(model_repo, rows=5))).labels) == 5
        await expect_error(
            stub.Predict(credit_request(model_repo, rows=6)),
            grpc.StatusCode.INVALID_ARGUMENT,
            "features: 6 rows is more than the limit of 5",
        )
        info = (await stub.GetModel(pb.GetModelRequest(model=CREDIT))).model
        assert info.max_batch_rows == 5
        assert len((await stub.Predict(credit_request(model_repo, rows=2))).labels) == 2


async def test_oversize_message_resource_exhausted(
    start_inference_server: Starter, model_repo: ModelRepo
) -> None:
    async with (
        start_inference_server(max_message_bytes=64 * 1024) as running,
        aio.insecure_channel(running.address) as ch,
    ):
        stub = pb_grpc.InferenceServiceStub(ch)
        big = bench_request(model_repo, rows=1000)
        assert big.ByteSize() > 64 * 1024
        await expect_error(stub.Predict(big), grpc.StatusCode.RESOURCE_EXHAUSTED)
        response = await stub.Predict(bench_request(model_repo, rows=10))
        np.testing.assert_allclose(
            response.values,
            model_repo.bench_model.predict(model_repo.bench_x[:10]),
            rtol=1e-4,
            atol=1e-3,
        )


def _broken_repository(repo: ModelRepo, tmp_path: Path) -> Path:
    root = repo.copy_to(tmp_path / "repo")
    # `broken`: garbage where the ONNX file was (its checksum no longer matches).
    shutil.copytree(root / CREDIT, root / "broken")
    (root / "broken" / "1" / "model.onnx").write_bytes(b"\x00garbage\xff" * 100)
    # `garbled`: garbage and no checksum, so onnxruntime itself has to refuse it.
    shutil.copytree(root / CREDIT, root / "garbled")
    (root / "garbled" / "1" / "model.onnx").write_bytes(b"not a model")
    schema_path = root / "garbled" / "1" / "model.yaml"
    schema = yaml.safe_load(schema_path.read_text())
    del schema["sha256"]
    schema_path.write_text(yaml.safe_dump(schema))
    return root


async def test_corrupt_model_failed_precondition_others_serve(
    start_inference_server: Starter, model_repo: ModelRepo, tmp_path: Path
) -> None:
    root = _broken_repository(model_repo, tmp_path)
    async with (
        start_inference_server(model_repository=root) as running,
        aio.insecure_channel(running.address) as ch,
    ):
        stub = pb_grpc.InferenceServiceStub(ch)
        request = credit_request(model_repo, rows=2)
        request.model = "broken"
        await expect_error(
            stub.Predict(request),
            grpc.StatusCode.FAILED_PRECONDITION,
            "'broken' failed to load",
            "sha256",
        )
        request.model = "garbled"
        await expect_error(
            stub.Predict(request),
            grpc.StatusCode.FAILED_PRECONDITION,
            "'garbled' failed to load",
            "onnxruntime cannot load it",
        )
        await expect_error(
            stub.GetModel(pb.GetModelRequest(model="broken")), grpc.StatusCode.FAILED_PRECONDITION
        )
        listed = (await stub.ListModels(pb.ListModelsRequest())).models
        assert sorted(m.name for m in listed) == [BENCH, CREDIT]
        response = await stub.Predict(credit_request(model_repo, rows=4))
        np.testing.assert_allclose(
            np.array(response.probabilities).reshape(4, 2),
            model_repo.credit_pipeline.predict_proba(model_repo.credit_rows.iloc[:4]),
            atol=1e-5,
        )
        assert len((await stub.Predict(bench_request(model_repo, rows=3))).values) == 3
