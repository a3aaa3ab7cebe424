"""Known-answer probes end to end: real store, real inference servers, the monitor's probe loop.

A probe call is answered but never reaches the store; a wrong model behind the address turns
the level RED naming the rows; an address nobody answers turns it AMBER; uptime is reported.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import shutil
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from grpc import aio

from cyclone.client import build_request
from cyclone.inference.v1 import inference_service_pb2_grpc as inf_grpc
from cyclone.models.registration import register
from cyclone.models.repository import ModelRepository
from cyclone.plan import default_plan, plan_to_dict
from cyclone.plugin_api import Level
from cyclone.store.v1 import store_service_pb2 as store_pb
from cyclone.store.v1 import store_service_pb2_grpc as store_grpc
from services.inference.main import InferenceSettings
from services.launch import start_inference, start_monitor, start_store
from services.monitor.main import MonitorSettings
from services.monitor.monitor import Monitor
from services.monitor.probes import PROBE_METADATA, known_answers_from_schema
from services.store.main import StoreSettings

pytestmark = pytest.mark.integration

MODEL = "credit"
FEATURES = ["age", "income", "debt_ratio", "city"]


def _import(root: Path, seed: int, shift: float) -> Path:
    from cyclone.models.convert import import_pipeline
    from cyclone_app.examples import credit_frame, credit_pipeline

    sample = credit_frame(600, seed=seed, shift=shift)
    directory, _, _ = import_pipeline(
        credit_pipeline(sample), MODEL, root, sample=sample, label_column="defaulted"
    )
    return directory


@pytest.fixture(scope="module")
def repos(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(the credit model, a copy whose version directory holds another credit model)."""
    good = tmp_path_factory.mktemp("probes-good")
    directory = _import(good, seed=0, shift=0.0)
    other = _import(tmp_path_factory.mktemp("probes-other"), seed=7, shift=1.5)
    wrong = tmp_path_factory.mktemp("probes-wrong") / "repo"
    shutil.copytree(good, wrong)
    swapped = wrong / MODEL / directory.name
    shutil.rmtree(swapped)
    shutil.copytree(other, swapped)  # same name and version, another model's artifact
    return good, wrong


ORDINARY_ROW = {"age": 40.0, "income": 30000.0, "debt_ratio": 0.3, "city": "porto"}


async def _wait_stored(store: store_grpc.StoreServiceStub, count: int) -> None:
    deadline = time.monotonic() + 15
    while await _predictions(store) < count:
        assert time.monotonic() < deadline, "the ordinary call never reached the store"
        await asyncio.sleep(0.05)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _inference(repo: Path, tmp: Path, store: str = "") -> InferenceSettings:
    return InferenceSettings(
        model_repository=repo,
        port=0,
        store=store,
        spool_dir=tmp / "spool",
        log_flush_interval=0.05,
        log_level="WARNING",
        data_dir=tmp,
    )


async def _predictions(store: store_grpc.StoreServiceStub) -> int:
    stats = await store.GetStats(store_pb.GetStatsRequest(model=MODEL), timeout=5)
    return sum(m.predictions for m in stats.models if m.model == MODEL)


async def _set_probes(monitor: Monitor, probes: dict[str, Any]) -> None:
    plan = plan_to_dict(default_plan(MODEL, "classification"))
    plan["probes"] = probes
    await monitor.set_plan(MODEL, yaml.safe_dump(plan))


@pytest.fixture
async def store_address(fresh_database_url: str, tmp_path: Path) -> AsyncIterator[str]:
    settings = StoreSettings(
        port=0, database_url=fresh_database_url, log_level="WARNING", pool_min_size=1
    )
    async with await start_store(settings) as started:
        yield f"127.0.0.1:{started.server.port}"


@pytest.fixture
async def monitor(store_address: str, tmp_path: Path) -> AsyncIterator[Monitor]:
    settings = MonitorSettings(port=0, store=store_address, log_level="WARNING", data_dir=tmp_path)
    async with await start_monitor(settings, schedule=False) as started:
        yield started.domain


async def _register(store_address: str, repo: Path) -> None:
    """The good version, registered (with its probes) and serving."""
    async with aio.insecure_channel(store_address) as channel:
        files = ModelRepository(repo).files(MODEL)
        assert await register(store_grpc.StoreServiceStub(channel), files)


async def test_import_keeps_probes_and_the_registry_carries_them(
    repos: tuple[Path, Path], store_address: str
) -> None:
    good, _ = repos
    files = ModelRepository(good).files(MODEL)
    written = json.loads((files.directory / "probes.json").read_text())
    assert len(written["rows"]) == len(written["outputs"]) == 20
    assert set(written["rows"][0]) == set(FEATURES)
    assert {"label", "probabilities"} <= set(written["outputs"][0])
    await _register(store_address, good)
    async with aio.insecure_channel(store_address) as channel:
        entry = await store_grpc.StoreServiceStub(channel).GetModelVersion(
            store_pb.GetModelVersionRequest(model=MODEL), timeout=5
        )
    answers = known_answers_from_schema(files.version, entry.model_version.schema_json)
    assert answers is not None and list(answers.outputs) == written["outputs"]


