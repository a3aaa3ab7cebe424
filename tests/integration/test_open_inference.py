"""Open Inference Protocol V2 through Cyclone's generated stubs, and through tritonclient."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
import numpy as np
import pytest
from grpc import aio
from support import expect_error

import cyclone
from cyclone.oip.v2 import open_inference_pb2 as pb
from cyclone.oip.v2 import open_inference_pb2_grpc as pb_grpc

pytestmark = pytest.mark.integration

Starter = Callable[..., AbstractAsyncContextManager["RunningServer"]]
NUMERIC = ("age", "income", "debt_ratio")

if TYPE_CHECKING:
    from tests.conftest import ModelRepo, RunningServer

CREDIT = "credit"
BENCH = "bench"


@pytest.fixture
async def stub(inference_server: RunningServer) -> AsyncIterator[pb_grpc.GRPCInferenceServiceStub]:
    async with aio.insecure_channel(inference_server.address) as channel:
        yield pb_grpc.GRPCInferenceServiceStub(channel)


def encode_bytes(values: list[str]) -> bytes:
    return b"".join(struct.pack("<I", len(v.encode())) + v.encode() for v in values)


def decode_bytes(raw: bytes) -> list[str]:
    out, offset = [], 0
    while offset < len(raw):
        (length,) = struct.unpack_from("<I", raw, offset)
        out.append(raw[offset + 4 : offset + 4 + length].decode())
        offset += 4 + length
    return out


def credit_raw_request(repo: ModelRepo, rows: int, start: int = 0) -> pb.ModelInferRequest:
    frame = repo.credit_rows.iloc[start : start + rows]
    request = pb.ModelInferRequest(model_name=CREDIT, id="raw-1")
    for name in NUMERIC:
        request.inputs.add(name=name, datatype="FP32", shape=[rows, 1])
        request.raw_input_contents.append(frame[name].to_numpy(dtype="<f4").tobytes())
    request.inputs.add(name="city", datatype="BYTES", shape=[rows, 1])
    request.raw_input_contents.append(encode_bytes(frame["city"].tolist()))
    return request


def credit_typed_request(repo: ModelRepo, rows: int, start: int = 0) -> pb.ModelInferRequest:
    frame = repo.credit_rows.iloc[start : start + rows]
    request = pb.ModelInferRequest(model_name=CREDIT)
    for name in NUMERIC:
        tensor = request.inputs.add(name=name, datatype="FP32", shape=[rows])
        tensor.contents.fp32_contents.extend(frame[name].tolist())
    tensor = request.inputs.add(name="city", datatype="BYTES", shape=[rows, 1])
    tensor.contents.bytes_contents.extend(c.encode() for c in frame["city"])
    return request


def bench_raw_request(repo: ModelRepo, rows: int, start: int = 0) -> pb.ModelInferRequest:
    matrix = repo.bench_x[start : start + rows].astype("<f4")
    request = pb.ModelInferRequest(model_name=BENCH)
    request.inputs.add(name="input", datatype="FP32", shape=list(matrix.shape))
    request.raw_input_contents.append(matrix.tobytes())
    return request


def outputs_of(response: pb.ModelInferResponse) -> dict[str, np.ndarray]:
    arrays = {}
    for tensor, raw in zip(response.outputs, response.raw_output_contents, strict=True):
        if tensor.datatype == "BYTES":
            arrays[tensor.name] = np.array(decode_bytes(raw), dtype=object).reshape(
                list(tensor.shape)
            )
        else:
            dtype = {"FP32": "<f4", "FP64": "<f8", "INT64": "<i8"}[tensor.datatype]
            arrays[tensor.name] = np.frombuffer(raw, dtype=dtype).reshape(list(tensor.shape))
    return arrays


def check_credit(
    response: pb.ModelInferResponse, repo: ModelRepo, rows: int, start: int = 0
) -> None:
    frame = repo.credit_rows.iloc[start : start + rows]
    arrays = outputs_of(response)
    assert set(arrays) == {"label", "probabilities"}
    np.testing.assert_allclose(
        arrays["probabilities"], repo.credit_pipeline.predict_proba(frame), atol=1e-5
    )
    np.testing.assert_allclose(arrays["probabilities"].sum(axis=1), 1.0, atol=1e-5)
    assert arrays["label"].ravel().tolist() == repo.credit_pipeline.predict(frame).tolist()


def prediction_ids(response: pb.ModelInferResponse) -> list[str]:
    return response.parameters["cyclone_prediction_ids"].string_param.split(",")


async def test_server_live_ready_metadata(stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    assert (await stub.ServerLive(pb.ServerLiveRequest())).live
    assert (await stub.ServerReady(pb.ServerReadyRequest())).ready
    meta = await stub.ServerMetadata(pb.ServerMetadataRequest())
    assert meta.name == "cyclone"
    assert meta.version == cyclone.__version__
    assert "model_repository" in meta.extensions


async def test_model_ready(stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    assert (await stub.ModelReady(pb.ModelReadyRequest(name=CREDIT))).ready
    assert (await stub.ModelReady(pb.ModelReadyRequest(name=BENCH, version="1"))).ready
    assert not (await stub.ModelReady(pb.ModelReadyRequest(name=CREDIT, version="2"))).ready
    assert not (await stub.ModelReady(pb.ModelReadyRequest(name="nope"))).ready


async def test_model_metadata(stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    meta = await stub.ModelMetadata(pb.ModelMetadataRequest(name=CREDIT))
    assert meta.name == CREDIT and list(meta.versions) == ["1"]
    assert meta.platform == "onnxruntime_onnx"
    inputs = {t.name: (t.datatype, list(t.shape)) for t in meta.inputs}
    assert inputs == {
        "age": ("FP32", [-1, 1]),
        "income": ("FP32", [-1, 1]),
        "debt_ratio": ("FP32", [-1, 1]),
        "city": ("BYTES", [-1, 1]),
    }
    assert {t.name: t.datatype for t in meta.outputs} == {"label": "INT64", "probabilities": "FP32"}

    bench = await stub.ModelMetadata(pb.ModelMetadataRequest(name=BENCH))
    assert [(t.name, t.datatype, list(t.shape)) for t in bench.inputs] == [
        ("input", "FP32", [-1, 12])
    ]
    await expect_error(
        stub.ModelMetadata(pb.ModelMetadataRequest(name="nope")), grpc.StatusCode.NOT_FOUND
    )


async def test_infer_raw_contents(
    stub: pb_grpc.GRPCInferenceServiceStub, model_repo: ModelRepo
) -> None:
    response = await stub.ModelInfer(credit_raw_request(model_repo, rows=25, start=5))
    assert response.model_name == CREDIT and response.model_version == "1"
    assert response.id == "raw-1"
    check_credit(response, model_repo, rows=25, start=5)
    ids = prediction_ids(response)
    assert len(ids) == len(set(ids)) == 25
    assert all(uuid.UUID(i).version == 7 for i in ids)
    assert ids == sorted(ids)


async def test_infer_typed_contents(
    stub: pb_grpc.GRPCInferenceServiceStub, model_repo: ModelRepo
) -> None:
    response = await stub.ModelInfer(credit_typed_request(model_repo, rows=12))
    check_credit(response, model_repo, rows=12)
    assert len(prediction_ids(response)) == 12


async def test_infer_regressor_matrix(
    stub: pb_grpc.GRPCInferenceServiceStub, model_repo: ModelRepo
) -> None:
    response = await stub.ModelInfer(bench_raw_request(model_repo, rows=300, start=50))
    arrays = outputs_of(response)
    assert list(arrays) == ["variable"]
    np.testing.assert_allclose(
        arrays["variable"].ravel(),
        model_repo.bench_model.predict(model_repo.bench_x[50:350]),
        rtol=1e-4,
        atol=1e-3,
    )
    assert len(prediction_ids(response)) == 300


async def test_infer_regressor_typed_fp64(
    stub: pb_grpc.GRPCInferenceServiceStub, model_repo: ModelRepo
) -> None:
    x = model_repo.bench_x[:4]
    request = pb.ModelInferRequest(model_name=BENCH)
    tensor = request.inputs.add(name="input", datatype="FP64", shape=[4, 12])
    tensor.contents.fp64_contents.extend(x.ravel().tolist())
    arrays = outputs_of(await stub.ModelInfer(request))
    np.testing.assert_allclose(
        arrays["variable"].ravel(), model_repo.bench_model.predict(x), rtol=1e-4, atol=1e-3
    )


async def test_matrix_model_takes_one_tensor_per_feature(
    stub: pb_grpc.GRPCInferenceServiceStub, model_repo: ModelRepo
) -> None:
    """What a client reading the schema (not the ONNX graph) sends: [N, 1] per feature."""
    x = model_repo.bench_x[:5].astype("<f4")
    request = pb.ModelInferRequest(model_name=BENCH)
    for j in range(x.shape[1]):
        request.inputs.add(name=f"f{j}", datatype="FP32", shape=[5, 1])
        request.raw_input_contents.append(x[:, j].tobytes())
    response = await stub.ModelInfer(request)
    matrix = outputs_of(await stub.ModelInfer(bench_raw_request(model_repo, rows=5)))
    np.testing.assert_array_equal(outputs_of(response)["variable"], matrix["variable"])
    assert len(prediction_ids(response)) == 5

    request.raw_input_contents[3] = np.array([0, 0, np.nan, 0, 0], dtype="<f4").tobytes()
    await expect_error(
        stub.ModelInfer(request), grpc.StatusCode.INVALID_ARGUMENT, "features.f3: row 2 is NaN"
    )


async def test_requested_outputs_filter(
    stub: pb_grpc.GRPCInferenceServiceStub, model_repo: ModelRepo
) -> None:
    request = credit_raw_request(model_repo, rows=3)
    request.outputs.add(name="probabilities")
    response = await stub.ModelInfer(request)
    assert [o.name for o in response.outputs] == ["probabilities"]
    assert len(response.raw_output_contents) == 1
    probabilities = outputs_of(response)["probabilities"]
    np.testing.assert_allclose(
        probabilities,
        model_repo.credit_pipeline.predict_proba(model_repo.credit_rows.iloc[:3]),
        atol=1e-5,
    )


async def test_unknown_output(
    stub: pb_grpc.GRPCInferenceServiceStub, model_repo: ModelRepo
) -> None:
    request = credit_raw_request(model_repo, rows=3)
    request.outputs.add(name="scores")
    await expect_error(
        stub.ModelInfer(request), grpc.StatusCode.INVALID_ARGUMENT, "outputs", "'scores'"
    )


async def test_bad_tensors_rejected(
    stub: pb_grpc.GRPCInferenceServiceStub, model_repo: ModelRepo
) -> None:
    invalid = grpc.StatusCode.INVALID_ARGUMENT

    wrong_shape = credit_raw_request(model_repo, rows=4)
    wrong_shape.inputs[0].shape[:] = [2, 2]
    await expect_error(stub.ModelInfer(wrong_shape), invalid, "(age).shape", "[2, 2]")

    wrong_size = credit_raw_request(model_repo, rows=4)
    wrong_size.raw_input_contents[1] = wrong_size.raw_input_contents[1][:-4]
    await expect_error(
        stub.ModelInfer(wrong_size), invalid, "inputs[1] (income)", "raw data has 12 bytes"
    )

    matrix = bench_raw_request(model_repo, rows=2)
    matrix.inputs[0].shape[:] = [4, 6]
    await expect_error(stub.ModelInfer(matrix), invalid, "inputs[0] (input).shape", "[N, 12]")

    wrong_name = bench_raw_request(model_repo, rows=2)
    wrong_name.inputs[0].name = "x"
    await expect_error(stub.ModelInfer(wrong_name), invalid, "inputs", "'input'")

    truncated_bytes = credit_raw_request(model_repo, rows=4)
    truncated_bytes.raw_input_contents[3] = truncated_bytes.raw_input_contents[3][:-2]
    await expect_error(stub.ModelInfer(truncated_bytes), invalid, "inputs[3] (city)")

    typed_count = credit_typed_request(model_repo, rows=4)
    typed_count.inputs[1].contents.fp32_contents.append(1.0)
    await expect_error(stub.ModelInfer(typed_count), invalid, "inputs[1] (income).contents")

    bad_datatype = credit_raw_request(model_repo, rows=4)
    bad_datatype.inputs[0].datatype = "FP8"
    await expect_error(stub.ModelInfer(bad_datatype), invalid, "inputs[0] (age).datatype")

    strings_for_numbers = credit_typed_request(model_repo, rows=2)
    age = strings_for_numbers.inputs[0]
    age.datatype = "BYTES"
    del age.contents.fp32_contents[:]
    age.contents.bytes_contents.extend([b"30", b"40"])
    await expect_error(
        stub.ModelInfer(strings_for_numbers), invalid, "features.age", "expected numbers"
    )

    missing = credit_typed_request(model_repo, rows=2)
    del missing.inputs[2]
    await expect_error(stub.ModelInfer(missing), invalid, "features.debt_ratio: missing")

    nan = credit_typed_request(model_repo, rows=2)
    nan.inputs[1].contents.fp32_contents[0] = float("nan")
    await expect_error(stub.ModelInfer(nan), invalid, "features.income: row 0 is NaN")

    raw_count = credit_raw_request(model_repo, rows=2)
    del raw_count.raw_input_contents[-1]
    await expect_error(stub.ModelInfer(raw_count), invalid, "raw_input_contents")

    await expect_error(
        stub.ModelInfer(pb.ModelInferRequest(model_name="nope")),
        grpc.StatusCode.NOT_FOUND,
        "'nope'",
    )
    # Still serving.
    check_credit(await stub.ModelInfer(credit_raw_request(model_repo, rows=2)), model_repo, rows=2)


async def test_repository_index_load_unload(
    stub: pb_grpc.GRPCInferenceServiceStub, model_repo: ModelRepo
) -> None:
    index = await stub.RepositoryIndex(pb.RepositoryIndexRequest())
    assert {(m.name, m.version, m.state) for m in index.models} == {
        (CREDIT, "1", "READY"),
        (BENCH, "1", "READY"),
    }

    await stub.RepositoryModelUnload(pb.RepositoryModelUnloadRequest(model_name=BENCH))
    assert not (await stub.ModelReady(pb.ModelReadyRequest(name=BENCH))).ready
    assert (await stub.ServerReady(pb.ServerReadyRequest())).ready
    await expect_error(
        stub.ModelInfer(bench_raw_request(model_repo, rows=2)), grpc.StatusCode.NOT_FOUND
    )
    index = await stub.RepositoryIndex(pb.RepositoryIndexRequest())
    states = {m.name: (m.state, m.reason) for m in index.models}
    assert states[BENCH] == ("UNAVAILABLE", "not loaded")
    assert states[CREDIT][0] == "READY"
    ready_only = await stub.RepositoryIndex(pb.RepositoryIndexRequest(ready=True))
    assert [m.name for m in ready_only.models] == [CREDIT]
    await expect_error(
        stub.RepositoryModelUnload(pb.RepositoryModelUnloadRequest(model_name=BENCH)),
        grpc.StatusCode.NOT_FOUND,
    )

    await stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name=BENCH))
    assert (await stub.ModelReady(pb.ModelReadyRequest(name=BENCH))).ready
    arrays = outputs_of(await stub.ModelInfer(bench_raw_request(model_repo, rows=3)))
    np.testing.assert_allclose(
        arrays["variable"].ravel(),
        model_repo.bench_model.predict(model_repo.bench_x[:3]),
        rtol=1e-4,
        atol=1e-3,
    )
    await expect_error(
        stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="nope")),
        grpc.StatusCode.NOT_FOUND,
    )
    await expect_error(
        stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="")),
        grpc.StatusCode.INVALID_ARGUMENT,
        "model_name",
    )


async def test_load_specific_version(stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    request = pb.RepositoryModelLoadRequest(model_name=CREDIT)
    request.parameters["version"].string_param = "1"
    await stub.RepositoryModelLoad(request)
    assert (await stub.ModelReady(pb.ModelReadyRequest(name=CREDIT, version="1"))).ready
    request.parameters["version"].string_param = "5"
    await expect_error(stub.RepositoryModelLoad(request), grpc.StatusCode.NOT_FOUND, "version")
    assert (await stub.ModelReady(pb.ModelReadyRequest(name=CREDIT))).ready


async def test_single_revision_mode(start_inference_server: Starter, model_repo: ModelRepo) -> None:
    async with (
        start_inference_server(model=CREDIT) as running,
        aio.insecure_channel(running.address) as ch,
    ):
        stub = pb_grpc.GRPCInferenceServiceStub(ch)
        index = await stub.RepositoryIndex(pb.RepositoryIndexRequest())
        assert [(m.name, m.state) for m in index.models] == [(CREDIT, "READY")]
        await expect_error(
            stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name=BENCH)),
            grpc.StatusCode.FAILED_PRECONDITION,
            "model_name",
            "serves only 'credit'",
        )
        assert not (await stub.ModelReady(pb.ModelReadyRequest(name=BENCH))).ready
        await expect_error(
            stub.RepositoryModelUnload(pb.RepositoryModelUnloadRequest(model_name=CREDIT)),
            grpc.StatusCode.FAILED_PRECONDITION,
        )
        # Reloading its own model is allowed.
        await stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name=CREDIT))
        check_credit(
            await stub.ModelInfer(credit_raw_request(model_repo, rows=3)), model_repo, rows=3
        )


async def test_corrupt_model_in_index(
    start_inference_server: Starter, model_repo: ModelRepo, tmp_path: Path
) -> None:
    root = model_repo.copy_to(tmp_path / "repo")
    (root / BENCH / "1" / "model.onnx").write_bytes(b"garbage")
    async with (
        start_inference_server(model_repository=root) as running,
        aio.insecure_channel(running.address) as ch,
    ):
        stub = pb_grpc.GRPCInferenceServiceStub(ch)
        index = await stub.RepositoryIndex(pb.RepositoryIndexRequest())
        states = {m.name: (m.state, m.reason) for m in index.models}
        assert states[CREDIT] == ("READY", "")
        assert states[BENCH][0] == "UNAVAILABLE"
        assert "sha256" in states[BENCH][1]
        assert not (await stub.ModelReady(pb.ModelReadyRequest(name=BENCH))).ready
        await expect_error(
            stub.ModelInfer(bench_raw_request(model_repo, rows=2)),
            grpc.StatusCode.FAILED_PRECONDITION,
            "'bench'",
        )
        await expect_error(
            stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name=BENCH)),
            grpc.StatusCode.FAILED_PRECONDITION,
        )
        check_credit(
            await stub.ModelInfer(credit_raw_request(model_repo, rows=3)), model_repo, rows=3
        )


def test_tritonclient_against_cli_server(cli_server: str, model_repo: ModelRepo) -> None:
    credit = model_repo.credit_rows.iloc[:20]
    bench = model_repo.bench_x[:15]
    job = {
        "address": cli_server,
        "credit": {name: credit[name].tolist() for name in credit.columns},
        "bench": bench.tolist(),
    }
    script = Path(__file__).with_name("triton_check.py")
    done = subprocess.run(
        [sys.executable, str(script)],
        input=json.dumps(job),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["live"] and result["ready"] and result["credit_ready"]
    assert not result["missing_ready"]
    assert result["credit_inputs"] == {
        "age": "FP32",
        "income": "FP32",
        "debt_ratio": "FP32",
        "city": "BYTES",
    }
    assert set(result["credit_outputs"]) == {"label", "probabilities"}
    np.testing.assert_allclose(
        np.array(result["credit"]["probabilities"]),
        model_repo.credit_pipeline.predict_proba(credit),
        atol=1e-5,
    )
    assert result["credit"]["label"] == model_repo.credit_pipeline.predict(credit).tolist()
    assert len(set(result["credit"]["ids"].split(","))) == 20
    np.testing.assert_allclose(
        result["bench"], model_repo.bench_model.predict(bench), rtol=1e-4, atol=1e-3
    )
    assert result["unknown_model_error"] == "StatusCode.NOT_FOUND"
    assert "tritonclient" not in sys.modules
