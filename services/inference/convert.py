"""Protobuf <-> domain for both front ends: Cyclone's `InferenceService` and the Open Inference
Protocol (OIP). Nothing here decides policy: the servicers call these to read a request into
numpy columns (or a `Prepared` job) and to write domain results back as messages.

OIP tensors are the model's ONNX inputs: one [N, 1] (or [N]) tensor per feature, or one [N, F]
tensor named `input` for matrix models. Models whose features are all numeric take either form,
whatever their ONNX layout (generic V2 clients send one matrix). Data may come as
`raw_input_contents` (little-endian; BYTES length-prefixed) or typed `contents`; outputs always
go back as `raw_output_contents`, which is what tritonclient and kserve clients read. Each OIP
response carries its prediction ids in the `cyclone_prediction_ids` parameter.
"""

from __future__ import annotations

import math
import struct
import weakref
from collections.abc import Mapping, Sequence
from itertools import chain
from typing import Any

import numpy as np

import cyclone
from cyclone.errors import CycloneError, InvalidArgument
from cyclone.inference.v1 import inference_service_pb2 as pb
from cyclone.oip.v2 import open_inference_pb2 as oip_pb
from cyclone.wire import POOL_MODEL_HEADER, POOL_VERSION_HEADER
from services.inference.batching import Prepared
from services.inference.catalog import RepositoryEntry
from services.inference.model import LoadedModel, Outputs
from services.inference.pool import PoolTarget

# -- cyclone.inference.v1 -------------------------------------------------------------------

_TASKS = {"regression": pb.TASK_REGRESSION, "classification": pb.TASK_CLASSIFICATION}
_KINDS = {"numeric": pb.FEATURE_KIND_NUMERIC, "categorical": pb.FEATURE_KIND_CATEGORICAL}


def columns_from_proto(features: Mapping[str, pb.FeatureColumn]) -> dict[str, np.ndarray]:
    """Proto columns as numpy columns, unvalidated (`LoadedModel.validate` words the errors)."""
    columns: dict[str, np.ndarray] = {}
    for name, column in features.items():
        if column.numbers and column.strings:
            raise InvalidArgument(f"features.{name}: set either numbers or strings, not both")
        if column.strings:
            columns[name] = np.array(column.strings, dtype=object)
        else:
            columns[name] = np.fromiter(column.numbers, dtype=np.float64, count=len(column.numbers))
    return columns


def quick_prepared_from_proto(
    model: LoadedModel, features: Mapping[str, pb.FeatureColumn]
) -> Prepared | None:
    """A plainly valid request straight to a (numeric features, rows) block; None when in doubt.

    Skips `columns_from_proto`'s per-column arrays for the common case. It only decides "valid
    or not" with the model's own checks (`numeric_ok`, `categories_ok`); anything it does not
    accept goes to `LoadedModel.validate`, the one place that words errors.
    """
    if len(features) != len(model.feature_names):
        return None
    numbers: dict[str, Any] = {}
    strings: dict[str, Any] = {}
    for name, column in features.items():
        texts = column.strings
        if texts:
            if column.numbers:
                return None
            strings[name] = texts
        else:
            numbers[name] = column.numbers
    if len(strings) != len(model.category_lookup) or not all(
        n in strings for n in model.category_lookup
    ):
        return None
    try:
        ordered = [numbers[name] for name in model.numeric_names]
    except KeyError:
        return None
    lengths = {len(values) for values in ordered}
    lengths.update(len(values) for values in strings.values())
    if len(lengths) != 1:
        return None
    rows = lengths.pop()
    if not 0 < rows <= model.max_batch_rows:
        return None
    columns: dict[str, np.ndarray] = {}
    block: np.ndarray | None = None
    if ordered:
        block = np.fromiter(
            chain.from_iterable(ordered), dtype=np.float64, count=rows * len(ordered)
        )
        block = block.reshape(len(ordered), rows)
        if not model.numeric_ok(block):
            return None
        if not strings:
            return Prepared(None, rows, block, model.numeric_names)
        columns = dict(zip(model.numeric_names, block, strict=True))
    for name, texts in strings.items():
        if not model.categories_ok(name, texts):
            return None
        columns[name] = np.array(texts, dtype=object)
    return Prepared(columns, rows, block)