async def test_probe_request_is_answered_but_not_logged(
    repos: tuple[Path, Path], store_address: str, tmp_path: Path
) -> None:
    good, _ = repos
    rows = [ORDINARY_ROW] * 5
    async with (
        await start_inference(_inference(good, tmp_path, store_address)) as inference,
        aio.insecure_channel(f"127.0.0.1:{inference.server.port}") as channel,
        aio.insecure_channel(store_address) as store_channel,
    ):
        stub = inf_grpc.InferenceServiceStub(channel)
        store = store_grpc.StoreServiceStub(store_channel)
        probed = await stub.Predict(build_request(MODEL, rows), metadata=PROBE_METADATA)
        assert len(probed.labels) == 5  # answered like any call
        await stub.Predict(build_request(MODEL, rows[:2]), timeout=10)
        # The positive control: the sink logs in serving order, so once the later ordinary
        # call is stored a logged probe would be stored too.
        await _wait_stored(store, 2)
        assert await _predictions(store) == 2


async def test_right_answers_keep_green_and_report_uptime(
    repos: tuple[Path, Path], store_address: str, monitor: Monitor, tmp_path: Path
) -> None:
    good, _ = repos
    await _register(store_address, good)
    async with await start_inference(_inference(good, tmp_path)) as inference:
        await _set_probes(monitor, {"every": "1s", "address": f"127.0.0.1:{inference.server.port}"})
        await monitor.run_due()
    status = monitor.statuses[MODEL]
    assert status.level is Level.GREEN, status.evaluation.reasons
    assert status.evaluation.metrics["uptime"].value == 1.0


async def test_a_different_model_answering_turns_red_naming_the_rows(
    repos: tuple[Path, Path], store_address: str, monitor: Monitor, tmp_path: Path
) -> None:
    good, wrong = repos
    await _register(store_address, good)
    async with await start_inference(_inference(wrong, tmp_path)) as inference:
        await _set_probes(monitor, {"address": f"127.0.0.1:{inference.server.port}"})
        await monitor.run_due()
    status = monitor.statuses[MODEL]
    assert status.level is Level.RED
    reason = next(r for r in status.evaluation.reasons if r.startswith("probes:"))
    assert "known rows differently" in reason and "row " in reason, reason
    assert "recorded" in reason or "probabilities differ" in reason, reason
    assert status.evaluation.actions == ("notify",)  # a serving fault: not retrained


async def test_another_version_answering_is_judged_on_its_own_rows(
    store_address: str, monitor: Monitor, tmp_path: Path
) -> None:
    """Mid-rollout the endpoint answers with the new version: it is judged by its own recorded
    answers to its own rows (each version keeps rows of its own sample), not by its answers to
    the serving version's rows against what it answered to others (a false RED every rollout)."""
    repo = tmp_path / "repo"
    first = _import(repo, seed=0, shift=0.0)
    second = _import(repo, seed=7, shift=1.5)  # version 2: another sample, other probe rows
    rows = [json.loads((d / "probes.json").read_text())["rows"] for d in (first, second)]
    assert rows[0] != rows[1]
    async with aio.insecure_channel(store_address) as channel:
        stub = store_grpc.StoreServiceStub(channel)
        assert await register(stub, ModelRepository(repo).files(MODEL, first.name))
        assert not await register(stub, ModelRepository(repo).files(MODEL, second.name))
    # The server answers with the repository's latest version, 2, while 1 is serving.
    async with await start_inference(_inference(repo, tmp_path)) as inference:
        await _set_probes(monitor, {"every": "1s", "address": f"127.0.0.1:{inference.server.port}"})
        await monitor.run_due()
    status = monitor.statuses[MODEL]
    assert monitor.probe_records[MODEL].rounds, "no probe round judged"  # positive control
    assert status.level is Level.GREEN, status.evaluation.reasons
    assert not [r for r in status.evaluation.reasons if r.startswith("probes:")]


async def test_an_unreachable_endpoint_turns_amber_and_counts_against_uptime(
    repos: tuple[Path, Path], store_address: str, monitor: Monitor
) -> None:
    good, _ = repos
    await _register(store_address, good)
    address = f"127.0.0.1:{_free_port()}"
    monitor.request_timeout = 2.0
    monitor.probe_grace_seconds = 0.0  # long past any start-up
    monitor.probe_retry_seconds = 0.0
    await _set_probes(monitor, {"address": address})
    await monitor.run_due()
    status = monitor.statuses[MODEL]
    assert status.level is Level.AMBER
    [reason] = [r for r in status.evaluation.reasons if r.startswith("probes:")]
    # One short sentence: the status name and its details, never an AioRpcError repr.
    assert reason.startswith(f"probes: no answer from {address}: UNAVAILABLE: "), reason
    assert "\n" not in reason and "AioRpcError" not in reason, reason
    assert "debug_error_string" not in reason, reason
    assert status.evaluation.metrics["uptime"].value == 0.0


