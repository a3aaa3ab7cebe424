"""Inference benchmark: Predict, OIP ModelInfer and PredictStream against a bare gRPC echo.

Model: RandomForestRegressor(50 trees, depth 10) on 12 float features. The echo server
(bytes in, same bytes out) receives the exact serialized Predict payload, so the ratio
is what Cyclone's parsing, validation, onnxruntime and response cost on top of gRPC.
Servers run in their own processes; the load generator is one grpc.aio client.

Usage: python bench/inference.py [--seconds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from grpc import aio

from bench._common import PYTHON, Figures, free_port, percentile, start_process, stop_process
from cyclone.examples import bench_regressor
from cyclone.inference.v1 import inference_service_pb2 as pb
from cyclone.models.convert import import_pipeline
from cyclone.oip.v2 import open_inference_pb2 as oip

PREDICT = "/cyclone.inference.v1.InferenceService/Predict"
STREAM = "/cyclone.inference.v1.InferenceService/PredictStream"
INFER = "/inference.GRPCInferenceService/ModelInfer"


def predict_payload(row: np.ndarray) -> bytes:
    request = pb.PredictRequest(model="rf")
    for i, value in enumerate(row):
        request.features[f"f{i}"].numbers.append(float(value))
    return request.SerializeToString()


def infer_payload(row: np.ndarray) -> bytes:
    request = oip.ModelInferRequest(model_name="rf")
    request.inputs.add(name="input", datatype="FP32", shape=[1, len(row)])
    request.raw_input_contents.append(row.astype("<f4").tobytes())
    return request.SerializeToString()


async def unary_load(
    address: str, method: str, payload: bytes, concurrency: int, seconds: float
) -> tuple[float, float, float]:
    """Throughput (req/s), p50 and p99 latency (ms) of `concurrency` closed-loop callers."""
    async with aio.insecure_channel(address) as channel:
        call = channel.unary_unary(method)
        for _ in range(50):
            await call(payload)
        latencies: list[float] = []
        deadline = time.perf_counter() + seconds

        async def worker() -> None:
            while time.perf_counter() < deadline:
                t0 = time.perf_counter()
                await call(payload)
                latencies.append(time.perf_counter() - t0)

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    return (
        len(latencies) / elapsed,
        percentile(latencies, 0.5) * 1e3,
        percentile(latencies, 0.99) * 1e3,
    )


async def stream_load(
    address: str, method: str, payload: bytes, seconds: float, window: int = 64
) -> float:
    """Messages per second through one bidi stream, with up to `window` in flight."""
    async with aio.insecure_channel(address) as channel:
        call = channel.stream_stream(method)()
        in_flight = asyncio.Semaphore(window)
        stop_at = time.perf_counter() + seconds
        sent = 0

        async def writer() -> None:
            nonlocal sent
            while time.perf_counter() < stop_at:
                await in_flight.acquire()
                await call.write(payload)
                sent += 1
            await call.done_writing()

        received = 0
        started = time.perf_counter()
        writing = asyncio.create_task(writer())
        async for _ in call:
            received += 1
            in_flight.release()
        await writing
        elapsed = time.perf_counter() - started
    return received / elapsed


def ort_in_process(model_dir: Path, row: np.ndarray, repeats: int = 3000) -> float:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(
        str(model_dir / "model.onnx"), options, providers=["CPUExecutionProvider"]
    )
    feed = {"input": row.reshape(1, -1).astype(np.float32)}
    for _ in range(200):
        session.run(None, feed)
    t0 = time.perf_counter()
    for _ in range(repeats):
        session.run(None, feed)
    return (time.perf_counter() - t0) / repeats * 1e3


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=3.0)
    args = parser.parse_args()
    model, x = bench_regressor()
    row = x[0].astype(np.float32)
    figures = Figures()
    with tempfile.TemporaryDirectory() as tmp:
        model_dir, _, _ = import_pipeline(model, "rf", Path(tmp))
        echo_port, inf_port = free_port(), free_port()
        echo = start_process([PYTHON, "-m", "bench.echo_server", str(echo_port)], echo_port)
        server = start_process(
            [
                PYTHON,
                "-m",
                "cyclone",
                "serve",
                "inference",
                "--model-repository",
                tmp,
                "--model",
                "rf",
                "--port",
                str(inf_port),
                "--metrics-port",
                "-1",
            ],
            inf_port,
        )
        try:
            run: Callable[..., tuple[float, float, float]] = lambda *a: asyncio.run(unary_load(*a))  # noqa: E731
            predict = predict_payload(row)
            infer = infer_payload(row)
            stream_msg = pb.PredictStreamRequest(
                request=pb.PredictRequest.FromString(predict)
            ).SerializeToString()
            print(
                f"payload: Predict {len(predict)} B, ModelInfer {len(infer)} B; {args.seconds:.0f}s per figure"
            )
            unary: dict[int, float] = {}
            for conc in (1, 32):
                floor = run(
                    f"127.0.0.1:{echo_port}", "/bench.Echo/Unary", predict, conc, args.seconds
                )
                ours = run(f"127.0.0.1:{inf_port}", PREDICT, predict, conc, args.seconds)
                oip_ours = run(f"127.0.0.1:{inf_port}", INFER, infer, conc, args.seconds)
                unary[conc] = ours[0]
                figures.add(f"predict_c{conc}_throughput", ours[0], "req/s", floor[0], True)
                figures.add(f"predict_c{conc}_p50", ours[1], "ms", floor[1], False)
                figures.add(f"predict_c{conc}_p99", ours[2], "ms", floor[2], False)
                figures.add(f"model_infer_c{conc}_throughput", oip_ours[0], "req/s", floor[0], True)
                figures.add(f"model_infer_c{conc}_p50", oip_ours[1], "ms", floor[1], False)
                figures.add(f"model_infer_c{conc}_p99", oip_ours[2], "ms", floor[2], False)
            stream_floor = asyncio.run(
                stream_load(
                    f"127.0.0.1:{echo_port}", "/bench.Echo/Stream", stream_msg, args.seconds
                )
            )
            stream = asyncio.run(
                stream_load(f"127.0.0.1:{inf_port}", STREAM, stream_msg, args.seconds)
            )
            figures.add("predict_stream_throughput", stream, "msg/s", stream_floor, True)
            figures.add("predict_stream_vs_unary_c1", stream, "msg/s", unary[1], True)
            figures.add("predict_stream_vs_unary_c32", stream, "msg/s", unary[32], True)
            floor_ms = 1e3 / unary[1]
            figures.add(
                "onnxruntime_in_process_1row", ort_in_process(model_dir, row), "ms", floor_ms, False
            )
        finally:
            stop_process(server)
            stop_process(echo)
    figures.emit()


if __name__ == "__main__":
    main()