def prepared_from_proto(model: LoadedModel, features: Mapping[str, pb.FeatureColumn]) -> Prepared:
    """Proto columns to a validated request; errors come from the one exact path."""
    quick = quick_prepared_from_proto(model, features)
    if quick is not None:
        return quick
    columns = columns_from_proto(features)
    return Prepared(columns, model.validate(columns))


def model_info(model: LoadedModel) -> pb.ModelInfo:
    schema = model.schema
    return pb.ModelInfo(
        name=schema.name,
        version=schema.version,
        task=_TASKS[schema.task],
        features=[
            pb.FeatureSpec(
                name=f.name,
                kind=_KINDS[f.kind],
                dtype=f.dtype,
                min=f.min,
                max=f.max,
                categories=f.categories,
                allow_missing=f.allow_missing,
            )
            for f in schema.features
        ],
        class_labels=schema.class_labels,
        sha256=model.sha256,
        max_batch_rows=model.max_batch_rows,
    )


def predict_response(
    model: LoadedModel, ids: list[str], outputs: Outputs, request_id: str
) -> pb.PredictResponse:
    response = pb.PredictResponse(
        model=model.name, version=model.version, prediction_ids=ids, request_id=request_id
    )
    if outputs.values is not None:
        response.values.extend(outputs.values.tolist())
    else:
        assert outputs.labels is not None and outputs.probabilities is not None
        response.labels.extend(outputs.labels.tolist())
        response.class_labels.extend(model.schema.class_labels)
        response.probabilities.extend(outputs.probabilities.ravel().tolist())
    return response


def stream_error(exc: CycloneError) -> pb.PredictStreamResponse:
    """A failed stream message: its status code and message, in place of a response."""
    return pb.PredictStreamResponse(error_code=exc.code.value[0], error_message=exc.message)


# -- Open Inference Protocol (inference.GRPCInferenceService) -----------------------------

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
# The one tensor of a matrix request (and of a matrix model's ONNX graph).
MATRIX_INPUT = "input"


# The OIP datatype of each numeric numpy dtype (native and little-endian are the same here).
_OIP_DATATYPES: dict[np.dtype[Any], str] = {
    np.dtype(dtype): name for name, dtype in _DTYPES.items() if dtype is not np.object_
}


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


def array_from_tensor(tensor: Any, raw: bytes | None, field: str) -> np.ndarray:
    """One input tensor (typed `contents`, or `raw` bytes when given) as a shaped array."""
    datatype = tensor.datatype
    if datatype not in _DTYPES:
        raise InvalidArgument(f"{field}.datatype: unsupported datatype {datatype!r}")
    shape = list(tensor.shape)
    if not shape or any(d < 0 for d in shape):
        raise InvalidArgument(f"{field}.shape: expected non-negative dimensions, got {shape}")
    count = math.prod(shape)
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


def _takes_matrix(model: LoadedModel, names: Sequence[str]) -> bool:
    """Whether the request's tensors are one [N, F] matrix (rather than one per feature)."""
    if model.schema.input_layout == "matrix":
        return not (set(names) <= model.feature_index.keys())
    return (
        model.all_numeric
        and list(names) == [MATRIX_INPUT]
        and MATRIX_INPUT not in model.feature_index
    )


def columns_from_tensors(
    model: LoadedModel, request: oip_pb.ModelInferRequest
) -> dict[str, np.ndarray]:
    """Input tensors as the model's named feature columns, unvalidated."""
    if request.raw_input_contents and len(request.raw_input_contents) != len(request.inputs):
        raise InvalidArgument(
            f"raw_input_contents: {len(request.raw_input_contents)} entries for {len(request.inputs)} inputs"
        )
    tensors: dict[str, np.ndarray] = {}
    for i, tensor in enumerate(request.inputs):
        field = f"inputs[{i}] ({tensor.name})"
        raw = request.raw_input_contents[i] if request.raw_input_contents else None
        tensors[tensor.name] = array_from_tensor(tensor, raw, field)
    schema = model.schema
    if _takes_matrix(model, list(tensors)):
        if list(tensors) != [MATRIX_INPUT]:
            raise InvalidArgument(
                f"inputs: model {model.name!r} takes one tensor named 'input' of shape "
                f"[N, {len(schema.features)}], or one [N] tensor per feature"
            )
        matrix = tensors[MATRIX_INPUT]
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