async def test_no_answer_before_the_first_answer_is_a_start_up_not_an_outage(
    repos: tuple[Path, Path], store_address: str, monitor: Monitor, tmp_path: Path
) -> None:
    """Within the grace a model that never answered stays GREEN; once it answered, a round
    without an answer counts at once."""
    good, _ = repos
    await _register(store_address, good)
    monitor.request_timeout = 2.0
    monitor.probe_retry_seconds = 0.0
    port = _free_port()
    await _set_probes(monitor, {"every": "1s", "address": f"127.0.0.1:{port}"})
    await monitor.run_due()  # nothing listens yet: the mesh is "starting"
    status = monitor.statuses[MODEL]
    assert status.level is Level.GREEN, status.evaluation.reasons
    assert "uptime" not in status.evaluation.metrics  # the round is not counted at all
    settings = dataclasses.replace(_inference(good, tmp_path), port=port)
    async with await start_inference(settings):
        deadline = time.monotonic() + 10
        while MODEL not in monitor.probe_records:  # the channel's reconnect backoff
            assert time.monotonic() < deadline, "the probe never got an answer"
            monitor._next_probe.clear()
            await monitor.run_due()
            await asyncio.sleep(0.2)
        assert monitor.statuses[MODEL].level is Level.GREEN
        assert monitor.statuses[MODEL].evaluation.metrics["uptime"].value == 1.0
    monitor._next_probe.clear()
    await monitor.run_due()  # it answered before: now no answer is an outage
    status = monitor.statuses[MODEL]
    assert status.level is Level.AMBER
    assert any("probes: no answer" in r for r in status.evaluation.reasons)


async def test_no_address_means_no_probes(
    repos: tuple[Path, Path], store_address: str, monitor: Monitor
) -> None:
    good, _ = repos
    await _register(store_address, good)
    await monitor.run_due()
    assert "uptime" not in monitor.statuses[MODEL].evaluation.metrics
    assert MODEL not in monitor.probe_records


async def test_probes_through_envoy_are_answered_not_logged_and_keep_green(
    repos: tuple[Path, Path], store_address: str, monitor: Monitor, tmp_path: Path
) -> None:
    """The headers survive the public listener with two models served: the probe names its
    model, the model answers, the store logs nothing."""
    from cyclone.envoy import EnvoyProxy, EnvoySettings
    from cyclone.traffic import Endpoint, Revision, TrafficSplit

    good, _ = repos
    await _register(store_address, good)
    version = ModelRepository(good).files(MODEL).version
    host, port = store_address.rsplit(":", 1)
    envoy = EnvoyProxy(
        EnvoySettings(
            work_dir=tmp_path / "envoy",
            public_host="127.0.0.1",
            public_port=0,
            control_port=0,
            store=Endpoint(host, int(port)),
            monitor=Endpoint("127.0.0.1", _free_port()),
            concurrency=1,
            health_interval_s=0.25,
        )
    )
    await envoy.start()
    try:
        async with (
            await start_inference(_inference(good, tmp_path, store_address)) as inference,
            aio.insecure_channel(store_address) as store_channel,
        ):
            endpoint = (Endpoint("127.0.0.1", inference.server.port),)
            rev = Revision(MODEL, version, endpoint)
            await envoy.apply(TrafficSplit(MODEL, {rev.name: 100}, {rev.name: rev}))
            # A second model: from now on Envoy routes only calls naming their model.
            forest = Revision("forest", "1", endpoint)
            await envoy.apply(TrafficSplit("forest", {forest.name: 100}, {forest.name: forest}))
            await _set_probes(monitor, {"address": envoy.public_address})
            deadline = time.monotonic() + 15
            while True:  # Envoy's health check admits the endpoint within a few intervals
                monitor.probe_records.clear()
                monitor._next_probe.clear()
                monitor._next_due.clear()
                await monitor.run_due()
                answered = "uptime" in monitor.statuses[MODEL].evaluation.metrics
                if answered or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.25)
            status = monitor.statuses[MODEL]
            assert status.level is Level.GREEN, status.evaluation.reasons
            assert status.evaluation.metrics["uptime"].value == 1.0
            # The positive control: an ordinary call after the probes (logged in serving
            # order) reaches the store; the probes before it must not have.
            store = store_grpc.StoreServiceStub(store_channel)
            async with aio.insecure_channel(f"127.0.0.1:{inference.server.port}") as channel:
                await inf_grpc.InferenceServiceStub(channel).Predict(
                    build_request(MODEL, [ORDINARY_ROW]), timeout=10
                )
            await _wait_stored(store, 1)
            assert await _predictions(store) == 1
    finally:
        await envoy.stop()
