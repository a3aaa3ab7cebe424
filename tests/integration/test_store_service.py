"""The store's gRPC API against a real in-process server on an embedded PostgreSQL."""

from __future__ import annotations

import json
import math
import uuid
from collections.abc import AsyncIterator, Awaitable, Iterable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import psycopg
import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from grpc import aio
from support import expect_error

from cyclone.store.v1 import store_service_pb2 as pb
from cyclone.store.v1 import store_service_pb2_grpc as pb_grpc
from services.launch import start_store
from services.store.db import uuid7
from services.store.main import StoreSettings

pytestmark = pytest.mark.integration

HOUSE = "house"  # regression
IRIS = "iris"  # classification
HOUSE_SCHEMA = {
    "features": [{"name": "rooms", "kind": "numeric"}, {"name": "city", "kind": "categorical"}]
}
IRIS_SCHEMA = {
    "features": [{"name": "petal", "kind": "numeric"}],
    "class_labels": ["setosa", "versicolor", "virginica"],
}
CITIES = ("lisbon", "porto", "faro")
# Whole seconds an hour ago: every row gets a distinct, increasing millisecond.
BASE = datetime.now(UTC).replace(microsecond=0) - timedelta(hours=1)


@pytest.fixture
async def store(fresh_database_url: str) -> AsyncIterator[Any]:
    settings = StoreSettings(
        port=0, database_url=fresh_database_url, log_level="WARNING", pool_min_size=1
    )
    server = (await start_store(settings)).server
    try:
        yield server
    finally:
        await server.stop(0)


@pytest.fixture
async def stub(store: Any) -> AsyncIterator[pb_grpc.StoreServiceStub]:
    async with aio.insecure_channel(f"127.0.0.1:{store.port}") as channel:
        yield pb_grpc.StoreServiceStub(channel)


# --- helpers ----------------------------------------------------------------------------------


def at(i: int) -> datetime:
    return BASE + timedelta(seconds=i)


def house_record(i: int, pid: uuid.UUID | None = None, version: str = "1") -> pb.PredictionRecord:
    rooms = None if i == 3 else float(i % 5)
    return pb.PredictionRecord(
        prediction_id=str(pid or uuid7(at(i))),
        model=HOUSE,
        version=version,
        input_json=json.dumps({"rooms": rooms, "city": CITIES[i % 3]}).encode(),
        output_json=json.dumps({"value": 100.0 + i}).encode(),
        latency_ms=1.5,
        trace_id="t" * 32,
    )


def iris_record(i: int, predicted: str) -> pb.PredictionRecord:
    return pb.PredictionRecord(
        prediction_id=str(uuid7(at(i))),
        model=IRIS,
        version="1",
        input_json=json.dumps({"petal": 0.5 * i}).encode(),
        output_json=json.dumps({"label": predicted, "probabilities": {predicted: 0.9}}).encode(),
        latency_ms=2.0,
    )


def batch(records: Iterable[pb.PredictionRecord]) -> pb.LogPredictionsRequest:
    return pb.LogPredictionsRequest(records=list(records))


async def log(
    stub: pb_grpc.StoreServiceStub, *batches: pb.LogPredictionsRequest
) -> pb.LogPredictionsResponse:
    return await stub.LogPredictions(iter(batches))


async def register(
    stub: pb_grpc.StoreServiceStub,
    model: str,
    schema: dict[str, Any],
    task: str,
    version: str = "1",
    sha: str = "a" * 64,
    **kwargs: Any,
) -> pb.RegisterModelVersionResponse:
    return await stub.RegisterModelVersion(
        pb.RegisterModelVersionRequest(
            model_version=pb.ModelVersion(
                model=model,
                version=version,
                task=task,
                sha256=sha,
                schema_json=json.dumps(schema),
                artifact_uri=f"/models/{model}/{version}",
            ),
            **kwargs,
        )
    )


def number_labels(pairs: Iterable[tuple[str, float]]) -> list[pb.Label]:
    return [pb.Label(prediction_id=pid, number=v) for pid, v in pairs]


def text_labels(pairs: Iterable[tuple[str, str]]) -> list[pb.Label]:
    return [pb.Label(prediction_id=pid, text=v) for pid, v in pairs]


def ts(value: datetime) -> Timestamp:
    out = Timestamp()
    out.FromDatetime(value)
    return out


async def training(
    stub: pb_grpc.StoreServiceStub, **kwargs: Any
) -> list[pb.GetTrainingDataResponse]:
    return [chunk async for chunk in stub.GetTrainingData(pb.GetTrainingDataRequest(**kwargs))]


async def query_all(
    stub: pb_grpc.StoreServiceStub, page_size: int = 100, **kwargs: Any
) -> list[pb.StoredPrediction]:
    rows: list[pb.StoredPrediction] = []
    token = ""
    while True:
        page = await stub.QueryPredictions(
            pb.QueryPredictionsRequest(page_size=page_size, page_token=token, **kwargs)
        )
        rows.extend(page.predictions)
        token = page.next_page_token
        if not token:
            return rows


async def stats(stub: pb_grpc.StoreServiceStub, model: str) -> pb.ModelStats:
    response = await stub.GetStats(pb.GetStatsRequest(model=model))
    assert [m.model for m in response.models] == [model]
    return response.models[0]


async def drain(call: Any) -> None:
    async for _ in call:
        pass


async def setup_house(stub: pb_grpc.StoreServiceStub, n: int = 25) -> list[str]:
    """Register `house`, log n predictions and label the even-indexed and odd ones < 20.

    Rows i < 20 are labelled: even i with the served value (right), odd i with value + 5 (wrong).
    """
    await register(stub, HOUSE, HOUSE_SCHEMA, "regression")
    records = [house_record(i) for i in range(n)]
    response = await log(stub, batch(records))
    assert response.inserted == n
    ids = [r.prediction_id for r in records]
    labels = number_labels((ids[i], 100.0 + i + (5.0 if i % 2 else 0.0)) for i in range(min(20, n)))
    added = await stub.AddLabels(pb.AddLabelsRequest(model=HOUSE, labels=labels))
    assert added.stored == min(20, n)
    assert list(added.unmatched_prediction_ids) == []
    return ids


# --- LogPredictions ------------------------------------------------------------------------


