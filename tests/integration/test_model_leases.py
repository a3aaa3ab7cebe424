"""Monitors sharing the models through leases in the store: a real store (fresh database), real
gRPC, monitors in this process.

Each model has at most one holder; a holder that joins gets a fair share at the next tick of the
others, one that stops calling loses its models when its leases end, and a monitor whose lease
ends stops evaluating that model at once.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from grpc import aio
from support import eventually, expect_error

from bench.monitor_scale import register_models
from cyclone.plugin_api import Window
from cyclone.settings import SettingsError
from cyclone.store.v1 import store_service_pb2 as store_pb
from cyclone.store.v1 import store_service_pb2_grpc as store_grpc
from services.launch import start_store
from services.monitor.main import MonitorSettings
from services.monitor.monitor import Monitor
from services.monitor.records import ModelInfo
from services.store.main import StoreSettings

pytestmark = pytest.mark.integration

ENTRY = store_pb.ModelVersion(
    task="classification",
    schema_json='{"task": "classification", "features": [{"name": "x", "kind": "numeric"}],'
    ' "class_labels": ["0", "1"]}',
)
MODELS = [f"model-{i}" for i in range(5)]


@pytest.fixture
async def store(fresh_database_url: str) -> AsyncIterator[tuple[str, store_grpc.StoreServiceStub]]:
    settings = StoreSettings(
        port=0, database_url=fresh_database_url, log_level="WARNING", pool_min_size=1
    )
    async with await start_store(settings) as started:
        address = f"127.0.0.1:{started.server.port}"
        async with aio.insecure_channel(address) as channel:
            yield address, store_grpc.StoreServiceStub(channel)


async def _lease(
    stub: store_grpc.StoreServiceStub, holder: str, models: list[str], seconds: int = 30
) -> store_pb.LeaseModelsResponse:
    return await stub.LeaseModels(
        store_pb.LeaseModelsRequest(holder=holder, models=models, lease_seconds=seconds),
        timeout=10,
    )


def _held(response: store_pb.LeaseModelsResponse) -> set[str]:
    return {lease.model for lease in response.leases}


async def test_one_holder_leases_every_model(
    store: tuple[str, store_grpc.StoreServiceStub],
) -> None:
    _, stub = store
    first = await _lease(stub, "a", MODELS)
    assert _held(first) == set(MODELS)
    assert all(lease.acquired for lease in first.leases)
    assert (first.holders, first.fair_share) == (1, 5)
    again = await _lease(stub, "a", MODELS)
    assert _held(again) == set(MODELS)
    assert not any(lease.acquired for lease in again.leases)  # renewed, not taken anew


async def test_a_joining_holder_gets_a_fair_share_and_no_model_has_two(
    store: tuple[str, store_grpc.StoreServiceStub],
) -> None:
    _, stub = store
    assert _held(await _lease(stub, "a", MODELS)) == set(MODELS)
    joined = await _lease(stub, "b", MODELS)
    assert _held(joined) == set()  # all held by a, which has not yet seen b
    assert joined.holders == 2
    a = _held(await _lease(stub, "a", MODELS))  # a gives up what is past its share (3)
    b = _held(await _lease(stub, "b", MODELS))
    assert len(a) == 3 and len(b) == 2
    assert a.isdisjoint(b) and a | b == set(MODELS)
    # Stable: more ticks move nothing.
    assert _held(await _lease(stub, "a", MODELS)) == a
    assert _held(await _lease(stub, "b", MODELS)) == b


async def test_a_holder_that_stops_loses_its_models_when_its_leases_end(
    store: tuple[str, store_grpc.StoreServiceStub],
) -> None:
    _, stub = store
    await _lease(stub, "a", MODELS[:2], seconds=1)
    await _lease(stub, "b", MODELS[:2], seconds=1)
    a = _held(await _lease(stub, "a", MODELS[:2], seconds=1))
    assert len(a) == 1
    # a stops calling; b keeps renewing and takes a's model once a's lease ended.

    async def b_has_both() -> bool:
        return _held(await _lease(stub, "b", MODELS[:2], seconds=1)) == set(MODELS[:2])

    await eventually(b_has_both, 5, "b takes the model of a after its lease ended")


async def test_release_hands_the_models_over_at_once_and_models_gone_are_released(
    store: tuple[str, store_grpc.StoreServiceStub],
) -> None:
    _, stub = store
    await _lease(stub, "a", MODELS)
    await _lease(stub, "b", MODELS)
    released = await stub.ReleaseModelLeases(
        store_pb.ReleaseModelLeasesRequest(holder="a"), timeout=10
    )
    assert released.released == 5
    taken = await _lease(stub, "b", MODELS)
    assert _held(taken) == set(MODELS)
    assert taken.holders == 1  # a's heartbeat ended too
    # A model the caller no longer lists (retired) is released.
    assert _held(await _lease(stub, "b", MODELS[1:])) == set(MODELS[1:])


async def test_a_taken_lease_carries_the_last_evaluation_time(
    store: tuple[str, store_grpc.StoreServiceStub],
) -> None:
    _, stub = store
    await stub.RecordEvaluation(
        store_pb.RecordEvaluationRequest(model="model-0", version="1", level="GREEN"), timeout=10
    )
    leases = {lease.model: lease for lease in (await _lease(stub, "a", MODELS[:2])).leases}
    assert leases["model-0"].HasField("last_evaluated_at")
    assert not leases["model-1"].HasField("last_evaluated_at")


@pytest.mark.parametrize(
    ("request_", "field"),
    [
        (store_pb.LeaseModelsRequest(holder="", models=["m"], lease_seconds=5), "holder"),
        (store_pb.LeaseModelsRequest(holder="a", models=["m"], lease_seconds=0), "lease_seconds"),
        (
            store_pb.LeaseModelsRequest(holder="a", models=["m"], lease_seconds=99999),
            "lease_seconds",
        ),
        (
            store_pb.LeaseModelsRequest(holder="a", models=["ok", "no/pe"], lease_seconds=5),
            "models[1]",
        ),
        (store_pb.LeaseModelsRequest(holder="a" * 201, models=[], lease_seconds=5), "holder"),
    ],
)
async def test_bad_lease_requests_name_the_field(
    store: tuple[str, store_grpc.StoreServiceStub],
    request_: store_pb.LeaseModelsRequest,
    field: str,
) -> None:
    _, stub = store
    await expect_error(
        stub.LeaseModels(request_, timeout=10), grpc.StatusCode.INVALID_ARGUMENT, field
    )


async def test_release_without_a_holder_is_refused(
    store: tuple[str, store_grpc.StoreServiceStub],
) -> None:
    _, stub = store
    await expect_error(
        stub.ReleaseModelLeases(store_pb.ReleaseModelLeasesRequest(), timeout=10),
        grpc.StatusCode.INVALID_ARGUMENT,
        "holder",
    )


def test_a_lease_shorter_than_three_ticks_is_refused() -> None:
    with pytest.raises(SettingsError, match="lease_seconds"):
        MonitorSettings(tick_seconds=1.0, lease_seconds=2)


# -- monitors ----------------------------------------------------------------------------------


def _monitor(address: str, tmp_path: Path, holder: str) -> Monitor:
    return Monitor(
        address, record_path=tmp_path / f"{holder}.jsonl", holder=holder, lease_seconds=30
    )


async def test_two_monitors_evaluate_each_model_once(
    store: tuple[str, store_grpc.StoreServiceStub], tmp_path: Path
) -> None:
    address, stub = store
    await register_models(stub, ENTRY, MODELS, every_seconds=60)
    a, b = _monitor(address, tmp_path, "a"), _monitor(address, tmp_path, "b")
    await a.start(schedule=False)
    await b.start(schedule=False)
    try:
        await a.run_due()  # alone: leases and evaluates everything
        assert sorted(a.statuses) == MODELS
        await b.run_due()  # joins: a holds everything until its next tick
        assert b.statuses == {}
        await a.run_due()  # gives up what is past its share; evaluates nothing (not due)
        await b.run_due()  # takes them; their schedule carries on from a's evaluation
        assert b.statuses == {}
        assert len(a._leases) == 3 and len(b._leases) == 2
        assert set(a._leases).isdisjoint(b._leases)
        # b shows every model all the same: a's evaluations, from the store.
        await b.follow_peers(await b._monitored_models())
        assert sorted(b.statuses) == MODELS
        assert all(s.evaluated_at >= a.statuses[s.model].evaluated_at for s in b.statuses.values())
        assert {s.level for s in b.statuses.values()} == {a.statuses[m].level for m in MODELS}
        # ... with a's metric values, not only its levels (the dashboard shows them).
        for model in MODELS:
            assert b.statuses[model].evaluation.metrics == a.statuses[model].evaluation.metrics
            assert b.statuses[model].evaluation.metrics, model
    finally:
        await a.stop()
        await b.stop()
    # Each model was evaluated once (by a): one level point each.
    for model in MODELS:
        points = await stub.ListMetricPoints(
            store_pb.ListMetricPointsRequest(model=model, metric="level"), timeout=10
        )
        assert len(points.points) == 1, model


async def test_a_lost_lease_stops_the_evaluation_in_flight(
    store: tuple[str, store_grpc.StoreServiceStub], tmp_path: Path
) -> None:
    address, stub = store
    await register_models(stub, ENTRY, MODELS[:1], every_seconds=60)
    a = _monitor(address, tmp_path, "a")
    reading, never = asyncio.Event(), asyncio.Event()
    read = a.read_window

    async def held(info: ModelInfo, plan: object) -> Window:
        reading.set()
        await never.wait()  # the window read hangs until the round is cancelled
        return await read(info, plan)  # type: ignore[arg-type]

    a.read_window = held  # type: ignore[method-assign]
    await a.start(schedule=False)
    try:
        run = asyncio.create_task(a.run_due())
        await asyncio.wait_for(reading.wait(), 10)
        # The lease is lost: released in the store (as for an operator or a store that
        # restarted) and taken by another monitor.
        await stub.ReleaseModelLeases(store_pb.ReleaseModelLeasesRequest(holder="a"), timeout=10)
        assert _held(await _lease(stub, "b", MODELS[:1])) == {MODELS[0]}
        await a.lease(await a._monitored_models())  # a's next tick
        await asyncio.wait_for(run, 5)  # the round ended: cancelled, not finished
        assert not a.holds(MODELS[0])
    finally:
        await a.stop()
    assert a.statuses == {}
    points = await stub.ListMetricPoints(
        store_pb.ListMetricPointsRequest(model=MODELS[0], metric="level"), timeout=10
    )
    assert list(points.points) == []


async def test_leases_end_by_the_clock_when_the_store_is_gone(
    fresh_database_url: str, tmp_path: Path
) -> None:
    settings = StoreSettings(
        port=0, database_url=fresh_database_url, log_level="WARNING", pool_min_size=1
    )
    started = await start_store(settings)
    address = f"127.0.0.1:{started.server.port}"
    async with aio.insecure_channel(address) as channel:
        await register_models(
            store_grpc.StoreServiceStub(channel), ENTRY, MODELS[:1], every_seconds=60
        )
    monitor = Monitor(
        address, record_path=tmp_path / "a.jsonl", holder="a", lease_seconds=3, tick_seconds=0.2
    )
    reading, never = asyncio.Event(), asyncio.Event()

    async def held(info: ModelInfo, plan: object) -> Window:
        reading.set()
        await never.wait()  # the window read hangs: the round is in flight when the store goes
        raise AssertionError("unreachable")

    monitor.read_window = held  # type: ignore[method-assign]
    await monitor.start(schedule=True)
    try:
        await asyncio.wait_for(reading.wait(), 10)
        assert monitor.holds(MODELS[0])
        gone_at = asyncio.get_running_loop().time()
        await started.server.stop(0)  # the store goes away: no renewal from now on

        async def lease_ended() -> bool:
            return not monitor.holds(MODELS[0]) and not monitor._rounds

        await eventually(lease_ended, 10, "the lease ends and the round in flight stops")
        assert asyncio.get_running_loop().time() - gone_at <= 3 + 0.5
    finally:
        await monitor.stop()
    assert monitor.statuses == {}


async def test_an_evaluation_is_recorded_only_under_its_lease(
    store: tuple[str, store_grpc.StoreServiceStub],
) -> None:
    _, stub = store

    def record(holder: str) -> store_pb.RecordEvaluationRequest:
        return store_pb.RecordEvaluationRequest(
            model="model-0", version="1", level="GREEN", lease_holder=holder
        )

    await _lease(stub, "a", MODELS[:1])
    await stub.RecordEvaluation(record("a"), timeout=10)
    await expect_error(
        stub.RecordEvaluation(record("b"), timeout=10),
        grpc.StatusCode.FAILED_PRECONDITION,
        "lease_holder",
    )
    await stub.ReleaseModelLeases(store_pb.ReleaseModelLeasesRequest(holder="a"), timeout=10)
    await expect_error(
        stub.RecordEvaluation(record("a"), timeout=10),
        grpc.StatusCode.FAILED_PRECONDITION,
        "lease_holder",
    )
    await stub.RecordEvaluation(record(""), timeout=10)  # unfenced (EvaluateNow): recorded
    health = await stub.GetHealth(store_pb.GetHealthRequest(model="model-0"), timeout=10)
    assert len(health.health) == 1
