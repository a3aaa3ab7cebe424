"""Scale to zero on one machine: the trainer (real Envoy, real revision subprocesses) stops a
revision nobody calls; the next request, gRPC or REST, starts it again and gets its answer late
rather than an error."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import socket
import time
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from grpc import aio
from support import store_and_trainer
from typer.testing import CliRunner

from cyclone.client import MODEL_HEADER
from cyclone.envoy import EnvoySettings
from cyclone.envoy import config as cfg
from cyclone.inference.v1 import inference_service_pb2 as inference_pb
from cyclone.inference.v1 import inference_service_pb2_grpc as inference_grpc
from cyclone.models.convert import import_pipeline
from cyclone.traffic import revision_name
from cyclone_app.examples import credit_frame, credit_pipeline
from services.trainer.main import TrainerSettings
from services.trainer.traffic import TrafficPlane

pytestmark = [pytest.mark.integration]

IDLE_S = 2.0
REVISION = revision_name("credit", "1")
FEATURES = {"age": 41.0, "income": 52000.0, "debt_ratio": 0.31}


@dataclasses.dataclass
class Mesh:
    public: str
    plane: Any


@pytest.fixture
async def mesh(fresh_database_url: str, tmp_path: Path) -> AsyncIterator[Mesh]:
    repository = tmp_path / "models"
    repository.mkdir()
    frame = credit_frame(400, seed=0)
    import_pipeline(
        credit_pipeline(frame), "credit", repository, sample=frame, label_column="defaulted"
    )
    async with store_and_trainer(
        fresh_database_url, repository, tmp_path / "data", idle_timeout_seconds=IDLE_S
    ) as (_, trainer):
        plane = trainer.domain.traffic
        yield Mesh(plane.proxy.public_address, plane)


async def _grpc_predict(public: str, timeout: float = 30) -> inference_pb.PredictResponse:
    request = inference_pb.PredictRequest(model="credit")
    for name, value in FEATURES.items():
        request.features[name].numbers.append(value)
    request.features["city"].strings.append("porto")
    async with aio.insecure_channel(public) as channel:
        return await inference_grpc.InferenceServiceStub(channel).Predict(
            request, metadata=((MODEL_HEADER, "credit"),), timeout=timeout
        )


async def _rest_predict(public: str) -> tuple[int, Any]:
    features: dict[str, Any] = {n: {"numbers": [v]} for n, v in FEATURES.items()}
    features["city"] = {"strings": ["porto"]}
    request = urllib.request.Request(
        f"http://{public}/v1/models/credit:predict",
        data=json.dumps({"features": features}).encode(),
        headers={"content-type": "application/json"},
    )

    def call() -> tuple[int, Any]:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())

    return await asyncio.to_thread(call)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie not yet reaped still answers kill(0); its state says it is gone.
    with open(f"/proc/{pid}/stat") as stat:
        return stat.read().split(") ", 1)[1][0] != "Z"


async def _wait_asleep(plane: Any, limit: float = 20.0) -> float:
    started = time.monotonic()
    while REVISION not in plane.idle.asleep():
        assert time.monotonic() - started < limit, "revision never stopped for idleness"
        await asyncio.sleep(0.1)
    return time.monotonic() - started


@pytest.mark.slow
@pytest.mark.timeout(180)
async def test_idle_revision_stops_and_the_next_request_wakes_it(mesh: Mesh) -> None:
    orchestrator = mesh.plane.orchestrator
    assert (await _grpc_predict(mesh.public)).version == "1"
    pids = orchestrator.replica_pids(REVISION)
    ports = [e.port for r in await orchestrator.running() for e in r.endpoints]
    assert pids and ports

    # Steady traffic (more often than the timeout) keeps the revision up.
    busy_until = time.monotonic() + IDLE_S * 1.5
    while time.monotonic() < busy_until:
        await _grpc_predict(mesh.public)
        await asyncio.sleep(0.3)
    assert mesh.plane.idle.asleep() == [] and orchestrator.replica_pids(REVISION) == pids

    # Then nothing: stopped after the timeout, its processes gone.
    waited = await _wait_asleep(mesh.plane)
    assert waited >= IDLE_S * 0.5, waited  # not before (most of) the timeout passed quietly
    assert await orchestrator.running() == []
    assert not any(_alive(pid) for pid in pids)

    # gRPC: the first request is held while the revision starts again, and answered.
    started = time.monotonic()
    answer = await _grpc_predict(mesh.public)
    grpc_cold = time.monotonic() - started
    assert answer.version == "1" and len(answer.prediction_ids) == 1
    woken = orchestrator.replica_pids(REVISION)
    assert woken and set(woken).isdisjoint(pids)
    assert [e.port for r in await orchestrator.running() for e in r.endpoints] == ports
    # The answer can come before Envoy's health check passes and the watcher records the
    # wake-up (Envoy routes to the host at once), so "awake" is waited for, not assumed.
    for _ in range(100):
        if mesh.plane.idle.asleep() == []:
            break
        await asyncio.sleep(0.1)
    assert mesh.plane.idle.asleep() == []

    # REST, after another idle period.
    await _wait_asleep(mesh.plane)
    started = time.monotonic()
    status, body = await _rest_predict(mesh.public)
    rest_cold = time.monotonic() - started
    assert status == 200 and body["version"] == "1", body
    assert orchestrator.replica_pids(REVISION)

    # The answer can come (Envoy routes to the host at once) before Envoy's health check
    # passes and the watcher records the wake-up.
    for _ in range(100):
        if len(mesh.plane.idle.cold_starts) == 2:
            break
        await asyncio.sleep(0.1)

    # Warm again: an ordinary latency.
    started = time.monotonic()
    await _grpc_predict(mesh.public)
    warm = time.monotonic() - started
    measured = {
        "grpc_cold_start_s": round(grpc_cold, 3),
        "rest_cold_start_s": round(rest_cold, 3),
        "warm_s": round(warm, 3),
        "wake_s": [round(c.seconds, 3) for c in mesh.plane.idle.cold_starts],
    }
    print("cold start:", json.dumps(measured))
    assert grpc_cold > warm and len(mesh.plane.idle.cold_starts) == 2, measured


def test_cold_start_hold_lengthens_the_retry_policy_only_when_on() -> None:
    off = cfg._retry_policy(EnvoySettings(work_dir=Path("unused")))
    assert off["num_retries"] == 3 and off["retry_back_off"]["max_interval"] == "0.1s"
    on = cfg._retry_policy(EnvoySettings(work_dir=Path("unused"), cold_start_hold_s=20))
    assert on["num_retries"] == 40 and on["retry_back_off"]["max_interval"] == "1s"
    with pytest.raises(ValueError, match="cold_start_hold_s"):
        EnvoySettings(work_dir=Path("unused"), cold_start_hold_s=-1)


async def test_negative_idle_timeout_is_refused(tmp_path: Path) -> None:
    settings = TrainerSettings(envoy=True, data_dir=tmp_path, idle_timeout_seconds=-1)
    with pytest.raises(ValueError, match="idle_timeout_seconds"):
        await TrafficPlane(settings, store=None).start(0)  # type: ignore[arg-type]


def test_up_rejects_a_bad_idle_timeout(tmp_path: Path) -> None:
    from cyclone_app.cli import app

    result = CliRunner().invoke(app, ["up", "--data-dir", str(tmp_path), "--idle-timeout", "5x"])
    assert result.exit_code == 2
    assert "--idle-timeout" in result.output, result.output


def test_up_passes_the_idle_timeout_to_the_trainer(tmp_path: Path) -> None:
    from services.mesh import Mesh as MeshPlan
    from services.mesh import MeshSettings

    plans = MeshPlan(MeshSettings(tmp_path, idle_timeout_seconds=600)).plan()
    trainer = next(p for p in plans if p.name == "trainer")
    assert trainer.args[trainer.args.index("--idle-timeout") + 1] == "600"
    off = next(p for p in MeshPlan(MeshSettings(tmp_path)).plan() if p.name == "trainer")
    assert "--idle-timeout" not in off.args


@pytest.mark.slow
@pytest.mark.timeout(180)
async def test_a_revision_whose_port_was_taken_wakes_on_a_new_one(mesh: Mesh) -> None:
    orchestrator = mesh.plane.orchestrator
    assert (await _grpc_predict(mesh.public)).version == "1"
    (old_port,) = [e.port for r in await orchestrator.running() for e in r.endpoints]
    await _wait_asleep(mesh.plane)
    # Another program binds the port meanwhile (bound, not listening: Envoy's connects are
    # refused and the revision cannot bind it).
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", old_port))
        answer = await _grpc_predict(mesh.public)
        assert answer.version == "1"
        (new_port,) = [e.port for r in await orchestrator.running() for e in r.endpoints]
        assert new_port != old_port
        split = mesh.plane.proxy.splits["credit"]
        assert [e.port for e in split.revisions[REVISION].endpoints] == [new_port]