async def test_log_predictions_stream_and_idempotent_replay(stub: pb_grpc.StoreServiceStub) -> None:
    await register(stub, HOUSE, HOUSE_SCHEMA, "regression")
    batches = [batch(house_record(i) for i in range(k * 4, k * 4 + 4)) for k in range(3)]

    first = await log(stub, *batches)
    assert (first.received, first.inserted) == (12, 12)

    # A replay after a lost acknowledgement: received again, stored once.
    replay = await log(stub, *batches)
    assert (replay.received, replay.inserted) == (12, 0)

    # A batch overlapping stored rows adds only the new ones.
    overlap = await log(stub, batch([*batches[2].records[2:], house_record(12), house_record(13)]))
    assert (overlap.received, overlap.inserted) == (4, 2)

    assert (await stats(stub, HOUSE)).predictions == 14
    rows = await query_all(stub, model=HOUSE)
    assert [r.prediction_id for r in rows] == _ids(rows)
    assert len({r.prediction_id for r in rows}) == 14
    sent = {r.prediction_id: r for b in batches for r in b.records}
    for row in rows:
        if row.prediction_id in sent:
            original = sent[row.prediction_id]
            assert json.loads(row.input_json) == json.loads(original.input_json)
            assert json.loads(row.output_json) == json.loads(original.output_json)
            assert row.latency_ms == pytest.approx(1.5)
            assert (row.model, row.version, row.label_json) == (HOUSE, "1", "")
        # created_at is the millisecond inside the UUIDv7 id.
        ms = uuid.UUID(row.prediction_id).int >> 80
        assert row.created_at.ToMilliseconds() == ms


def _ids(rows: list[pb.StoredPrediction]) -> list[str]:
    # Oldest first: the order is the ids' time order.
    return sorted((r.prediction_id for r in rows), key=lambda p: (uuid.UUID(p).int >> 80, p))


async def test_empty_stream_stores_nothing(stub: pb_grpc.StoreServiceStub) -> None:
    response = await log(stub)
    assert (response.received, response.inserted) == (0, 0)
    response = await log(stub, pb.LogPredictionsRequest())
    assert (response.received, response.inserted) == (0, 0)


# --- labels --------------------------------------------------------------------------------


async def test_labels_before_and_after_predictions_and_replace(
    stub: pb_grpc.StoreServiceStub,
) -> None:
    await register(stub, IRIS, IRIS_SCHEMA, "classification")
    records = [iris_record(i, "setosa") for i in range(6)]
    ids = [r.prediction_id for r in records]

    # Labels first: kept, reported unmatched.
    early = await stub.AddLabels(
        pb.AddLabelsRequest(
            model=IRIS, labels=text_labels([(ids[0], "setosa"), (ids[1], "versicolor")])
        )
    )
    assert early.stored == 2
    assert sorted(early.unmatched_prediction_ids) == sorted(ids[:2])
    assert await training(stub, model=IRIS) == []

    await log(stub, batch(records))
    # Now they join.
    chunks = await training(stub, model=IRIS)
    assert [list(c.prediction_ids) for c in chunks] == [ids[:2]]
    assert list(chunks[0].labels.strings) == ["setosa", "versicolor"]

    # Labels after the predictions: matched straight away.
    late = await stub.AddLabels(
        pb.AddLabelsRequest(
            model=IRIS, labels=text_labels([(ids[2], "virginica"), (ids[3], "setosa")])
        )
    )
    assert (late.stored, list(late.unmatched_prediction_ids)) == (2, [])

    # Replace rule: the second label for ids[0] wins; within one request the last one wins.
    replace = await stub.AddLabels(
        pb.AddLabelsRequest(
            model=IRIS,
            labels=text_labels([(ids[0], "virginica"), (ids[2], "setosa"), (ids[2], "versicolor")]),
        )
    )
    assert replace.stored == 2
    chunks = await training(stub, model=IRIS)
    got = dict(zip(chunks[0].prediction_ids, chunks[0].labels.strings, strict=True))
    assert got == {
        ids[0]: "virginica",
        ids[1]: "versicolor",
        ids[2]: "versicolor",
        ids[3]: "setosa",
    }
    assert list(chunks[0].predictions.strings) == ["setosa"] * 4
    s = await stats(stub, IRIS)
    assert (s.predictions, s.labels) == (6, 4)
    assert s.label_coverage == pytest.approx(4 / 6)