_FLOAT_TENSORS: dict[str, np.dtype[Any]] = {"FP32": np.dtype("<f4"), "FP64": np.dtype("<f8")}


def _floats(tensor: Any, raw: bytes | None, count: int) -> np.ndarray | None:
    """A float tensor's `count` values, flat (a view of `raw` when given); None if not that."""
    dtype = _FLOAT_TENSORS.get(tensor.datatype)
    if dtype is None:
        return None
    if raw is not None:
        return np.frombuffer(raw, dtype=dtype) if len(raw) == count * dtype.itemsize else None
    values = tensor.contents.fp32_contents if dtype.itemsize == 4 else tensor.contents.fp64_contents
    return np.fromiter(values, dtype=dtype, count=count) if len(values) == count else None


def quick_prepared_from_tensors(
    model: LoadedModel, request: oip_pb.ModelInferRequest
) -> Prepared | None:
    """A plainly valid all-numeric request decoded in one pass into a (features, rows) block;
    None when in doubt.

    Takes one FP32/FP64 [N, F] tensor named `input` (the block is then a transposed view of the
    request's bytes, and a matrix model is fed them without a copy) or one [N]/[N, 1] tensor
    per feature. Like `quick_prepared_from_proto` it only decides "valid or not";
    `columns_from_tensors` and `LoadedModel.validate` word every error.
    """
    if not model.all_numeric:
        return None
    inputs = request.inputs
    raws = request.raw_input_contents
    if raws and len(raws) != len(inputs):
        return None
    width = len(model.feature_names)
    block: np.ndarray
    if len(inputs) == 1 and inputs[0].name == MATRIX_INPUT and width != 1:
        tensor = inputs[0]
        shape = tensor.shape
        if len(shape) != 2 or shape[1] != width:
            return None
        rows = shape[0]
        if not 0 < rows <= model.max_batch_rows:
            return None
        flat = _floats(tensor, raws[0] if raws else None, rows * width)
        if flat is None:
            return None
        block = flat.reshape(rows, width).T
    elif len(inputs) == width:
        index = model.feature_index
        rows = -1
        block = np.empty(0)
        seen = 0
        for i, tensor in enumerate(inputs):
            j = index.get(tensor.name)
            shape = tensor.shape
            if j is None or not (len(shape) == 1 or (len(shape) == 2 and shape[1] == 1)):
                return None
            if rows == -1:
                rows = shape[0]
                if not 0 < rows <= model.max_batch_rows:
                    return None
                block = np.empty((width, rows), dtype=np.float64)
            elif shape[0] != rows:
                return None
            flat = _floats(tensor, raws[i] if raws else None, rows)
            if flat is None:
                return None
            block[j] = flat
            seen |= 1 << j
        if seen != (1 << width) - 1:
            return None  # a feature sent twice, another missing
    else:
        return None
    if not model.numeric_ok(block):
        return None
    return Prepared(None, rows, block, model.feature_names)


def requested_outputs(model: LoadedModel, request: oip_pb.ModelInferRequest) -> list[str]:
    """The outputs the caller asked for (all of them when none), each one the model has."""
    if not request.outputs:
        return model.output_names
    wanted = [o.name for o in request.outputs]
    unknown = [n for n in wanted if n not in model.output_names]
    if unknown:
        raise InvalidArgument(
            f"outputs: unknown output {unknown[0]!r} (model has {', '.join(model.output_names)})"
        )
    return wanted


