"""The monitor's schedule with many models: a real store (fresh database), real gRPC, and a
window read that the tests can hold to play a slow model.

Evaluations of many models run at once within `max_concurrent_evaluations`; a model whose
window read hangs delays none of the others' rounds; the lag metrics rise while models wait.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
from grpc import aio
from prometheus_client import REGISTRY
from support import eventually

from bench.monitor_scale import register_models
from cyclone.plugin_api import Window
from cyclone.settings import SettingsError, load_settings
from cyclone.store.v1 import store_service_pb2 as store_pb
from cyclone.store.v1 import store_service_pb2_grpc as store_grpc
from services.launch import start_store
from services.monitor.main import MonitorSettings
from services.monitor.monitor import Monitor
from services.monitor.records import ModelInfo
from services.store.main import StoreSettings

pytestmark = pytest.mark.integration

Read = Callable[[ModelInfo, object], Awaitable[Window]]
ENTRY = store_pb.ModelVersion(
    task="classification",
    schema_json='{"task": "classification", "features": [{"name": "x", "kind": "numeric"}],'
    ' "class_labels": ["0", "1"]}',
)


@pytest.fixture
async def store_address(fresh_database_url: str) -> AsyncIterator[str]:
    settings = StoreSettings(
        port=0, database_url=fresh_database_url, log_level="WARNING", pool_min_size=1
    )
    async with await start_store(settings) as started:
        yield f"127.0.0.1:{started.server.port}"


async def _models(store_address: str, n: int, every_seconds: int = 60) -> list[str]:
    names = [f"model-{i:02d}" for i in range(n)]
    async with aio.insecure_channel(store_address) as channel:
        stub = store_grpc.StoreServiceStub(channel)
        await register_models(stub, ENTRY, names, every_seconds)
    return names


def _monitor(store_address: str, tmp_path: Path, bound: int, tick: float = 0.05) -> Monitor:
    return Monitor(
        store_address,
        record_path=tmp_path / "alerts.jsonl",
        tick_seconds=tick,
        max_concurrent_evaluations=bound,
    )


def _hold(monitor: Monitor, hook: Callable[[str], Awaitable[None]]) -> None:
    """Every window read of `monitor` awaits `hook(model)` first."""
    read = monitor.read_window

    async def held(info: ModelInfo, plan: object) -> Window:
        await hook(info.model)
        return await read(info, plan)  # type: ignore[arg-type]

    monitor.read_window = held  # type: ignore[method-assign]


def _sample(name: str) -> float:
    return REGISTRY.get_sample_value(name) or 0.0


async def test_many_models_are_evaluated_at_once_within_the_bound(
    store_address: str, tmp_path: Path
) -> None:
    names = await _models(store_address, 12)
    monitor = _monitor(store_address, tmp_path, bound=4)
    in_flight, peak, full = 0, 0, asyncio.Event()

    async def count(model: str) -> None:
        nonlocal in_flight, peak
        in_flight += 1
        peak = max(peak, in_flight)
        if in_flight >= 4:
            full.set()
        try:
            # Hold until the bound is reached (or it never will be: then fail below).
            await asyncio.wait_for(full.wait(), 10)
        except TimeoutError:
            pass
        finally:
            in_flight -= 1

    _hold(monitor, count)
    await monitor.start(schedule=False)
    try:
        await monitor.run_due()
    finally:
        await monitor.stop()
    assert sorted(monitor.statuses) == names  # every model evaluated
    assert 1 < peak <= 4, peak


async def test_a_slow_model_does_not_delay_the_others_schedule(
    store_address: str, tmp_path: Path
) -> None:
    await _models(store_address, 2, every_seconds=1)
    slow, fast = "model-00", "model-01"
    release = asyncio.Event()
    evaluations: dict[str, int] = {slow: 0, fast: 0}

    async def hang_slow(model: str) -> None:
        if model == slow:
            await release.wait()

    monitor = _monitor(store_address, tmp_path, bound=4)
    _hold(monitor, hang_slow)

    async def counted() -> None:
        async for status in monitor.watch(""):
            evaluations[status.model] += 1

    watcher = asyncio.create_task(counted())
    await monitor.start(schedule=True)
    try:

        async def fast_on_schedule() -> bool:
            return evaluations[fast] >= 3

        # The fast model's 1 s schedule runs round after round while the slow one hangs.
        await eventually(fast_on_schedule, 15, "three rounds of the fast model")
        assert evaluations[slow] == 0
        assert max(monitor.lags) < 2.0, list(monitor.lags)  # its rounds on time, 1 s apart
        release.set()

        async def slow_done() -> bool:
            return evaluations[slow] >= 1

        await eventually(slow_done, 10, "the slow model's evaluation once released")
    finally:
        release.set()
        await monitor.stop()
        watcher.cancel()


async def test_lag_metrics_rise_when_evaluations_wait(store_address: str, tmp_path: Path) -> None:
    await _models(store_address, 2)
    first, release = asyncio.Event(), asyncio.Event()
    blocker: list[str] = []

    async def block_the_first(model: str) -> None:
        if not blocker:
            blocker.append(model)
            first.set()
        if model == blocker[0]:
            await release.wait()

    monitor = _monitor(store_address, tmp_path, bound=1)
    _hold(monitor, block_the_first)
    lag_sum = _sample("cyclone_monitor_evaluation_lag_seconds_sum")
    await monitor.start(schedule=True)
    try:
        await asyncio.wait_for(first.wait(), 10)

        async def overdue() -> bool:
            # The other model waits for the one slot: overdue, and more so each tick.
            return _sample("cyclone_monitor_overdue_seconds") > 0.3

        await eventually(overdue, 10, "the overdue gauge to rise")
        assert monitor.overdue_seconds() > 0.3
        release.set()

        async def both_done() -> bool:
            return len(monitor.statuses) == 2

        await eventually(both_done, 10, "both evaluations")
    finally:
        release.set()
        await monitor.stop()
    # The waiting model's lag was observed when it finally started.
    assert _sample("cyclone_monitor_evaluation_lag_seconds_sum") - lag_sum > 0.3
    assert max(monitor.lags) > 0.3


@pytest.mark.parametrize("value", ["0", "-2"])
def test_a_bad_concurrency_setting_names_the_field(value: str) -> None:
    with pytest.raises(SettingsError, match="max_concurrent_evaluations") as info:
        load_settings(MonitorSettings, {"max_concurrent_evaluations": value}, env={})
    assert value in str(info.value)


def test_a_non_integer_concurrency_setting_names_the_field() -> None:
    with pytest.raises(SettingsError, match="max_concurrent_evaluations"):
        load_settings(MonitorSettings, {"max_concurrent_evaluations": "many"}, env={})
