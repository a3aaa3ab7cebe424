"""Rollout benchmark: one revision with 1 vs 2 replica processes through Envoy (c32 throughput),
and the time from `RolloutController.start()` to 100 % of answers from the new version for a
red-black rollout (no observation period; target <= 5 s, the figure's floor).

Real parts: the store (embedded PostgreSQL), Envoy, the local orchestrator's inference
subprocesses, the rollout controller. Model: the RandomForestRegressor of bench/inference.py.

Usage: python -m bench.rollout [--seconds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from bench._common import Figures
from bench.inference import PREDICT, predict_payload, unary_load
from cyclone.channels import aio_channel
from cyclone.envoy import EnvoyProxy, EnvoySettings
from cyclone.inference.v1 import inference_service_pb2 as inference_pb
from cyclone.inference.v1 import inference_service_pb2_grpc as inference_grpc
from cyclone.models.convert import import_pipeline
from cyclone.models.repository import sha256_of
from cyclone.plan import default_plan, plan_to_yaml
from cyclone.rollout_plan import parse_rollout
from cyclone.store.v1 import store_service_pb2 as store_pb
from cyclone.store.v1 import store_service_pb2_grpc as store_grpc
from cyclone.traffic import TrafficSplit, revision_name
from cyclone_app.examples import bench_regressor
from plugins.orchestrator_local import LocalOrchestrator
from services.launch import start_store
from services.store.main import StoreSettings
from services.trainer.rollout import RolloutController
from services.trainer.rollout.store_gateway import StoreGateway

MODEL = "rf"
SWAP_TARGET_S = 5.0


async def register(stub: store_grpc.StoreServiceStub, repo: Path, version: str) -> None:
    directory = repo / MODEL / version
    await stub.RegisterModelVersion(
        store_pb.RegisterModelVersionRequest(
            model_version=store_pb.ModelVersion(
                model=MODEL,
                version=version,
                task="regression",
                sha256=sha256_of(directory / "model.onnx"),
                artifact_uri=str(directory),
            ),
            if_not_exists=True,
        ),
        timeout=10,
    )


async def first_answer_from(address: str, version: str, payload: bytes, timeout: float) -> None:
    """Return once a Predict through `address` is answered by `version`."""
    request = inference_pb.PredictRequest.FromString(payload)
    deadline = time.perf_counter() + timeout
    async with aio_channel(address) as channel:
        stub = inference_grpc.InferenceServiceStub(channel)
        while time.perf_counter() < deadline:
            if (await stub.Predict(request, timeout=5)).version == version:
                return
            await asyncio.sleep(0.005)
    raise TimeoutError(f"version {version} never answered through {address}")


async def run(seconds: float, figures: Figures, work: Path, store_dir: Path) -> None:
    model, x = bench_regressor()
    payload = predict_payload(x[0].astype(np.float32))
    repo = work / "models"
    import_pipeline(model, MODEL, repo, version="1")
    for version in ("2", "3"):
        shutil.copytree(repo / MODEL / "1", repo / MODEL / version)

    store = await start_store(
        StoreSettings(port=0, data_dir=store_dir, embedded_fast_unsafe=True, log_level="WARNING")
    )
    orchestrator = LocalOrchestrator(
        {
            "model_repository": repo,
            "data_dir": work / "orchestrator",
            "extra_args": ["--data-dir", str(work / "inference")],
        }
    )
    envoy = EnvoyProxy(
        EnvoySettings(
            work_dir=work / "envoy",
            public_host="127.0.0.1",
            public_port=0,
            control_port=0,
            health_interval_s=0.5,
        )
    )
    gateway = StoreGateway(store.address)
    controller = RolloutController(orchestrator, envoy, gateway)
    channel = aio_channel(store.address)
    try:
        await envoy.start()
        # One revision, 1 then 2 replica processes, each alone behind Envoy.
        throughput: dict[int, float] = {}
        previous: str | None = None
        for replicas, version in ((1, "1"), (2, "2")):
            revision = await orchestrator.start(MODEL, version, replicas)
            await envoy.apply(TrafficSplit(MODEL, {revision.name: 100}, {revision.name: revision}))
            await envoy.wait_healthy(revision, 30)
            if previous:
                await orchestrator.stop(previous)
            previous = revision.name
            throughput[replicas] = (
                await unary_load(envoy.public_address, PREDICT, payload, 32, seconds)
            )[0]
            if replicas == 1:  # the floor: the same calls straight to the one replica
                direct = revision.endpoints[0].address
                throughput[0] = (await unary_load(direct, PREDICT, payload, 32, seconds))[0]
        figures.add(
            "envoy_revision_1_replica_c32_throughput", throughput[1], "req/s", throughput[0], True
        )
        figures.add(
            "envoy_revision_2_replicas_c32_throughput", throughput[2], "req/s", throughput[1], True
        )

        # Red-black: version 2 serves (2 replicas), version 3 takes over.
        stub = store_grpc.StoreServiceStub(channel)
        for version in ("2", "3"):
            await register(stub, repo, version)
        await stub.SetModelStatus(
            store_pb.SetModelStatusRequest(
                model=MODEL, version="2", status=store_pb.MODEL_STATUS_SERVING
            ),
            timeout=10,
        )
        rollout = {
            "strategy": "red_black",
            "interval": "200ms",
            "red_black": {"keep_old_for": "1s"},
        }
        plan = dataclasses.replace(
            default_plan(MODEL, "regression"), rollout=parse_rollout(rollout)
        )
        await stub.SavePlan(
            store_pb.SavePlanRequest(model=MODEL, plan_yaml=plan_to_yaml(plan)), timeout=10
        )
        await controller.start_up()
        started = time.perf_counter()
        begun = await controller.start(MODEL, "3")
        await first_answer_from(envoy.public_address, "3", payload, 60)
        swap = time.perf_counter() - started
        figures.add("redblack_start_to_100_percent", swap, "s", SWAP_TARGET_S, False)
        done = await controller.wait(begun.id, 60)
        if done.state.value != "promoted" or envoy.splits[MODEL].weights != {
            revision_name(MODEL, "3"): 100
        }:
            raise RuntimeError(f"red-black rollout did not promote: {done.state} {done.reason}")
    finally:
        await controller.close()
        await gateway.close()
        await channel.close()
        await orchestrator.close()
        await envoy.stop()
        await store.stop()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=3.0)
    args = parser.parse_args()
    figures = Figures()
    # The embedded server runs as another user: its data directory is not under a private tmp.
    store_dir = Path(tempfile.mkdtemp(prefix="cyclone-bench-store-"))
    try:
        with tempfile.TemporaryDirectory() as tmp:
            asyncio.run(run(args.seconds, figures, Path(tmp), store_dir))
    finally:
        shutil.rmtree(store_dir, ignore_errors=True)
    figures.emit()


if __name__ == "__main__":
    main()
