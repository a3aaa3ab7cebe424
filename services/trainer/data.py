"""The labelled window of a retraining job: which rows to ask the store for, and the rows as a
frame (features + label, oldest first)."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from google.protobuf.timestamp_pb2 import Timestamp

from cyclone.plan import RetrainSpec
from cyclone.store.v1 import store_service_pb2 as store_pb
from services.trainer.fit import LABEL, JobFailure

if TYPE_CHECKING:
    import pandas as pd

Kind = Literal["numeric", "categorical"]


def window_request(
    model: str,
    spec: RetrainSpec,
    now: datetime,
    chunk_rows: int = 10_000,
    since: datetime | None = None,
) -> store_pb.GetTrainingDataRequest:
    """Sliding by rows (and auto): the newest ``rows`` labelled rows; sliding by time: the last
    ``duration``; expanding: every labelled row. With ``since`` (``retrain.since_alert``):
    every labelled row predicted after it."""
    request = store_pb.GetTrainingDataRequest(model=model, chunk_rows=chunk_rows)
    if since is not None:
        start, end = Timestamp(), Timestamp()
        start.FromDatetime(since)
        end.FromDatetime(now + timedelta(seconds=1))
        request.start.CopyFrom(start)
        request.end.CopyFrom(end)
    elif spec.kind in ("sliding", "auto") and spec.rows is not None:
        request.last_n = spec.rows
    elif spec.kind == "sliding" and spec.duration_seconds is not None:
        start, end = Timestamp(), Timestamp()
        start.FromDatetime(now - timedelta(seconds=spec.duration_seconds))
        end.FromDatetime(now + timedelta(seconds=1))
        request.start.CopyFrom(start)
        request.end.CopyFrom(end)
    return request


@dataclasses.dataclass(frozen=True)
class LabelledWindow:
    frame: pd.DataFrame  # features + LABEL, oldest first
    start: datetime | None
    end: datetime | None
    # The served prediction of each row (class label or value): its loss dates a change.
    predictions: Any = None
    # Prediction times, Unix microseconds, one per row.
    times: Any = None

    @property
    def rows(self) -> int:
        return len(self.frame)


async def collect(
    chunks: AsyncIterator[store_pb.GetTrainingDataResponse],
    features: tuple[tuple[str, Kind], ...],
    task: str,
) -> LabelledWindow:
    """Assemble columnar chunks into one frame; labels of the wrong type fail the job."""
    columns: dict[str, list[Any]] = {name: [] for name, _ in features}
    labels: list[Any] = []
    served: list[Any] = []
    times: list[int] = []
    async for chunk in chunks:
        n = len(chunk.prediction_ids)
        for name, kind in features:
            column = chunk.features.get(name)
            if column is None:
                values: list[Any] = [None] * n
            elif kind == "categorical":
                values = list(column.strings) or [str(v) for v in column.numbers]
            else:
                values = list(column.numbers) if column.numbers else _numbers(column.strings, name)
            columns[name].extend(values)
        if task == "classification":
            if chunk.labels.numbers and not chunk.labels.strings:
                raise JobFailure("labels: expected class labels (text), got numbers")
            labels.extend(chunk.labels.strings)
        else:
            if chunk.labels.strings and not chunk.labels.numbers:
                raise JobFailure("labels: expected numbers for a regression model, got text")
            labels.extend(chunk.labels.numbers)
        times.extend(chunk.created_at_micros)
        answers = chunk.predictions
        if task == "classification":
            served.extend(list(answers.strings) or [str(v) for v in answers.numbers] or [""] * n)
        else:
            served.extend(list(answers.numbers) or [float("nan")] * n)
    # Off the event loop: importing pandas (the first job's, over a second) and building the
    # frame would hold up the trainer's lease renewals and its RPCs meanwhile.
    return await asyncio.to_thread(assemble, columns, labels, served, times, features, task)


def assemble(
    columns: dict[str, list[Any]],
    labels: list[Any],
    served: list[Any],
    times: list[int],
    features: tuple[tuple[str, Kind], ...],
    task: str,
) -> LabelledWindow:
    """The window as a frame, from the columns `collect` gathered (blocking: run in a thread)."""
    import pandas as pd  # lazy: the trainer's main process needs pandas only once a job runs

    frame = pd.DataFrame(columns)
    for name, kind in features:
        if kind == "numeric":
            frame[name] = pd.to_numeric(frame[name], errors="coerce").astype(np.float64)
        else:
            frame[name] = frame[name].astype(str)
    frame[LABEL] = labels if task == "classification" else np.asarray(labels, dtype=np.float64)
    if task == "regression" and len(frame) and not np.all(np.isfinite(frame[LABEL])):
        raise JobFailure("labels: regression labels must be finite numbers")
    start = _time(times[0]) if times else None
    end = _time(times[-1]) if times else None
    predictions = np.asarray(served, dtype=object if task == "classification" else np.float64)
    return LabelledWindow(frame, start, end, predictions, np.asarray(times, dtype=np.int64))


def _numbers(texts: Any, name: str) -> list[float]:
    try:
        return [float(t) for t in texts]
    except ValueError:
        raise JobFailure(f"features.{name}: expected numbers, got text") from None


def _time(micros: int) -> datetime:
    return datetime(1970, 1, 1, tzinfo=UTC) + timedelta(microseconds=micros)
