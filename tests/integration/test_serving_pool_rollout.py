"""The serving pool behind a real Envoy, started by the local orchestrator: two versions of one
model and another model in the same pool processes, one Envoy cluster per version; a rollout
moves the weights through Envoy with no failed request; the pool outlives its orchestrator and
is adopted; stopping a pooled revision leaves the shared processes serving."""

from __future__ import annotations

import asyncio
import collections
import os
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from cyclone.channels import aio_channel
from cyclone.client import MODEL_HEADER, build_request
from cyclone.envoy import EnvoyProxy, EnvoySettings
from cyclone.inference.v1 import inference_service_pb2_grpc as pb_grpc
from cyclone.models.convert import import_pipeline
from cyclone.traffic import Revision, TrafficSplit
from cyclone_app.examples import CREDIT_FEATURES, credit_frame, credit_pipeline
from plugins.orchestrator_local import LocalOrchestrator, _serving

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(240)]


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any]:
    root = tmp_path_factory.mktemp("pool-rollout-repo")
    frame = credit_frame(300, seed=3)
    import_pipeline(credit_pipeline(frame), "credit", root, sample=frame)  # version 1
    import_pipeline(credit_pipeline(credit_frame(300, seed=4)), "credit", root, sample=frame)
    import_pipeline(credit_pipeline(frame), "other", root, sample=frame)
    return root, frame


@pytest.fixture
async def envoy(tmp_path: Path) -> AsyncIterator[EnvoyProxy]:
    settings = EnvoySettings(
        work_dir=tmp_path / "envoy",
        public_host="127.0.0.1",
        public_port=0,
        control_port=0,
        concurrency=1,
        health_interval_s=0.25,
    )
    async with EnvoyProxy(settings) as proxy:
        yield proxy


def _split(
    model: str, weights: dict[Revision, int], shadow: Revision | None = None
) -> TrafficSplit:
    revisions = {r.name: r for r in [*weights, *([shadow] if shadow else [])]}
    return TrafficSplit(
        model,
        {r.name: w for r, w in weights.items()},
        revisions,
        shadow.name if shadow else None,
    )


async def _versions(address: str, model: str, frame: Any, n: int) -> collections.Counter[str]:
    """Which version answered each of `n` requests through Envoy (any failure raises)."""
    rows = frame[CREDIT_FEATURES].head(2).to_dict(orient="records")
    async with aio_channel(address) as channel:
        stub = pb_grpc.InferenceServiceStub(channel)
        replies = await asyncio.gather(
            *(
                stub.Predict(build_request(model, rows), metadata=[(MODEL_HEADER, model)])
                for _ in range(n)
            )
        )
    return collections.Counter(r.version for r in replies)


