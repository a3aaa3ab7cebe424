"""The monitor's per-tick listing against a real store (fresh database, real gRPC): identities
each tick, a version's full record only when it is new to the monitor."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc import aio

from cyclone.store.v1 import store_service_pb2 as store_pb
from cyclone.store.v1 import store_service_pb2_grpc as store_grpc
from services.launch import start_store
from services.monitor import monitor as monitor_module
from services.monitor.monitor import Monitor
from services.store.main import StoreSettings

pytestmark = pytest.mark.integration

SCHEMA = json.dumps(
    {
        "task": "classification",
        "features": [{"name": "x", "kind": "numeric"}],
        "class_labels": ["0", "1"],
    }
)


@pytest.fixture
async def store(fresh_database_url: str) -> AsyncIterator[tuple[str, store_grpc.StoreServiceStub]]:
    settings = StoreSettings(
        port=0, database_url=fresh_database_url, log_level="WARNING", pool_min_size=1
    )
    async with await start_store(settings) as started:
        address = f"127.0.0.1:{started.server.port}"
        async with aio.insecure_channel(address) as channel:
            yield address, store_grpc.StoreServiceStub(channel)


class CountingStub:
    """The real stub, counting which RPCs the monitor calls; `missing`: models whose
    GetModelVersion answers NOT_FOUND (removed between the listing and the fetch)."""

    def __init__(self, stub: store_grpc.StoreServiceStub) -> None:
        self.stub = stub
        self.calls: Counter[str] = Counter()
        self.missing: set[str] = set()

    def __getattr__(self, name: str) -> Any:
        self.calls[name] += 1
        if name == "GetModelVersion":
            return self._get_model_version
        return getattr(self.stub, name)

    async def _get_model_version(
        self, request: store_pb.GetModelVersionRequest, **kwargs: Any
    ) -> store_pb.GetModelVersionResponse:
        if request.model in self.missing:
            raise aio.AioRpcError(grpc.StatusCode.NOT_FOUND, aio.Metadata(), aio.Metadata(), "gone")
        response: store_pb.GetModelVersionResponse = await self.stub.GetModelVersion(
            request, **kwargs
        )
        return response


def counting(monitor: Monitor) -> CountingStub:
    spy = CountingStub(monitor.store)
    monitor._store = spy  # type: ignore[assignment]
    return spy


@pytest.fixture
async def monitor(
    store: tuple[str, store_grpc.StoreServiceStub], tmp_path: Path
) -> AsyncIterator[Monitor]:
    m = Monitor(store[0], record_path=tmp_path / "alerts.jsonl")
    await m.start(schedule=False)
    try:
        yield m
    finally:
        await m.stop()


async def serve(
    stub: store_grpc.StoreServiceStub, model: str, version: str, accuracy: float
) -> None:
    """Register `version` of `model` with `accuracy` as its baseline and make it serving."""
    await stub.RegisterModelVersion(
        store_pb.RegisterModelVersionRequest(
            model_version=store_pb.ModelVersion(
                model=model,
                version=version,
                task="classification",
                sha256=f"{version}{model}".ljust(64, "0"),
                schema_json=SCHEMA,
                evaluation_json=json.dumps({"metrics": {"accuracy": accuracy}}),
            )
        ),
        timeout=10,
    )
    await stub.SetModelStatus(
        store_pb.SetModelStatusRequest(
            model=model, version=version, status=store_pb.MODEL_STATUS_SERVING
        ),
        timeout=10,
    )


async def test_a_new_serving_version_is_picked_up_and_an_unchanged_one_is_not_refetched(
    store: tuple[str, store_grpc.StoreServiceStub], monitor: Monitor
) -> None:
    _, stub = store
    await serve(stub, "a", "1", 0.8)
    await serve(stub, "b", "1", 0.7)
    # A staged version is not monitored.
    await stub.RegisterModelVersion(
        store_pb.RegisterModelVersionRequest(
            model_version=store_pb.ModelVersion(model="c", version="1", task="classification")
        ),
        timeout=10,
    )
    spy = counting(monitor)
    first = await monitor._monitored_models()
    assert sorted(first) == ["a", "b"]
    assert spy.calls == {"ListModelVersions": 1, "GetModelVersion": 2}
    assert (first["a"].version, first["a"].baseline) == ("1", {"accuracy": 0.8})
    assert first["a"].task == "classification"

    again = await monitor._monitored_models()
    assert again["a"] is first["a"] and again["b"] is first["b"]  # cached, not re-read
    assert spy.calls == {"ListModelVersions": 2, "GetModelVersion": 2}

    await serve(stub, "a", "2", 0.9)  # a retrain: version 2 serves, version 1 retired
    changed = await monitor._monitored_models()
    assert (changed["a"].version, changed["a"].baseline) == ("2", {"accuracy": 0.9})
    assert changed["b"] is first["b"]
    assert spy.calls == {"ListModelVersions": 3, "GetModelVersion": 3}  # only a's version 2
    assert {key[:2] for key in monitor._infos} == {("a", "2"), ("b", "1")}  # v1 forgotten


async def test_many_new_versions_come_in_one_full_listing(
    store: tuple[str, store_grpc.StoreServiceStub],
    monitor: Monitor,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _, stub = store
    monkeypatch.setattr(monitor_module, "FULL_LISTING_ABOVE", 2)
    for i in range(4):
        await serve(stub, f"m{i}", "1", 0.5 + i / 10)
    await serve(stub, "m0", "2", 0.95)  # m0's version 1 is retired: not in the serving list
    spy = counting(monitor)
    listed = await monitor._monitored_models()
    assert spy.calls == {"ListModelVersions": 2}  # the tick's summary, then one full listing
    assert {m: (info.version, info.baseline["accuracy"]) for m, info in listed.items()} == {
        "m0": ("2", 0.95),
        "m1": ("1", 0.6),
        "m2": ("1", 0.7),
        "m3": ("1", 0.8),
    }


async def test_a_version_gone_before_its_fetch_is_left_out_until_it_can_be_read(
    store: tuple[str, store_grpc.StoreServiceStub], monitor: Monitor
) -> None:
    _, stub = store
    await serve(stub, "a", "1", 0.8)
    await serve(stub, "b", "1", 0.7)
    spy = counting(monitor)
    spy.missing = {"b"}
    assert sorted(await monitor._monitored_models()) == ["a"]
    spy.missing = set()
    listed = await monitor._monitored_models()
    assert sorted(listed) == ["a", "b"] and listed["b"].baseline == {"accuracy": 0.7}
