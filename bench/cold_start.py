"""Scale-to-zero benchmark: the latency of the first request to a stopped (idle) revision.

Real parts: the store (embedded PostgreSQL), the trainer with Envoy and `idle_timeout_seconds`,
the local orchestrator's inference subprocess. Each round waits until the idle watcher has
stopped the revision, then times one Predict through Envoy's public listener (held by Envoy's
retries while the revision starts again), then one warm Predict for comparison (printed).
Figures: the median and worst cold start (target <= 5 s).

Usage: python -m bench.cold_start [--rounds 5]
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import tempfile
import time
from pathlib import Path

from bench._common import Figures, median
from cyclone.channels import aio_channel
from cyclone.client import MODEL_HEADER
from cyclone.inference.v1 import inference_service_pb2 as inference_pb
from cyclone.inference.v1 import inference_service_pb2_grpc as inference_grpc
from cyclone.models.convert import import_pipeline
from cyclone.traffic import revision_name
from cyclone_app.examples import credit_frame, credit_pipeline
from services.launch import start_store, start_trainer
from services.store.main import StoreSettings
from services.trainer.main import TrainerSettings

MODEL = "credit"
IDLE_S = 1.0
COLD_TARGET_S = 5.0


def _request() -> inference_pb.PredictRequest:
    request = inference_pb.PredictRequest(model=MODEL)
    for name, value in {"age": 41.0, "income": 52000.0, "debt_ratio": 0.31}.items():
        request.features[name].numbers.append(value)
    request.features["city"].strings.append("porto")
    return request


async def _timed_predict(stub: inference_grpc.InferenceServiceStub) -> float:
    started = time.perf_counter()
    await stub.Predict(_request(), metadata=((MODEL_HEADER, MODEL),), timeout=30)
    return time.perf_counter() - started


async def run(rounds: int, figures: Figures, work: Path, store_dir: Path) -> None:
    repo = work / "models"
    frame = credit_frame(400, seed=0)
    import_pipeline(credit_pipeline(frame), MODEL, repo, sample=frame, label_column="defaulted")
    store_settings = StoreSettings(
        port=0, data_dir=store_dir, embedded_fast_unsafe=True, log_level="WARNING"
    )
    async with await start_store(store_settings) as store:
        settings = TrainerSettings(
            port=0,
            store=store.address,
            model_repository=repo,
            data_dir=work / "trainer",
            log_level="WARNING",
            envoy=True,
            public_host="127.0.0.1",
            public_port=0,
            control_port=0,
            monitor="",
            idle_timeout_seconds=IDLE_S,
        )
        async with await start_trainer(settings) as trainer:
            plane = trainer.domain.traffic

            async with aio_channel(plane.proxy.public_address) as channel:
                stub = inference_grpc.InferenceServiceStub(channel)
                cold: list[float] = []
                warm: list[float] = []
                for _ in range(rounds):
                    while revision_name(MODEL, "1") not in plane.idle.asleep():
                        await asyncio.sleep(0.05)
                    cold.append(await _timed_predict(stub))
                    warm.append(await _timed_predict(stub))
    figures.add("cold_start_first_request_median", median(cold), "s", COLD_TARGET_S, False)
    figures.add("cold_start_first_request_max", max(cold), "s", COLD_TARGET_S, False)
    print(f"  warm request median {median(warm) * 1000:.1f} ms (for comparison)", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    figures = Figures()
    # The embedded server runs as another user: its data directory is not under a private tmp.
    store_dir = Path(tempfile.mkdtemp(prefix="cyclone-bench-store-"))
    try:
        with tempfile.TemporaryDirectory() as tmp:
            asyncio.run(run(args.rounds, figures, Path(tmp), store_dir))
    finally:
        shutil.rmtree(store_dir, ignore_errors=True)
    figures.emit()


if __name__ == "__main__":
    main()