def infer_response(
    model: LoadedModel, ids: list[str], outputs: Outputs, wanted: Sequence[str], request_id: str
) -> bytes:
    """A serialized ModelInferResponse.

    Built as two serialized parts: protobuf merges concatenated messages, so the head (model
    name and version, each output's name, datatype and shape), which depends only on the
    model and the outputs' shapes, is serialized once per shape and reused; each request
    serializes only its id, prediction ids and output bytes. Half the cost of building the
    whole message per request, on a path where that is a tenth of the server's time.
    """
    arrays = [np.asarray(outputs.raw[name]) for name in wanted]
    key = (tuple(wanted), tuple((a.dtype.str, a.shape) for a in arrays))
    heads = _response_heads.get(model)
    if heads is None:
        heads = _response_heads.setdefault(model, {})
    head = heads.get(key)
    if head is None:
        head = _response_head(model, wanted, arrays)
        if len(heads) < _MAX_HEADS_PER_MODEL:
            heads[key] = head
    contents = []
    for array in arrays:
        if array.dtype.kind in "OUS":
            contents.append(encode_bytes_tensor(array))
        else:
            # tobytes() is C order whatever the layout; astype copies only on big-endian data.
            contents.append(array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes())
    # Built in one constructor call: each field set afterwards is another trip into upb.
    tail = oip_pb.ModelInferResponse(
        id=request_id,
        parameters={PREDICTION_IDS_PARAMETER: oip_pb.InferParameter(string_param=",".join(ids))},
        raw_output_contents=contents,
    )
    return head + tail.SerializeToString()


# Serialized response heads per model (dropped with the model), by outputs and shapes; a
# model answering many batch sizes keeps the first few and builds the rest each time.
_response_heads: weakref.WeakKeyDictionary[LoadedModel, dict[Any, bytes]] = (
    weakref.WeakKeyDictionary()
)
_MAX_HEADS_PER_MODEL = 64


def _response_head(model: LoadedModel, wanted: Sequence[str], arrays: list[np.ndarray]) -> bytes:
    tensors = [
        oip_pb.ModelInferResponse.InferOutputTensor(
            name=name,
            datatype=_OIP_DATATYPES.get(array.dtype) or _oip_datatype(array),
            shape=array.shape,
        )
        for name, array in zip(wanted, arrays, strict=True)
    ]
    return oip_pb.ModelInferResponse(
        model_name=model.name, model_version=model.version, outputs=tensors
    ).SerializeToString()


def _tensor_metadata(nodes: Any) -> list[oip_pb.ModelMetadataResponse.TensorMetadata]:
    return [
        oip_pb.ModelMetadataResponse.TensorMetadata(
            name=node.name,
            datatype=_ORT_TO_OIP.get(node.type, "FP32"),
            shape=[-1 if not isinstance(d, int) else d for d in node.shape],
        )
        for node in nodes
    ]


def model_metadata(model: LoadedModel) -> oip_pb.ModelMetadataResponse:
    return oip_pb.ModelMetadataResponse(
        name=model.name,
        versions=[model.version],
        platform="onnxruntime_onnx",
        inputs=_tensor_metadata(model.session.get_inputs()),
        outputs=_tensor_metadata(model.session.get_outputs()),
    )


def server_metadata() -> oip_pb.ServerMetadataResponse:
    return oip_pb.ServerMetadataResponse(
        name="cyclone", version=cyclone.__version__, extensions=["model_repository"]
    )


def repository_index(entries: Sequence[RepositoryEntry]) -> oip_pb.RepositoryIndexResponse:
    response = oip_pb.RepositoryIndexResponse()
    for entry in entries:
        response.models.add(
            name=entry.name, version=entry.version, state=entry.state, reason=entry.reason
        )
    return response


def load_version(request: oip_pb.RepositoryModelLoadRequest) -> str | None:
    """The `version` parameter of a load request; None (the latest) when absent or empty."""
    param = request.parameters.get("version")
    return (param.string_param if param is not None else None) or None


# -- serving pool ----------------------------------------------------------------------------


def pool_target(metadata: Sequence[tuple[str, str | bytes]] | None) -> PoolTarget | None:
    """The model version a pooled revision's Envoy cluster named in the request headers; None
    when they are absent (a caller reaching the process directly names it in the request)."""
    model = version = ""
    for key, value in metadata or ():
        if key == POOL_MODEL_HEADER:
            model = value if isinstance(value, str) else value.decode()
        elif key == POOL_VERSION_HEADER:
            version = value if isinstance(value, str) else value.decode()
    return PoolTarget(model, version) if model and version else None