async def test_labels_for_another_models_predictions_are_refused(
    stub: pb_grpc.StoreServiceStub,
) -> None:
    """A label is checked against the model the request names; one for another model's
    prediction would land on that model unchecked (a number on a classifier, or replacing its
    label), so the request is refused and nothing of it is stored."""
    await register(stub, HOUSE, HOUSE_SCHEMA, "regression")
    await register(stub, IRIS, IRIS_SCHEMA, "classification")
    records = [iris_record(i, "setosa") for i in range(3)]
    ids = [r.prediction_id for r in records]
    await log(stub, batch(records))
    await stub.AddLabels(pb.AddLabelsRequest(model=IRIS, labels=text_labels([(ids[0], "setosa")])))
    unknown = str(uuid7(at(900)))

    await expect_error(
        stub.AddLabels(
            pb.AddLabelsRequest(model=HOUSE, labels=number_labels([(unknown, 1.0), (ids[0], 3.0)]))
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        f"labels[1].prediction_id: {ids[0]} is a prediction of model 'iris', not 'house'",
    )
    stream = [
        pb.AddLabelsStreamRequest(
            batch=pb.AddLabelsRequest(model=HOUSE, labels=number_labels([(unknown, 1.0)]))
        ),
        pb.AddLabelsStreamRequest(
            batch=pb.AddLabelsRequest(model=HOUSE, labels=number_labels([(ids[1], 2.0)]))
        ),
    ]
    await expect_error(
        stub.AddLabelsStream(iter(stream)),
        grpc.StatusCode.INVALID_ARGUMENT,
        "labels[1].prediction_id",
    )
    chunks = await training(stub, model=IRIS)
    assert dict(zip(chunks[0].prediction_ids, chunks[0].labels.strings, strict=True)) == {
        ids[0]: "setosa"
    }
    assert (await stats(stub, IRIS)).labels == 1
    # The house's own labels still go in, matched or not.
    ok = await stub.AddLabels(
        pb.AddLabelsRequest(model=HOUSE, labels=number_labels([(unknown, 1.0)]))
    )
    assert (ok.stored, list(ok.unmatched_prediction_ids)) == (1, [unknown])


async def test_add_labels_stream(stub: pb_grpc.StoreServiceStub) -> None:
    ids = await setup_house(stub, n=25)
    missing = str(uuid7(at(500)))
    requests = [
        pb.AddLabelsStreamRequest(
            batch=pb.AddLabelsRequest(
                model=HOUSE, labels=number_labels([(ids[20], 1.0), (ids[21], 2.0)])
            )
        ),
        pb.AddLabelsStreamRequest(
            batch=pb.AddLabelsRequest(
                model=HOUSE, labels=number_labels([(ids[22], 3.0), (missing, 4.0)])
            )
        ),
    ]
    response = await stub.AddLabelsStream(iter(requests))
    assert response.stored == 4
    assert list(response.unmatched_prediction_ids) == [missing]
    assert (await stats(stub, HOUSE)).labels == 23

    # An error in the second batch names the label by its position in the whole stream.
    bad = [
        pb.AddLabelsStreamRequest(
            batch=pb.AddLabelsRequest(model=HOUSE, labels=number_labels([(ids[23], 1.0)] * 3))
        ),
        pb.AddLabelsStreamRequest(
            batch=pb.AddLabelsRequest(model=HOUSE, labels=text_labels([(ids[24], "x")]))
        ),
    ]
    await expect_error(
        stub.AddLabelsStream(iter(bad)), grpc.StatusCode.INVALID_ARGUMENT, "labels[3].text"
    )


# --- GetTrainingData -----------------------------------------------------------------------


async def test_training_data_window_columns_and_chunks(stub: pb_grpc.StoreServiceStub) -> None:
    ids = await setup_house(stub, n=25)
    # Window [5, 15): the labelled rows 5..14, oldest first, in chunks of 4.
    chunks = await training(stub, model=HOUSE, start=ts(at(5)), end=ts(at(15)), chunk_rows=4)
    assert [len(c.prediction_ids) for c in chunks] == [4, 4, 2]
    got_ids = [p for c in chunks for p in c.prediction_ids]
    assert got_ids == ids[5:15]
    micros = [m for c in chunks for m in c.created_at_micros]
    assert micros == [
        int((at(i) - datetime(1970, 1, 1, tzinfo=UTC)) / timedelta(microseconds=1))
        for i in range(5, 15)
    ]
    for chunk in chunks:
        assert set(chunk.features) == {"rooms", "city"}
        assert len(chunk.features["rooms"].numbers) == len(chunk.prediction_ids)
        assert not chunk.features["rooms"].strings
        assert len(chunk.features["city"].strings) == len(chunk.prediction_ids)
    rooms = [v for c in chunks for v in c.features["rooms"].numbers]
    assert rooms == [float(i % 5) for i in range(5, 15)]
    cities = [v for c in chunks for v in c.features["city"].strings]
    assert cities == [CITIES[i % 3] for i in range(5, 15)]
    assert [v for c in chunks for v in c.latency_ms] == [1.5] * 10
    predictions = [v for c in chunks for v in c.predictions.numbers]
    assert predictions == [100.0 + i for i in range(5, 15)]
    labels = [v for c in chunks for v in c.labels.numbers]
    assert labels == [100.0 + i + (5.0 if i % 2 else 0.0) for i in range(5, 15)]

    # A missing numeric value is NaN; unlabelled rows (20..24) never appear.
    everything = await training(stub, model=HOUSE)
    assert [p for c in everything for p in c.prediction_ids] == ids[:20]
    assert math.isnan(everything[0].features["rooms"].numbers[3])

    # Only a start: everything from there on.
    tail = await training(stub, model=HOUSE, start=ts(at(17)))
    assert [p for c in tail for p in c.prediction_ids] == ids[17:20]


async def test_training_data_last_n(stub: pb_grpc.StoreServiceStub) -> None:
    ids = await setup_house(stub, n=25)
    chunks = await training(stub, model=HOUSE, last_n=7, chunk_rows=3)
    assert [len(c.prediction_ids) for c in chunks] == [3, 3, 1]
    assert [p for c in chunks for p in c.prediction_ids] == ids[13:20]
    # The last 3 of a window.
    chunks = await training(stub, model=HOUSE, last_n=3, start=ts(at(0)), end=ts(at(10)))
    assert [p for c in chunks for p in c.prediction_ids] == ids[7:10]
    # Version filter: nothing was served by version 2.
    assert await training(stub, model=HOUSE, version="2") == []


async def test_training_data_classification_columns(stub: pb_grpc.StoreServiceStub) -> None:
    await register(stub, IRIS, IRIS_SCHEMA, "classification")
    records = [iris_record(i, "versicolor" if i % 2 else "setosa") for i in range(4)]
    await log(stub, batch(records))
    await stub.AddLabels(
        pb.AddLabelsRequest(
            model=IRIS, labels=text_labels((r.prediction_id, "setosa") for r in records)
        )
    )
    (chunk,) = await training(stub, model=IRIS)
    assert list(chunk.predictions.strings) == ["setosa", "versicolor", "setosa", "versicolor"]
    assert not chunk.predictions.numbers
    assert list(chunk.labels.strings) == ["setosa"] * 4
    assert list(chunk.features["petal"].numbers) == [0.0, 0.5, 1.0, 1.5]
    assert list(chunk.latency_ms) == [2.0] * 4  # for the monitor's latency metrics


# --- QueryPredictions ----------------------------------------------------------------------


async def test_query_pagination(stub: pb_grpc.StoreServiceStub) -> None:
    ids = await setup_house(stub, n=25)
    first = await stub.QueryPredictions(pb.QueryPredictionsRequest(model=HOUSE, page_size=10))
    assert [p.prediction_id for p in first.predictions] == ids[:10]
    assert first.next_page_token
    second = await stub.QueryPredictions(
        pb.QueryPredictionsRequest(model=HOUSE, page_size=10, page_token=first.next_page_token)
    )
    assert [p.prediction_id for p in second.predictions] == ids[10:20]
    third = await stub.QueryPredictions(
        pb.QueryPredictionsRequest(model=HOUSE, page_size=10, page_token=second.next_page_token)
    )
    assert [p.prediction_id for p in third.predictions] == ids[20:]
    assert third.next_page_token == ""
    # Default page size is 100: everything in one page.
    everything = await stub.QueryPredictions(pb.QueryPredictionsRequest(model=HOUSE))
    assert len(everything.predictions) == 25 and not everything.next_page_token
    # Window and version.
    window = await query_all(stub, page_size=3, model=HOUSE, start=ts(at(2)), end=ts(at(9)))
    assert [p.prediction_id for p in window] == ids[2:9]
    assert await query_all(stub, model=HOUSE, version="2") == []
    assert await query_all(stub, model="nobody") == []
    # Labels come back as JSON.
    assert json.loads(everything.predictions[1].label_json) == 106.0
    assert everything.predictions[21].label_json == ""


async def test_query_label_filter_and_wrong_only(stub: pb_grpc.StoreServiceStub) -> None:
    ids = await setup_house(stub, n=25)
    labelled = await query_all(stub, model=HOUSE, label_filter=pb.LABEL_FILTER_LABELLED)
    assert [p.prediction_id for p in labelled] == ids[:20]
    unlabelled = await query_all(stub, model=HOUSE, label_filter=pb.LABEL_FILTER_UNLABELLED)
    assert [p.prediction_id for p in unlabelled] == ids[20:]
    wrong = await query_all(stub, page_size=4, model=HOUSE, wrong_only=True, tolerance=1.0)
    assert [p.prediction_id for p in wrong] == [ids[i] for i in range(1, 20, 2)]
    # A wide tolerance: nothing is wrong.
    assert await query_all(stub, model=HOUSE, wrong_only=True, tolerance=10.0) == []

    await register(stub, IRIS, IRIS_SCHEMA, "classification")
    records = [iris_record(100 + i, "setosa") for i in range(4)]
    await log(stub, batch(records))
    await stub.AddLabels(
        pb.AddLabelsRequest(
            model=IRIS,
            labels=text_labels(
                [(records[0].prediction_id, "setosa"), (records[1].prediction_id, "virginica")]
            ),
        )
    )
    wrong = await query_all(stub, model=IRIS, wrong_only=True)
    assert [p.prediction_id for p in wrong] == [records[1].prediction_id]


async def test_query_feature_filter_and_injection(stub: pb_grpc.StoreServiceStub) -> None:
    ids = await setup_house(stub, n=25)

    def ff(name: str, op: str, **value: Any) -> pb.FeatureFilter:
        return pb.FeatureFilter(name=name, op=op, **value)

    big = await query_all(stub, model=HOUSE, feature_filter=ff("rooms", ">=", number=3))
    assert [p.prediction_id for p in big] == [ids[i] for i in range(25) if i != 3 and i % 5 >= 3]
    porto = await query_all(stub, model=HOUSE, feature_filter=ff("city", "=", text="porto"))
    assert [p.prediction_id for p in porto] == [ids[i] for i in range(25) if i % 3 == 1]
    not_porto = await query_all(stub, model=HOUSE, feature_filter=ff("city", "!=", text="porto"))
    assert len(not_porto) == 25 - len(porto)
    # A text value never matches a numeric feature.
    assert await query_all(stub, model=HOUSE, feature_filter=ff("rooms", "=", text="3")) == []

    injections = [
        "rooms') OR 1=1; DROP TABLE predictions; --",
        "rooms' OR '1'='1",
        'city"; DELETE FROM labels; --',
    ]
    for name in injections:
        got = await query_all(stub, model=HOUSE, feature_filter=ff(name, ">", number=-1))
        assert got == []
    got = await query_all(stub, model=HOUSE, feature_filter=ff("city", "=", text="x' OR '1'='1"))
    assert got == []
    s = await stats(stub, HOUSE)
    assert (s.predictions, s.labels) == (25, 20)


# --- registry ----------------------------------------------------------------------------


async def test_registry_register_get_list_and_status(stub: pb_grpc.StoreServiceStub) -> None:
    first = await register(stub, HOUSE, HOUSE_SCHEMA, "regression", sha="a" * 64)
    assert first.created
    mv = first.model_version
    assert (mv.model, mv.version, mv.status, mv.sha256) == (
        HOUSE,
        "1",
        pb.MODEL_STATUS_STAGED,
        "a" * 64,
    )
    assert json.loads(mv.schema_json) == HOUSE_SCHEMA
    assert mv.created_at.seconds > 0

    again = await register(
        stub, HOUSE, HOUSE_SCHEMA, "regression", sha="a" * 64, if_not_exists=True
    )
    assert not again.created
    assert again.model_version.created_at == mv.created_at
    await expect_error(
        register(stub, HOUSE, HOUSE_SCHEMA, "regression", sha="b" * 64, if_not_exists=True),
        grpc.StatusCode.INVALID_ARGUMENT,
        "model_version",
        "sha256",
    )
    await expect_error(
        register(stub, HOUSE, HOUSE_SCHEMA, "regression", sha="a" * 64),
        grpc.StatusCode.INVALID_ARGUMENT,
        "model_version",
        "already registered",
    )

    await register(stub, HOUSE, HOUSE_SCHEMA, "regression", version="2", sha="c" * 64)
    await register(stub, IRIS, IRIS_SCHEMA, "classification")

    got = await stub.GetModelVersion(pb.GetModelVersionRequest(model=HOUSE, version="1"))
    assert got.model_version.artifact_uri == "/models/house/1"
    latest = await stub.GetModelVersion(pb.GetModelVersionRequest(model=HOUSE))
    assert latest.model_version.version == "2"  # nothing serving yet: the latest

    listed = await stub.ListModelVersions(pb.ListModelVersionsRequest(model=HOUSE))
    assert [v.version for v in listed.model_versions] == ["1", "2"]
    everything = await stub.ListModelVersions(pb.ListModelVersionsRequest())
    assert sorted((v.model, v.version) for v in everything.model_versions) == [
        (HOUSE, "1"),
        (HOUSE, "2"),
        (IRIS, "1"),
    ]

    serving = await stub.SetModelStatus(
        pb.SetModelStatusRequest(model=HOUSE, version="1", status=pb.MODEL_STATUS_SERVING)
    )
    assert serving.model_version.status == pb.MODEL_STATUS_SERVING
    current = await stub.GetModelVersion(pb.GetModelVersionRequest(model=HOUSE))
    assert current.model_version.version == "1"  # empty version: the serving one

    await stub.SetModelStatus(
        pb.SetModelStatusRequest(model=HOUSE, version="2", status=pb.MODEL_STATUS_SERVING)
    )
    statuses = {
        v.version: v.status
        for v in (
            await stub.ListModelVersions(pb.ListModelVersionsRequest(model=HOUSE))
        ).model_versions
    }
    assert statuses == {"1": pb.MODEL_STATUS_RETIRED, "2": pb.MODEL_STATUS_SERVING}
    canary = await stub.SetModelStatus(
        pb.SetModelStatusRequest(model=IRIS, version="1", status=pb.MODEL_STATUS_CANARY)
    )
    assert canary.model_version.status == pb.MODEL_STATUS_CANARY


async def test_registry_errors(stub: pb_grpc.StoreServiceStub) -> None:
    await register(stub, HOUSE, HOUSE_SCHEMA, "regression")
    await expect_error(
        stub.SetModelStatus(pb.SetModelStatusRequest(model=HOUSE, version="1")),
        grpc.StatusCode.INVALID_ARGUMENT,
        "status",
    )
    await expect_error(
        stub.SetModelStatus(
            pb.SetModelStatusRequest(model=HOUSE, version="9", status=pb.MODEL_STATUS_SERVING)
        ),
        grpc.StatusCode.NOT_FOUND,
        "version",
    )
    await expect_error(
        stub.GetModelVersion(pb.GetModelVersionRequest(model=HOUSE, version="9")),
        grpc.StatusCode.NOT_FOUND,
        "version",
    )
    await expect_error(
        stub.GetModelVersion(pb.GetModelVersionRequest(model="nobody")), grpc.StatusCode.NOT_FOUND
    )
    await expect_error(
        stub.RegisterModelVersion(
            pb.RegisterModelVersionRequest(
                model_version=pb.ModelVersion(model=HOUSE, version="3", schema_json="{nope")
            )
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "model_version.schema_json",
    )
    await expect_error(
        stub.RegisterModelVersion(
            pb.RegisterModelVersionRequest(
                model_version=pb.ModelVersion(
                    model=HOUSE, version="3", status=pb.MODEL_STATUS_SERVING
                )
            )
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "model_version.status",
    )
    await expect_error(
        stub.RegisterModelVersion(
            pb.RegisterModelVersionRequest(model_version=pb.ModelVersion(model=HOUSE))
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "model_version.version",
    )
    await expect_error(
        stub.RegisterModelVersion(
            pb.RegisterModelVersionRequest(
                model_version=pb.ModelVersion(model=HOUSE, version="3", training_rows=-1)
            )
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "model_version.training_rows: must not be negative",
    )
    listed = await stub.ListModelVersions(pb.ListModelVersionsRequest(model=HOUSE))
    assert [v.version for v in listed.model_versions] == ["1"]


async def test_summary_listing_has_identities_only_and_filters_by_status(
    stub: pb_grpc.StoreServiceStub,
) -> None:
    evaluation = json.dumps({"metrics": {"r2": 0.8}})
    profile = json.dumps({"features": {"rooms": {"kind": "numeric"}}})
    for version, sha in (("1", "a" * 64), ("2", "b" * 64)):
        await stub.RegisterModelVersion(
            pb.RegisterModelVersionRequest(
                model_version=pb.ModelVersion(
                    model=HOUSE,
                    version=version,
                    task="regression",
                    sha256=sha,
                    schema_json=json.dumps(HOUSE_SCHEMA),
                    evaluation_json=evaluation,
                    reference_profile_json=profile,
                    hyperparameters_json="{}",
                )
            )
        )
    await register(stub, IRIS, IRIS_SCHEMA, "classification")
    await stub.SetModelStatus(
        pb.SetModelStatusRequest(model=HOUSE, version="2", status=pb.MODEL_STATUS_SERVING)
    )

    full = await stub.ListModelVersions(pb.ListModelVersionsRequest(model=HOUSE))
    light = await stub.ListModelVersions(pb.ListModelVersionsRequest(model=HOUSE, summary=True))
    assert [v.version for v in light.model_versions] == ["1", "2"]
    for v in light.model_versions:
        assert (v.task, v.sha256, v.artifact_uri) != ("", "", "")
        assert v.created_at.seconds > 0
        assert v.schema_json == v.evaluation_json == v.reference_profile_json == ""
        assert v.hyperparameters_json == ""
    assert all(v.reference_profile_json == profile for v in full.model_versions)
    assert light.ByteSize() < full.ByteSize() / 2

    serving = await stub.ListModelVersions(
        pb.ListModelVersionsRequest(status=pb.MODEL_STATUS_SERVING, summary=True)
    )
    assert [(v.model, v.version) for v in serving.model_versions] == [(HOUSE, "2")]
    staged = await stub.ListModelVersions(
        pb.ListModelVersionsRequest(status=pb.MODEL_STATUS_STAGED)
    )
    assert sorted((v.model, v.version) for v in staged.model_versions) == [
        (HOUSE, "1"),
        (IRIS, "1"),
    ]
    assert staged.model_versions[0].schema_json  # not a summary: the full record
    await expect_error(
        stub.ListModelVersions(pb.ListModelVersionsRequest(status=99)),  # type: ignore[arg-type]
        grpc.StatusCode.INVALID_ARGUMENT,
        "status: unknown value 99",
    )


async def test_json_postgresql_would_refuse_is_invalid_argument_naming_the_field(
    stub: pb_grpc.StoreServiceStub,
) -> None:
    """Python parses 1e999 as infinity and jsonb refuses both that and \\u0000: the store's
    one JSON policy refuses them up front instead of failing in the database."""
    invalid = grpc.StatusCode.INVALID_ARGUMENT
    for field, text in (
        ("evaluation_json", '{"auc": 1e999}'),
        ("reference_profile_json", '{"city": "\\u0000"}'),
        ("hyperparameters_json", "null"),
    ):
        version = pb.ModelVersion(model=HOUSE, version="1", **{field: text})
        await expect_error(
            stub.RegisterModelVersion(pb.RegisterModelVersionRequest(model_version=version)),
            invalid,
            f"model_version.{field}: ",
        )
    await expect_error(
        stub.GetModelVersion(pb.GetModelVersionRequest(model=HOUSE)), grpc.StatusCode.NOT_FOUND
    )
    record = pb.RecordEvaluationRequest(model="m", version="1", level="GREEN")
    record.points.add(metric="accuracy", value=0.9, details_json='{"n": -1e400}')
    await expect_error(
        stub.RecordEvaluation(record), invalid, "points[0].details_json: not valid JSON"
    )
    # The summary is the status page's JSON object, not any JSON value.
    summary = pb.RecordEvaluationRequest(model="m", version="1", level="GREEN", summary_json="[1]")
    await expect_error(
        stub.RecordEvaluation(summary),
        invalid,
        "summary_json: expected a JSON object, got an array",
    )
    assert list((await stub.GetHealth(pb.GetHealthRequest())).health) == []


# --- GetStats ----------------------------------------------------------------------------


async def test_stats(stub: pb_grpc.StoreServiceStub, fresh_database_url: str) -> None:
    empty = await stub.GetStats(pb.GetStatsRequest())
    assert list(empty.models) == []
    with psycopg.connect(fresh_database_url) as conn:
        row = conn.execute("SELECT mode FROM schema_migrations ORDER BY version LIMIT 1").fetchone()
    assert row is not None
    assert empty.storage_mode == row[0]
    assert empty.storage_mode in ("timescaledb", "postgres-partitioned")

    ids = await setup_house(stub, n=10)
    await register(stub, IRIS, IRIS_SCHEMA, "classification")
    await log(stub, batch(iris_record(50 + i, "setosa") for i in range(4)))
    response = await stub.GetStats(pb.GetStatsRequest())
    by_model = {m.model: m for m in response.models}
    assert set(by_model) == {HOUSE, IRIS}
    house = by_model[HOUSE]
    assert (house.predictions, house.labels, house.label_coverage) == (10, 10, 1.0)
    assert house.last_prediction_at.ToMilliseconds() == uuid.UUID(ids[-1]).int >> 80
    # The newest prediction was made at at(9) (an hour before the module was imported).
    newest_age = (datetime.now(UTC) - at(9)).total_seconds()
    assert newest_age - 60 < house.ingest_lag_seconds <= newest_age + 1
    iris = by_model[IRIS]
    assert (iris.predictions, iris.labels, iris.label_coverage) == (4, 0, 0.0)
    only = await stub.GetStats(pb.GetStatsRequest(model=IRIS))
    assert [m.model for m in only.models] == [IRIS]


# --- bad input ---------------------------------------------------------------------------


async def _stored(stub: pb_grpc.StoreServiceStub) -> int:
    return sum(m.predictions for m in (await stub.GetStats(pb.GetStatsRequest())).models)


@pytest.mark.parametrize(
    ("mutate", "fragment"),
    [
        ({"prediction_id": "not-a-uuid"}, "records[2].prediction_id"),
        ({"prediction_id": str(uuid.uuid4())}, "records[2].prediction_id"),
        ({"input_json": b'{"rooms": 1,'}, "records[2].input_json"),
        ({"input_json": b"\xff\xfe{}"}, "records[2].input_json"),
        ({"input_json": b""}, "records[2].input_json"),
        ({"output_json": b"{value}"}, "records[2].output_json"),
        ({"model": ""}, "records[2].model"),
    ],
)
async def test_log_predictions_rejects_bad_records(
    stub: pb_grpc.StoreServiceStub, mutate: dict[str, Any], fragment: str
) -> None:
    records = [house_record(i) for i in range(4)]
    for key, value in mutate.items():
        setattr(records[2], key, value)
    await expect_error(log(stub, batch(records)), grpc.StatusCode.INVALID_ARGUMENT, fragment)
    # Nothing from the rejected message is stored.
    assert await _stored(stub) == 0
    # The offset counts records across the stream's messages.
    offset_fragment = fragment.replace("records[2]", "records[6]")
    first = batch(house_record(i) for i in range(10, 14))
    await expect_error(
        log(stub, first, batch(records)), grpc.StatusCode.INVALID_ARGUMENT, offset_fragment
    )


async def test_add_labels_rejects_bad_labels(stub: pb_grpc.StoreServiceStub) -> None:
    ids = await setup_house(stub, n=3)
    await register(stub, IRIS, IRIS_SCHEMA, "classification")
    iris = iris_record(40, "setosa")
    await log(stub, batch([iris]))
    labels_before = (await stats(stub, HOUSE)).labels

    cases: list[tuple[pb.AddLabelsRequest, grpc.StatusCode, tuple[str, ...]]] = [
        # A text label for a regression model.
        (
            pb.AddLabelsRequest(
                model=HOUSE,
                labels=[*number_labels([(ids[0], 1.0)]), *text_labels([(ids[1], "big")])],
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
            ("labels[1].text",),
        ),
        (
            pb.AddLabelsRequest(model=HOUSE, labels=number_labels([(ids[0], math.inf)])),
            grpc.StatusCode.INVALID_ARGUMENT,
            ("labels[0].number",),
        ),
        # A class the model does not have.
        (
            pb.AddLabelsRequest(
                model=IRIS,
                labels=text_labels([(iris.prediction_id, "setosa"), (iris.prediction_id, "rose")]),
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
            ("labels[1]", "rose"),
        ),
        (
            pb.AddLabelsRequest(model=IRIS, labels=number_labels([(iris.prediction_id, 1.0)])),
            grpc.StatusCode.INVALID_ARGUMENT,
            ("labels[0]", "'1'"),
        ),
        (
            pb.AddLabelsRequest(model="nobody", labels=number_labels([(ids[0], 1.0)])),
            grpc.StatusCode.NOT_FOUND,
            ("model", "nobody"),
        ),
        (
            pb.AddLabelsRequest(model=HOUSE, labels=[pb.Label(prediction_id=ids[0])]),
            grpc.StatusCode.INVALID_ARGUMENT,
            ("labels[0]", "no value"),
        ),
        (
            pb.AddLabelsRequest(model=HOUSE, labels=number_labels([(ids[0], 1.0), ("nope", 2.0)])),
            grpc.StatusCode.INVALID_ARGUMENT,
            ("labels[1].prediction_id",),
        ),
        (
            pb.AddLabelsRequest(model=HOUSE, labels=number_labels([(str(uuid.uuid4()), 2.0)])),
            grpc.StatusCode.INVALID_ARGUMENT,
            ("labels[0].prediction_id",),
        ),
        (pb.AddLabelsRequest(model=HOUSE), grpc.StatusCode.INVALID_ARGUMENT, ("labels",)),
        (
            pb.AddLabelsRequest(labels=number_labels([(ids[0], 1.0)])),
            grpc.StatusCode.INVALID_ARGUMENT,
            ("model",),
        ),
    ]
    for request, code, fragments in cases:
        await expect_error(stub.AddLabels(request), code, *fragments)
    # Nothing of a rejected request is stored (the valid label before the bad one neither).
    assert (await stats(stub, HOUSE)).labels == labels_before
    assert (await stats(stub, IRIS)).labels == 0
    (chunk,) = await training(stub, model=HOUSE)
    assert list(chunk.labels.numbers) == [100.0, 106.0, 102.0]


async def test_training_data_and_query_reject_bad_requests(stub: pb_grpc.StoreServiceStub) -> None:
    await setup_house(stub, n=3)
    invalid = grpc.StatusCode.INVALID_ARGUMENT
    bad_training: list[tuple[dict[str, Any], grpc.StatusCode, str]] = [
        ({"model": HOUSE, "start": ts(at(10)), "end": ts(at(5))}, invalid, "end"),
        ({"model": HOUSE, "start": ts(at(5)), "end": ts(at(5))}, invalid, "end"),
        ({"model": HOUSE, "last_n": -1}, invalid, "last_n"),
        ({"model": HOUSE, "chunk_rows": 100_001}, invalid, "chunk_rows"),
        ({"model": HOUSE, "chunk_rows": -1}, invalid, "chunk_rows"),
        ({"model": ""}, invalid, "model"),
        ({"model": "nobody"}, grpc.StatusCode.NOT_FOUND, "model"),
    ]
    for kwargs, code, fragment in bad_training:
        await expect_error(
            drain(stub.GetTrainingData(pb.GetTrainingDataRequest(**kwargs))), code, fragment
        )

    def query(**kwargs: Any) -> Awaitable[pb.QueryPredictionsResponse]:
        return stub.QueryPredictions(pb.QueryPredictionsRequest(model=HOUSE, **kwargs))

    await expect_error(query(page_size=1001), invalid, "page_size")
    await expect_error(query(page_size=-1), invalid, "page_size")
    await expect_error(query(page_token="%%%not-a-token"), invalid, "page_token")
    await expect_error(query(page_token="bm90IGEgdG9rZW4"), invalid, "page_token")  # "not a token"
    await expect_error(
        query(feature_filter=pb.FeatureFilter(name="rooms", op="LIKE", number=1)),
        invalid,
        "feature_filter.op",
    )
    await expect_error(
        query(
            feature_filter=pb.FeatureFilter(name="rooms", op="; DROP TABLE predictions", number=1)
        ),
        invalid,
        "feature_filter.op",
    )
    await expect_error(
        query(feature_filter=pb.FeatureFilter(name="", op="=", number=1)),
        invalid,
        "feature_filter.name",
    )
    await expect_error(
        query(feature_filter=pb.FeatureFilter(name="rooms", op="=")), invalid, "feature_filter"
    )
    await expect_error(query(start=ts(at(9)), end=ts(at(1))), invalid, "end")
    # Before, a NaN tolerance matched nothing and a negative one called every row wrong.
    for tolerance in (math.nan, -0.5, math.inf):
        await expect_error(
            query(wrong_only=True, tolerance=tolerance),
            invalid,
            f"tolerance: must be a finite number >= 0, got {tolerance}",
        )
    await expect_error(
        query(feature_filter=pb.FeatureFilter(name="rooms", op=">", number=math.nan)),
        invalid,
        "feature_filter.number: must be finite, got nan",
    )
    await expect_error(stub.QueryPredictions(pb.QueryPredictionsRequest()), invalid, "model")
    # Still all there.
    assert (await stats(stub, HOUSE)).predictions == 3


async def test_database_down_is_unavailable_and_the_store_recovers(
    stub: pb_grpc.StoreServiceStub, fresh_database_url: str, database_url: str
) -> None:
    dbname = psycopg.conninfo.conninfo_to_dict(fresh_database_url)["dbname"]
    await stub.GetStats(pb.GetStatsRequest(), timeout=10)
    with psycopg.connect(database_url, autocommit=True) as admin:
        admin.execute(f'ALTER DATABASE "{dbname}" ALLOW_CONNECTIONS false')
        admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE datname = %s AND pid <> pg_backend_pid()",
            (dbname,),
        )
        try:
            # A retryable status (the inference sink spools on it), not INTERNAL.
            await expect_error(
                stub.GetStats(pb.GetStatsRequest(), timeout=20),
                grpc.StatusCode.UNAVAILABLE,
                "database unavailable",
            )
        finally:
            admin.execute(f'ALTER DATABASE "{dbname}" ALLOW_CONNECTIONS true')
    response = await stub.GetStats(pb.GetStatsRequest(), timeout=20)
    assert response.storage_mode == "postgres-partitioned"


async def test_monitoring_rpcs_refuse_bad_input_by_field(stub: pb_grpc.StoreServiceStub) -> None:
    invalid, missing = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND
    await expect_error(
        stub.SavePlan(pb.SavePlanRequest(model="m", plan_yaml="  ")), invalid, "plan_yaml"
    )
    await expect_error(stub.SavePlan(pb.SavePlanRequest(plan_yaml="model: m")), invalid, "model")
    await expect_error(stub.GetPlan(pb.GetPlanRequest(model="m", revision=-1)), invalid, "revision")
    await expect_error(stub.GetPlan(pb.GetPlanRequest(model="m")), missing, "no monitoring plan")
    saved = await stub.SavePlan(pb.SavePlanRequest(model="m", plan_yaml="model: m\n"))
    got = await stub.GetPlan(pb.GetPlanRequest(model="m"))
    assert (got.revision, got.plan_yaml) == (saved.revision, "model: m\n")

    record = pb.RecordEvaluationRequest(model="m", version="1", level="GREEN")
    for change, fragment in (
        ({"level": "PURPLE"}, "level"),
        ({"version": ""}, "version"),
        ({"reasons_json": "[not json"}, "reasons_json"),
        ({"summary_json": '{"x": NaN}'}, "summary_json"),
    ):
        bad = pb.RecordEvaluationRequest()
        bad.CopyFrom(record)
        for key, value in change.items():
            setattr(bad, key, value)
        await expect_error(stub.RecordEvaluation(bad), invalid, fragment)
    point = pb.RecordEvaluationRequest()
    point.CopyFrom(record)
    point.points.add(metric="accuracy", value=0.9, details_json="{oops")
    await expect_error(stub.RecordEvaluation(point), invalid, "points[0].details_json")

    await expect_error(stub.ClaimAlerts(pb.ClaimAlertsRequest(limit=5000)), invalid, "limit")
    await expect_error(
        stub.ClaimAlerts(pb.ClaimAlertsRequest(lease_seconds=-1)), invalid, "lease_seconds"
    )
    await expect_error(stub.CompleteAlert(pb.CompleteAlertRequest(alert_id=0)), invalid, "alert_id")
    await expect_error(
        stub.CompleteAlert(pb.CompleteAlertRequest(alert_id=999, delivered=True)), missing, "999"
    )
    await expect_error(
        stub.AcknowledgeAlert(pb.AcknowledgeAlertRequest(alert_id=-3)), invalid, "alert_id"
    )
    await expect_error(stub.ListAlerts(pb.ListAlertsRequest(status="lost")), invalid, "status")
    await expect_error(stub.ListAlerts(pb.ListAlertsRequest(limit=-1)), invalid, "limit")
    await expect_error(
        stub.ListMetricPoints(
            pb.ListMetricPointsRequest(model="m", start=ts(at(5)), end=ts(at(1)))
        ),
        invalid,
        "end",
    )
    await expect_error(stub.ListMetricPoints(pb.ListMetricPointsRequest()), invalid, "model")
    # Nothing above left a trace.
    assert list((await stub.ListAlerts(pb.ListAlertsRequest())).alerts) == []
    assert list((await stub.GetHealth(pb.GetHealthRequest())).health) == []


async def test_a_killed_embedded_postgres_is_started_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The store's own PostgreSQL SIGKILLed (the OOM killer): the store lives on, so nothing
    else would restart it; the store does, and its calls work again."""
    import asyncio
    import os
    import signal
    import time

    from services.store.embedded import DATABASE_URL_ENV

    monkeypatch.delenv(DATABASE_URL_ENV, raising=False)
    settings = StoreSettings(port=0, data_dir=tmp_path, log_level="WARNING", pool_min_size=1)
    pid_file = tmp_path / "pgdata" / "postmaster.pid"
    async with (
        await start_store(settings) as started,
        aio.insecure_channel(f"127.0.0.1:{started.server.port}") as channel,
    ):
        stub = pb_grpc.StoreServiceStub(channel)
        await register(stub, HOUSE, HOUSE_SCHEMA, "regression")
        killed = int(pid_file.read_text().split()[0])
        os.kill(killed, signal.SIGKILL)
        deadline = time.monotonic() + 60

        def restarted() -> bool:
            # A backend the dead postmaster left may still answer a pooled call for a moment:
            # only a new postmaster shows the restart.
            try:
                return int(pid_file.read_text().split()[0]) != killed
            except (OSError, ValueError, IndexError):
                return False

        while True:
            try:
                listed = await stub.ListModelVersions(pb.ListModelVersionsRequest(model=HOUSE))
                if restarted():
                    break
            except grpc.RpcError:
                pass
            assert time.monotonic() < deadline, "the store never got its database back"
            await asyncio.sleep(0.5)
        assert [v.version for v in listed.model_versions] == ["1"]  # the same data


async def test_lists_filtered_by_an_unknown_model_are_not_found_naming_the_field(
    stub: pb_grpc.StoreServiceStub,
) -> None:
    """A typo in a list's model filter is NOT_FOUND naming the known models, not an empty
    list that reads as "nothing happened yet"; a known model with nothing listed is empty."""
    missing = grpc.StatusCode.NOT_FOUND
    await register(stub, HOUSE, HOUSE_SCHEMA, "regression")
    for call in (
        stub.ListAlerts(pb.ListAlertsRequest(model="nope")),
        stub.ListTrainingJobs(pb.ListTrainingJobsRequest(model="nope")),
        stub.ListRollouts(pb.ListRolloutsRequest(model="nope")),
    ):
        await expect_error(call, missing, "model: 'nope' is not registered", HOUSE)
    assert list((await stub.ListAlerts(pb.ListAlertsRequest(model=HOUSE))).alerts) == []
    jobs = await stub.ListTrainingJobs(pb.ListTrainingJobsRequest(model=HOUSE))
    assert list(jobs.jobs) == []
    assert list((await stub.ListRollouts(pb.ListRolloutsRequest(model=HOUSE))).rollouts) == []
    assert list((await stub.ListRollouts(pb.ListRolloutsRequest())).rollouts) == []


async def test_a_version_serving_again_raises_its_red_again(stub: pb_grpc.StoreServiceStub) -> None:
    """v1 went RED (alerts queued, a retrain made v2), then v1 was rolled back to: its RED is
    news again. Marking an already serving version serving forgets nothing."""
    for version in ("1", "2"):
        await register(stub, HOUSE, HOUSE_SCHEMA, "regression", version=version, sha=version * 64)

    async def serve(version: str) -> None:
        await stub.SetModelStatus(
            pb.SetModelStatusRequest(model=HOUSE, version=version, status=pb.MODEL_STATUS_SERVING)
        )

    async def red(version: str) -> pb.RecordEvaluationResponse:
        return await stub.RecordEvaluation(
            pb.RecordEvaluationRequest(
                model=HOUSE,
                version=version,
                level="RED",
                alerts=[pb.AlertRecord(targets=[pb.AlertTarget(action="retrain", sink="record")])],
            )
        )

    await serve("1")
    assert (await red("1")).alert_ids
    assert not (await red("1")).alert_ids  # still RED: not news
    await serve("2")
    await serve("1")  # rolled back to
    again = await red("1")
    assert again.level_changed and again.alert_ids, again
    await serve("1")  # already serving
    assert not (await red("1")).level_changed
