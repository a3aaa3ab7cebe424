"""Open Inference Protocol V2 (`inference.GRPCInferenceService`) on the same models.

Tensors are the model's ONNX inputs: one [N, 1] tensor per feature (or one [N, F]
tensor named `input` for matrix models). Data may come as `raw_input_contents`
(little-endian; BYTES length-prefixed) or typed `contents`; outputs always go back
as `raw_output_contents`, which is what tritonclient and kserve clients read.
Each response carries its prediction ids in the `cyclone_prediction_ids` parameter.
"""

from __future__ import annotations

import struct
from typing import Any

import numpy as np
from grpc import aio

import cyclone
from cyclone.errors import CycloneError, FailedPrecondition, InvalidArgument
from cyclone.oip.v2 import open_inference_pb2 as pb
from cyclone.oip.v2 import open_inference_pb2_grpc as pb_grpc
from cyclone.server import abort_on_domain_errors
from services.inference.model import LoadedModel
from services.inference.servicer import Scorer

_DTYPES: dict[str, Any] = {
    "BOOL": np.bool_,
    "INT8": np.int8,
    "INT16": np.int16,
    "INT32": np.int32,
    "INT64": np.int64,
    "UINT8": np.uint8,
    "UINT16": np.uint16,
    "UINT32": np.uint32,
    "UINT64": np.uint64,
    "FP16": np.float16,
    "FP32": np.float32,
    "FP64": np.float64,
    "BYTES": np.object_,
}
_CONTENTS_FIELD = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}
_ORT_TO_OIP = {
    "tensor(float)": "FP32",
    "tensor(double)": "FP64",
    "tensor(int64)": "INT64",
    "tensor(int32)": "INT32",
    "tensor(string)": "BYTES",
    "tensor(bool)": "BOOL",
}
PREDICTION_IDS_PARAMETER = "cyclone_prediction_ids"


def _oip_datatype(array: np.ndarray) -> str:
    if array.dtype.kind in "OUS":
        return "BYTES"
    for name, dtype in _DTYPES.items():
        if dtype is not np.object_ and array.dtype == np.dtype(dtype):
            return name
    raise ValueError(f"no OIP datatype for {array.dtype}")


def decode_bytes_tensor(raw: bytes, count: int, field: str) -> np.ndarray:
    out = np.empty(count, dtype=object)
    offset = 0
    for i in range(count):
        if offset + 4 > len(raw):
            raise InvalidArgument(f"{field}: BYTES data ends after {i} of {count} elements")
        (length,) = struct.unpack_from("<I", raw, offset)
        offset += 4
        if offset + length > len(raw):
            raise InvalidArgument(f"{field}: BYTES element {i} runs past the end of the data")
        out[i] = raw[offset : offset + length].decode("utf-8", errors="replace")
        offset += length
    if offset != len(raw):
        raise InvalidArgument(
            f"{field}: {len(raw) - offset} bytes left over after {count} elements"
        )
    return out


def encode_bytes_tensor(array: np.ndarray) -> bytes:
    parts = []
    for item in array.ravel().tolist():
        data = item if isinstance(item, bytes) else str(item).encode()
        parts.append(struct.pack("<I", len(data)))
        parts.append(data)
    return b"".join(parts)


