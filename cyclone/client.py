"""Python client SDK: rows of named features in, one `Prediction` per row out."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Collection, Iterator, Mapping, Sequence
from typing import Any

from cyclone.channels import sync_channel
from cyclone.inference.v1 import inference_service_pb2 as pb
from cyclone.inference.v1 import inference_service_pb2_grpc as pb_grpc
from cyclone.server import channel_options
from cyclone.wire import MODEL_HEADER

Rows = Sequence[Mapping[str, Any]] | Mapping[str, Sequence[Any]]


def model_metadata(model: str) -> tuple[tuple[str, str], ...]:
    return ((MODEL_HEADER, model),)


@dataclasses.dataclass(frozen=True)
class Prediction:
    prediction_id: str
    value: float | None = None
    label: str | None = None
    probabilities: dict[str, float] | None = None
    # The model version that answered (during a rollout, either one); "" from an old server.
    version: str = ""


def _is_number(value: Any) -> bool:
    return (
        value is None
        or (isinstance(value, int | float) and not isinstance(value, bool))
        or isinstance(value, bool)
    )


def _is_missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def build_request(
    model: str, rows: Rows, version: str = "", categorical: Collection[str] = ()
) -> pb.PredictRequest:
    """Columns from rows (list of dicts) or from a dict of columns; numbers vs text by value
    type, except that features named in `categorical` are always text (a zip code read as a
    number is still a category). A missing value (None, or NaN among text) is sent as NaN in
    a numeric column and as "" in a text one, which is how Cyclone marks a missing category."""
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
        if name not in categorical and all(_is_number(v) for v in values):
            column.numbers.extend(math.nan if v is None else float(v) for v in values)
        else:
            column.strings.extend("" if _is_missing(v) else str(v) for v in values)
    return request


def categorical_features(info: pb.ModelInfo) -> set[str]:
    """The features a served model takes as text (from `InferenceClient.get_model`)."""
    return {f.name for f in info.features if f.kind == pb.FEATURE_KIND_CATEGORICAL}


def predictions_from_response(response: pb.PredictResponse) -> list[Prediction]:
    ids = list(response.prediction_ids)
    version = response.version
    if response.values:
        return [
            Prediction(i, value=v, version=version)
            for i, v in zip(ids, response.values, strict=True)
        ]
    classes = list(response.class_labels)
    probs = list(response.probabilities)
    k = len(classes)
    return [
        Prediction(
            i,
            label=label,
            probabilities=dict(zip(classes, probs[r * k : (r + 1) * k], strict=True)),
            version=version,
        )
        for r, (i, label) in enumerate(zip(ids, response.labels, strict=True))
    ]


class InferenceClient:
    """Blocking client for `cyclone.inference.v1.InferenceService`."""

    def __init__(
        self, address: str, *, timeout: float = 10.0, max_message_bytes: int = 16 << 20
    ) -> None:
        self.address = address
        self.timeout = timeout
        self._channel = sync_channel(address, options=channel_options(max_message_bytes))
        self._stub = pb_grpc.InferenceServiceStub(self._channel)

    def predict(
        self, model: str, rows: Rows, version: str = "", categorical: Collection[str] = ()
    ) -> list[Prediction]:
        """`categorical`: features to send as text whatever their values' type (see
        `build_request`; `categorical_features(client.get_model(model))` gives them)."""
        response = self._stub.Predict(
            build_request(model, rows, version, categorical),
            timeout=self.timeout,
            metadata=model_metadata(model),
        )
        return predictions_from_response(response)

    def predict_request(self, request: pb.PredictRequest) -> pb.PredictResponse:
        """Send a prepared request; the whole response (version that answered included)."""
        response: pb.PredictResponse = self._stub.Predict(
            request, timeout=self.timeout, metadata=model_metadata(request.model)
        )
        return response

    def get_model(self, model: str, version: str = "") -> pb.ModelInfo:
        response = self._stub.GetModel(
            pb.GetModelRequest(model=model, version=version),
            timeout=self.timeout,
            metadata=model_metadata(model),
        )
        info: pb.ModelInfo = response.model
        return info

    def list_models(self) -> list[pb.ModelInfo]:
        return list(self._stub.ListModels(pb.ListModelsRequest(), timeout=self.timeout).models)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> InferenceClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class StoreClient:
    """Blocking client for the parts of `cyclone.store.v1.StoreService` users call."""

    def __init__(self, address: str, *, timeout: float = 30.0) -> None:
        from cyclone.store.v1 import store_service_pb2_grpc as store_grpc

        self.timeout = timeout
        self._channel = sync_channel(address)
        self._stub = store_grpc.StoreServiceStub(self._channel)

    def add_labels(self, model: str, labels: Sequence[tuple[str, Any]]) -> tuple[int, list[str]]:
        """Send (prediction_id, label) pairs; numbers for regression, class labels otherwise.

        Returns (stored, unmatched ids). Unmatched labels are kept and join their
        prediction when it arrives.
        """
        from cyclone.store.v1 import store_service_pb2 as store_pb

        request = store_pb.AddLabelsRequest(model=model)
        for prediction_id, value in labels:
            label = request.labels.add(prediction_id=str(prediction_id))
            if isinstance(value, int | float) and not isinstance(value, bool):
                label.number = float(value)
            else:
                label.text = str(value)
        response = self._stub.AddLabels(request, timeout=self.timeout)
        return int(response.stored), list(response.unmatched_prediction_ids)

    def stats(self, model: str = "") -> Any:
        from cyclone.store.v1 import store_service_pb2 as store_pb

        return self._stub.GetStats(store_pb.GetStatsRequest(model=model), timeout=self.timeout)

    def health(self, model: str = "") -> list[Any]:
        from cyclone.store.v1 import store_service_pb2 as store_pb

        return list(
            self._stub.GetHealth(
                store_pb.GetHealthRequest(model=model), timeout=self.timeout
            ).health
        )

    def model_versions(self, model: str = "") -> list[Any]:
        from cyclone.store.v1 import store_service_pb2 as store_pb

        response = self._stub.ListModelVersions(
            store_pb.ListModelVersionsRequest(model=model), timeout=self.timeout
        )
        return list(response.model_versions)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> StoreClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class MonitorClient:
    """Blocking client for `cyclone.monitor.v1.MonitorService`."""

    def __init__(self, address: str, *, timeout: float = 60.0) -> None:
        from cyclone.monitor.v1 import monitor_service_pb2_grpc as monitor_grpc

        self.timeout = timeout
        self._channel = sync_channel(address)
        self._stub = monitor_grpc.MonitorServiceStub(self._channel)

    def evaluate_now(self, model: str) -> Any:
        from cyclone.monitor.v1 import monitor_service_pb2 as mpb

        return self._stub.EvaluateNow(mpb.EvaluateNowRequest(model=model), timeout=self.timeout)

    def status(self, model: str = "") -> list[Any]:
        from cyclone.monitor.v1 import monitor_service_pb2 as mpb

        return list(
            self._stub.GetStatus(mpb.GetStatusRequest(model=model), timeout=self.timeout).statuses
        )

    def get_plan(self, model: str) -> tuple[str, int]:
        from cyclone.monitor.v1 import monitor_service_pb2 as mpb

        response = self._stub.GetPlan(mpb.GetPlanRequest(model=model), timeout=self.timeout)
        return response.plan_yaml, int(response.revision)

    def set_plan(self, model: str, plan_yaml: str) -> int:
        from cyclone.monitor.v1 import monitor_service_pb2 as mpb

        return int(
            self._stub.SetPlan(
                mpb.SetPlanRequest(model=model, plan_yaml=plan_yaml), timeout=self.timeout
            ).revision
        )

    def alerts(self, model: str = "", status: str = "") -> list[Any]:
        from cyclone.monitor.v1 import monitor_service_pb2 as mpb

        return list(
            self._stub.ListAlerts(
                mpb.ListAlertsRequest(model=model, status=status), timeout=self.timeout
            ).alerts
        )

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> MonitorClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class TrainerClient:
    """Blocking client for `cyclone.trainer.v1.TrainerService` (retraining jobs, rollouts)."""

    def __init__(self, address: str, *, timeout: float = 60.0) -> None:
        from cyclone.trainer.v1 import trainer_service_pb2_grpc as trainer_grpc

        self.timeout = timeout
        self._channel = sync_channel(address)
        self._stub = trainer_grpc.TrainerServiceStub(self._channel)

    def retrain(self, model: str, reason: str = "", alert_id: int = 0) -> Any:
        from cyclone.trainer.v1 import trainer_service_pb2 as tpb

        request = tpb.RetrainRequest(model=model, reason=reason, alert_id=alert_id)
        return self._stub.Retrain(request, timeout=self.timeout).job

    def jobs(self, model: str = "", limit: int = 0) -> list[Any]:
        from cyclone.trainer.v1 import trainer_service_pb2 as tpb

        request = tpb.ListJobsRequest(model=model, limit=limit)
        return list(self._stub.ListJobs(request, timeout=self.timeout).jobs)

    def watch(self, job_id: int) -> Iterator[Any]:
        """The job now, then every change until it ends."""
        from cyclone.trainer.v1 import trainer_service_pb2 as tpb

        for event in self._stub.WatchJob(tpb.WatchJobRequest(job_id=job_id)):
            yield event.job

    def cancel(self, job_id: int) -> Any:
        from cyclone.trainer.v1 import trainer_service_pb2 as tpb

        return self._stub.CancelJob(tpb.CancelJobRequest(job_id=job_id), timeout=self.timeout).job

    def rollout(self, model: str, version: str, strategy: str = "") -> Any:
        """Start moving `model`'s traffic to `version` (strategy: one of
        `cyclone.rollout_strategies.STRATEGIES`; empty: the plan's)."""
        from cyclone.rollout_strategies import strategy_to_pb
        from cyclone.trainer.v1 import trainer_service_pb2 as tpb

        value = strategy_to_pb(strategy)
        request = tpb.RolloutRequest(model=model, version=version, strategy=value)
        return self._stub.Rollout(request, timeout=self.timeout).rollout

    def promote(self, rollout_id: str) -> Any:
        from cyclone.trainer.v1 import trainer_service_pb2 as tpb

        request = tpb.PromoteRequest(rollout_id=rollout_id)
        return self._stub.Promote(request, timeout=self.timeout).rollout

    def rollback(self, model: str = "", rollout_id: str = "", reason: str = "") -> Any:
        from cyclone.trainer.v1 import trainer_service_pb2 as tpb

        request = tpb.RollbackRequest(model=model, rollout_id=rollout_id, reason=reason)
        return self._stub.Rollback(request, timeout=self.timeout).rollout

    def rollouts(self, model: str = "", limit: int = 0) -> list[Any]:
        from cyclone.trainer.v1 import trainer_service_pb2 as tpb

        request = tpb.ListRolloutsRequest(model=model, limit=limit)
        return list(self._stub.ListRollouts(request, timeout=self.timeout).rollouts)

    def get_rollout(self, rollout_id: str) -> Any:
        from cyclone.trainer.v1 import trainer_service_pb2 as tpb

        request = tpb.GetRolloutRequest(rollout_id=rollout_id)
        return self._stub.GetRollout(request, timeout=self.timeout).rollout

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> TrainerClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