def _alive(pid: int) -> bool:
    """Running (a zombie nobody reaped yet is not: this test process started the pool)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


async def test_a_rollout_across_the_pool_moves_weights_through_envoy(
    repo: tuple[Path, Any], tmp_path: Path, envoy: EnvoyProxy
) -> None:
    root, frame = repo
    config = {
        "model_repository": root,
        "data_dir": tmp_path,
        "detached": True,
        "grace_seconds": 5,
        "pool_processes": 2,
        "pool_memory_mb": 256,
    }
    first = LocalOrchestrator(config)
    second: LocalOrchestrator | None = None
    pool_pids: list[int] = []
    try:
        v1 = await first.start("credit", "1", 2)
        v2 = await first.start("credit", "2", 2)
        other = await first.start("other", "1", 2)
        # One pool: every pooled version's endpoints are the same two processes.
        assert v1.pooled and v2.pooled and other.pooled
        assert v1.endpoints == v2.endpoints == other.endpoints and len(v1.endpoints) == 2
        pool_pids = first.replica_pids(v1.name)
        assert len(pool_pids) == 2

        await envoy.apply(_split("other", {other: 100}))
        await envoy.apply(_split("credit", {v1: 100, v2: 0}))
        await envoy.wait_healthy(v1, 20)
        await envoy.wait_healthy(v2, 20)
        address = envoy.public_address
        assert await _versions(address, "credit", frame, 40) == {"1": 40}
        assert await _versions(address, "other", frame, 10) == {"1": 10}

        # A canary step, with the new version also mirrored (its cluster names version 2).
        await envoy.apply(_split("credit", {v1: 50, v2: 50}, shadow=v2))
        answered = await _versions(address, "credit", frame, 200)
        assert set(answered) == {"1", "2"} and sum(answered.values()) == 200, answered
        await envoy.apply(_split("credit", {v2: 100}))
        assert await _versions(address, "credit", frame, 40) == {"2": 40}
        await first.stop(v1.name)  # the rolled-back-from version: the pool stays
        assert all(_alive(pid) for pid in pool_pids)
        assert await _versions(address, "other", frame, 10) == {"1": 10}

        # The trainer goes away (detached): the pool keeps serving and is adopted as it is.
        await first.close()
        assert all(_alive(pid) for pid in pool_pids)
        second = LocalOrchestrator({**config, "detached": False})
        adopted = await second.adopt()
        assert sorted(r.name for r in adopted) == sorted([v2.name, other.name])
        assert all(r.endpoints == v2.endpoints and r.pooled for r in adopted)
        assert sorted(second.replica_pids(v2.name)) == sorted(pool_pids)  # not restarted
        # A fresh version starts in the adopted pool, on the same processes.
        again = await second.start("credit", "1", 2)
        assert again.endpoints == v2.endpoints
        assert await _versions(address, "credit", frame, 20) == {"2": 20}
        await second.close()  # not detached: the pool stops with it
        assert not any(_alive(pid) for pid in pool_pids)
    finally:
        await first.close()  # supervision ends first, so nothing restarts what is killed
        if second is not None:
            await second.close()
        for pid in pool_pids:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)


async def test_the_size_threshold_decides_pool_or_dedicated(
    repo: tuple[Path, Any], tmp_path: Path
) -> None:
    root, _ = repo
    base = {"model_repository": root, "data_dir": tmp_path, "pool_processes": 1}
    size = (root / "credit" / "1" / "model.onnx").stat().st_size
    assert LocalOrchestrator({**base, "pool_threshold_mb": (size + 1) / (1 << 20)}).pools(
        "credit", "1"
    )
    assert not LocalOrchestrator({**base, "pool_threshold_mb": (size - 1) / (1 << 20)}).pools(
        "credit", "1"
    )
    assert not LocalOrchestrator({**base, "pool_processes": 0}).pools("credit", "1")
    # A dedicated revision for the big one: its own process, not pooled.
    dedicated = LocalOrchestrator({**base, "pool_threshold_mb": (size - 1) / (1 << 20)})
    try:
        revision = await dedicated.start("credit", "1", 1)
        assert not revision.pooled and await _serving(revision.endpoints[0].address)
    finally:
        await dedicated.close()


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("pool_processes", -1, "pool_processes: must be 0"),
        ("pool_memory_mb", 0, "pool_memory_mb: must be more than 0"),
        ("pool_threshold_mb", -5, "pool_threshold_mb: must be more than 0"),
    ],
)
def test_bad_pool_config_names_the_field(
    key: str, value: float, message: str, tmp_path: Path
) -> None:
    with pytest.raises(ValueError, match=message):
        LocalOrchestrator({"model_repository": tmp_path, key: value})


def test_bad_trainer_pool_settings_name_the_field(tmp_path: Path) -> None:
    from cyclone.settings import SettingsError
    from services.trainer.main import TrainerSettings

    for field, value in [
        ("pool_memory_mb", 0.0),
        ("pool_threshold_mb", -1.0),
        ("pool_processes", -2),
    ]:
        with pytest.raises(SettingsError, match=f"{field}: must be"):
            TrainerSettings(model_repository=tmp_path, **{field: value})