def _tensor_array(tensor: Any, raw: bytes | None, field: str) -> np.ndarray:
    datatype = tensor.datatype
    if datatype not in _DTYPES:
        raise InvalidArgument(f"{field}.datatype: unsupported datatype {datatype!r}")
    shape = list(tensor.shape)
    if not shape or any(d < 0 for d in shape):
        raise InvalidArgument(f"{field}.shape: expected non-negative dimensions, got {shape}")
    count = int(np.prod(shape))
    if raw is not None:
        if datatype == "BYTES":
            flat = decode_bytes_tensor(raw, count, field)
        else:
            dtype = np.dtype(_DTYPES[datatype]).newbyteorder("<")
            if len(raw) != count * dtype.itemsize:
                raise InvalidArgument(
                    f"{field}: raw data has {len(raw)} bytes, shape {shape} of {datatype} needs {count * dtype.itemsize}"
                )
            flat = np.frombuffer(raw, dtype=dtype)
    else:
        values = getattr(tensor.contents, _CONTENTS_FIELD.get(datatype, ""), None)
        if values is None:
            raise InvalidArgument(
                f"{field}.contents: datatype {datatype} cannot be sent as typed contents"
            )
        if len(values) != count:
            raise InvalidArgument(
                f"{field}.contents: has {len(values)} elements, shape {shape} needs {count}"
            )
        if datatype == "BYTES":
            flat = np.array([v.decode("utf-8", errors="replace") for v in values], dtype=object)
        else:
            flat = np.fromiter(values, dtype=_DTYPES[datatype], count=count)
    return flat.reshape(shape)


def columns_from_tensors(
    model: LoadedModel, request: pb.ModelInferRequest
) -> dict[str, np.ndarray]:
    if request.raw_input_contents and len(request.raw_input_contents) != len(request.inputs):
        raise InvalidArgument(
            f"raw_input_contents: {len(request.raw_input_contents)} entries for {len(request.inputs)} inputs"
        )
    tensors: dict[str, np.ndarray] = {}
    for i, tensor in enumerate(request.inputs):
        field = f"inputs[{i}] ({tensor.name})"
        raw = request.raw_input_contents[i] if request.raw_input_contents else None
        tensors[tensor.name] = _tensor_array(tensor, raw, field)
    schema = model.schema
    if schema.input_layout == "matrix":
        unknown = [n for n in tensors if n != "input"]
        if unknown or "input" not in tensors:
            raise InvalidArgument(
                f"inputs: model {model.name!r} takes one tensor named 'input' of shape [N, {len(schema.features)}]"
            )
        matrix = tensors["input"]
        if matrix.ndim != 2 or matrix.shape[1] != len(schema.features):
            raise InvalidArgument(
                f"inputs[0] (input).shape: expected [N, {len(schema.features)}], got {list(matrix.shape)}"
            )
        return {f.name: matrix[:, j] for j, f in enumerate(schema.features)}
    columns: dict[str, np.ndarray] = {}
    for name, array in tensors.items():
        if array.ndim == 2 and array.shape[1] == 1:
            array = array[:, 0]
        elif array.ndim != 1:
            raise InvalidArgument(
                f"inputs ({name}).shape: expected [N] or [N, 1], got {list(array.shape)}"
            )
        columns[name] = array
    return columns


class OpenInferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, scorer: Scorer) -> None:
        self.scorer = scorer
        self.catalog = scorer.catalog

    async def ServerLive(
        self, request: pb.ServerLiveRequest, context: aio.ServicerContext[Any, Any]
    ) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(
        self, request: pb.ServerReadyRequest, context: aio.ServicerContext[Any, Any]
    ) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=bool(self.catalog.models))

    async def ModelReady(
        self, request: pb.ModelReadyRequest, context: aio.ServicerContext[Any, Any]
    ) -> pb.ModelReadyResponse:
        try:
            self.catalog.get(request.name, request.version)
        except CycloneError:
            return pb.ModelReadyResponse(ready=False)
        return pb.ModelReadyResponse(ready=True)

    async def ServerMetadata(
        self, request: pb.ServerMetadataRequest, context: aio.ServicerContext[Any, Any]
    ) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(
            name="cyclone", version=cyclone.__version__, extensions=["model_repository"]
        )

    async def ModelMetadata(
        self, request: pb.ModelMetadataRequest, context: aio.ServicerContext[Any, Any]
    ) -> pb.ModelMetadataResponse:
        try:
            model = self.catalog.get(request.name, request.version)
        except Exception as exc:
            await abort_on_domain_errors(context, exc)
            raise
        inputs = [
            pb.ModelMetadataResponse.TensorMetadata(
                name=i.name,
                datatype=_ORT_TO_OIP.get(i.type, "FP32"),
                shape=[-1 if not isinstance(d, int) else d for d in i.shape],
            )
            for i in model.session.get_inputs()
        ]
        outputs = [
            pb.ModelMetadataResponse.TensorMetadata(
                name=o.name,
                datatype=_ORT_TO_OIP.get(o.type, "FP32"),
                shape=[-1 if not isinstance(d, int) else d for d in o.shape],
            )
            for o in model.session.get_outputs()
        ]
        return pb.ModelMetadataResponse(
            name=model.name,
            versions=[model.version],
            platform="onnxruntime_onnx",
            inputs=inputs,
            outputs=outputs,
        )

    async def ModelInfer(
        self, request: pb.ModelInferRequest, context: aio.ServicerContext[Any, Any]
    ) -> pb.ModelInferResponse:
        try:
            model = self.catalog.get(request.model_name, request.model_version)
            wanted = [o.name for o in request.outputs] or model.output_names
            unknown = [n for n in wanted if n not in model.output_names]
            if unknown:
                raise InvalidArgument(
                    f"outputs: unknown output {unknown[0]!r} (model has {', '.join(model.output_names)})"
                )
            ids, outputs = await self.scorer.score(model, columns_from_tensors(model, request))
        except Exception as exc:
            await abort_on_domain_errors(context, exc)
            raise
        response = pb.ModelInferResponse(
            model_name=model.name, model_version=model.version, id=request.id
        )
        response.parameters[PREDICTION_IDS_PARAMETER].string_param = ",".join(ids)
        for name in wanted:
            array = np.asarray(outputs.raw[name])
            datatype = _oip_datatype(array)
            response.outputs.add(name=name, datatype=datatype, shape=list(array.shape))
            if datatype == "BYTES":
                response.raw_output_contents.append(encode_bytes_tensor(array))
            else:
                response.raw_output_contents.append(
                    np.ascontiguousarray(array).astype(array.dtype.newbyteorder("<")).tobytes()
                )
        return response

    async def RepositoryIndex(
        self, request: pb.RepositoryIndexRequest, context: aio.ServicerContext[Any, Any]
    ) -> pb.RepositoryIndexResponse:
        response = pb.RepositoryIndexResponse()
        repo = self.catalog.repository
        names = [self.catalog.pinned_model] if self.catalog.single_revision else repo.models()
        for name in names:
            assert name is not None
            loaded = self.catalog.models.get(name)
            if loaded is not None:
                response.models.add(name=name, version=loaded.version, state="READY")
            elif not request.ready:
                versions = repo.versions(name)
                response.models.add(
                    name=name,
                    version=versions[-1] if versions else "",
                    state="UNAVAILABLE",
                    reason=self.catalog.failures.get(name, "not loaded"),
                )
        return response

    async def RepositoryModelLoad(
        self, request: pb.RepositoryModelLoadRequest, context: aio.ServicerContext[Any, Any]
    ) -> pb.RepositoryModelLoadResponse:
        try:
            if not request.model_name:
                raise InvalidArgument("model_name: empty")
            version_param = request.parameters.get("version")
            version = version_param.string_param if version_param is not None else None
            if self.catalog.single_revision and request.model_name == self.catalog.pinned_model:
                version = self.catalog.pinned_version
            self.catalog.load(request.model_name, version or None)
        except Exception as exc:
            await abort_on_domain_errors(context, exc)
            raise
        return pb.RepositoryModelLoadResponse()

    async def RepositoryModelUnload(
        self, request: pb.RepositoryModelUnloadRequest, context: aio.ServicerContext[Any, Any]
    ) -> pb.RepositoryModelUnloadResponse:
        try:
            if self.catalog.single_revision:
                raise FailedPrecondition(
                    "model_name: a single-revision server cannot unload its model"
                )
            self.catalog.unload(request.model_name)
        except Exception as exc:
            await abort_on_domain_errors(context, exc)
            raise
        return pb.RepositoryModelUnloadResponse()
