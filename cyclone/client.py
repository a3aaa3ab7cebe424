"""Python client SDK: rows of named features in, one `Prediction` per row out."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import grpc

from cyclone.inference.v1 import inference_service_pb2 as pb
from cyclone.inference.v1 import inference_service_pb2_grpc as pb_grpc
from cyclone.server import channel_options

Rows = Sequence[Mapping[str, Any]] | Mapping[str, Sequence[Any]]


@dataclasses.dataclass(frozen=True)
class Prediction:
    prediction_id: str
    value: float | None = None
    label: str | None = None
    probabilities: dict[str, float] | None = None


def _is_number(value: Any) -> bool:
    return value is None or (isinstance(value, int | float) and not isinstance(value, bool)) or isinstance(value, bool)


def build_request(model: str, rows: Rows, version: str = "") -> pb.PredictRequest:
    """Columns from rows (list of dicts) or from a dict of columns; numbers vs text by value type."""
    if isinstance(rows, Mapping):
        columns = {name: list(values) for name, values in rows.items()}
    else:
        names: list[str] = []
        for row in rows:
            names.extend(n for n in row if n not in names)
        columns = {name: [row.get(name) for row in rows] for name in names}
    request = pb.PredictRequest(model=model, version=version)
    for name, values in columns.items():
        column = request.features[name]
        if all(_is_number(v) for v in values):
            column.numbers.extend(math.nan if v is None else float(v) for v in values)
        else:
            column.strings.extend("" if v is None else str(v) for v in values)
    return request


def predictions_from_response(response: pb.PredictResponse) -> list[Prediction]:
    ids = list(response.prediction_ids)
    if response.values:
        return [Prediction(i, value=v) for i, v in zip(ids, response.values, strict=True)]
    classes = list(response.class_labels)
    probs = list(response.probabilities)
    k = len(classes)
    return [
        Prediction(i, label=label, probabilities=dict(zip(classes, probs[r * k : (r + 1) * k], strict=True)))
        for r, (i, label) in enumerate(zip(ids, response.labels, strict=True))
    ]


class InferenceClient:
    """Blocking client for `cyclone.inference.v1.InferenceService`."""

    def __init__(self, address: str, *, timeout: float = 10.0, max_message_bytes: int = 16 << 20) -> None:
        self.address = address
        self.timeout = timeout
        self._channel = grpc.insecure_channel(address, options=channel_options(max_message_bytes))
        self._stub = pb_grpc.InferenceServiceStub(self._channel)

    def predict(self, model: str, rows: Rows, version: str = "") -> list[Prediction]:
        response = self._stub.Predict(build_request(model, rows, version), timeout=self.timeout)
        return predictions_from_response(response)

    def get_model(self, model: str, version: str = "") -> pb.ModelInfo:
        return self._stub.GetModel(pb.GetModelRequest(model=model, version=version), timeout=self.timeout).model

    def list_models(self) -> list[pb.ModelInfo]:
        return list(self._stub.ListModels(pb.ListModelsRequest(), timeout=self.timeout).models)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> InferenceClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
